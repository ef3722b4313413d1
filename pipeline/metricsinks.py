"""Live metrics: every line the trainer writes to ``metrics.jsonl`` also goes to TensorBoard and/or Weights & Biases.

``--log-to tensorboard`` writes event files to ``RUN/tensorboard/`` (``tensorboard --logdir
RUN/tensorboard``); ``--log-to wandb`` logs a wandb run whose files go under ``RUN/wandb/``
(online, or offline with ``WANDB_MODE=offline``, synced later with ``wandb sync``). Each is an
optional extra: ``pip install 'distill[tensorboard]'``, ``pip install 'distill[wandb]'``.

A record's numbers are logged as scalars at its ``step``: a training line's ``loss``, ``lr``
and so on under their own names, a held-out line's ``{"eval": {"perplexity": ...}}`` as
``eval/perplexity``. Only rank 0 logs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

from distill.errors import ConfigError, first_line
from distill.pipeline.config import setting
from distill.pipeline.files import write_text

__all__ = ["LogFlags", "SINKS", "sink_names", "check_sinks", "MetricSinks", "open_sinks", "scalars"]

SINKS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the package (and the extra) it needs


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogFlags:
    """Where a training run's metrics go live, besides metrics.jsonl (keyword-only)."""

    log_to: tuple[str, ...] = setting((), "Also log the metrics to tensorboard (RUN/tensorboard) or wandb (RUN/wandb; "
                                          "WANDB_MODE=offline for no network); repeat or comma-separate for both.",
                                      default_help="none")


def sink_names(log_to: tuple[str, ...] | list[str] | str | None) -> tuple[str, ...]:
    """The sinks named by ``--log-to`` values (repeated, or comma-separated), in order, once each."""
    values = [log_to] if isinstance(log_to, str) else list(log_to or ())
    names = [n.strip() for value in values for n in str(value).split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise ConfigError(f"unknown --log-to {unknown[0]!r}: use {', '.join(SINKS)} (repeat or comma-separate "
                          "for both)")
    return tuple(dict.fromkeys(names))


def check_sinks(log_to) -> tuple[str, ...]:
    """``sink_names(log_to)``, refusing in one line a sink whose package is not installed (before any run starts)."""
    names = sink_names(log_to)
    for name in names:
        if importlib.util.find_spec(SINKS[name]) is None:
            raise ConfigError(f"--log-to {name} needs the {SINKS[name]} package, which is not installed: "
                              f"pip install 'distill[{name}]'")
    return names


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics record, nested dicts as ``outer/inner``; ``step`` and ``epoch`` left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in ("step", "epoch"):
            continue
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class MetricSinks:
    """The open sinks of one run: ``write(record)`` for every metrics line, ``close()`` at the end."""

    def __init__(self, names: tuple[str, ...], run_dir: str, resumed_step: int = 0):
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides the events the crashed run logged past its checkpoint
            self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                             purge_step=resumed_step + 1 if resumed_step else None)
        if "wandb" in names:
            self.wandb = _start_wandb(run_dir, resumed_step)

    def write(self, record: dict) -> None:
        values, step = scalars(record), int(record.get("step", 0))
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, global_step=step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def open_sinks(log_to, run_dir: str, resumed_step: int = 0) -> MetricSinks | None:
    """The sinks ``log_to`` names, opened for ``run_dir``; None when it names none."""
    names = check_sinks(log_to)
    return MetricSinks(names, run_dir, resumed_step) if names else None


WANDB_ID_FILE = os.path.join("wandb", "distill-run-id")  # in the run directory: a resumed run continues its wandb run


def _start_wandb(run_dir: str, resumed_step: int = 0):
    """A wandb run in ``run_dir/wandb`` named after the run directory; its mode, project and entity from the
    usual WANDB_* variables (WANDB_MODE=offline: no network). A run resumed from a checkpoint
    continues the wandb run it started with (its id is kept in ``run_dir/WANDB_ID_FILE``)."""
    import wandb

    id_file = os.path.join(run_dir, WANDB_ID_FILE)
    run_id = None
    if resumed_step and os.path.isfile(id_file):
        with open(id_file) as f:
            run_id = f.read().strip() or None
    try:
        run = wandb.init(dir=run_dir, project=os.environ.get("WANDB_PROJECT", "distill"), id=run_id,
                         resume="allow" if run_id else None,
                         name=os.path.basename(os.path.normpath(run_dir)),
                         settings=wandb.Settings(silent=True, console="off"))
    except Exception as e:  # noqa: BLE001 - wandb raises its own types (UsageError, CommError) for login and network
        raise ConfigError(f"--log-to wandb could not start a run ({first_line(e)}): run `wandb login`, or set "
                          "WANDB_MODE=offline") from None
    os.makedirs(os.path.dirname(id_file), exist_ok=True)
    write_text(id_file, run.id + "\n")
    return run
