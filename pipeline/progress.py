"""Progress of a long stage: a live bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

__all__ = ["Progress", "loss_text"]


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def loss_text(metrics: dict) -> str:
    """``loss 0.4321 (soft 0.1234, ce 0.9876)`` from a training metrics line ({"loss", "soft", "ce", ...});
    a part that is missing, None or the loss itself (train-teacher's ce) is left out; "" without a loss."""
    loss = metrics.get("loss")
    if not isinstance(loss, (int, float)):
        return ""
    parts = [f"{key} {metrics[key]:.4f}" for key in ("soft", "ce")
             if isinstance(metrics.get(key), (int, float)) and metrics[key] != loss]
    return f"loss {loss:.4f}" + (f" ({', '.join(parts)})" if parts else "")


class Progress:
    """Counts units of work (examples) and a rate quantity (positions) against a total.

    On a terminal it redraws one line at most ``redraw_s`` apart; elsewhere (batch jobs,
    logs) it prints a full line every ``log_every_s`` seconds (env
    ``DISTILL_LOG_EVERY``, default 30) and one at the end.
    """

    def __init__(self, total: int, label: str = "", unit: str = "examples", rate_unit: str = "positions",
                 stream: TextIO | None = None, enabled: bool = True):
        self.total, self.label, self.unit, self.rate_unit = total, label, unit, rate_unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every_s = float(os.environ.get("DISTILL_LOG_EVERY", "30"))
        self.done = self.rate_count = 0
        self.note = ""  # appended to each line: the training loop's latest loss
        self.start = self._last = time.monotonic()

    def update(self, n: int, rate_n: int = 0) -> None:
        self.done += n
        self.rate_count += rate_n
        now = time.monotonic()
        if self.enabled and now - self._last >= (0.2 if self.tty else self.log_every_s):
            self._last = now
            self._emit(final=False)

    def close(self) -> None:
        if self.enabled:
            self._emit(final=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.rate_count / elapsed if elapsed > 0 else 0.0
        frac = self.done / self.total if self.total else 1.0
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        bar = ""
        if self.tty:
            width = 24
            fill = int(round(width * min(frac, 1.0)))
            bar = "[" + "#" * fill + "." * (width - fill) + "] "
        eta_text = _duration(eta) if eta == eta else "--:--"
        return (f"{self.label}{bar}{self.done:,}/{self.total:,} {self.unit} ({100 * frac:.0f}%), "
                f"{rate:,.0f} {self.rate_unit}/s, elapsed {_duration(elapsed)}, eta {eta_text}"
                + (f", {self.note}" if self.note else ""))

    def _emit(self, final: bool) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
