"""Wall time of forward passes: several passes timed together, in rounds, so that they see one machine.

Timing two models one after the other compares them under two machine states (another
process busy during one, the CPU's clock changing between them); timing them in rounds
(one call of each, then again) shares whatever happens between them. The figure of a pass
is its fastest call: other processes (and, on a busy machine, the intra-op threads waiting
for each other) make a call slower, never faster, so the fastest call is the figure that two
runs agree on, where a median on a shared 2-core machine moved 100-fold between runs.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["time_together", "speedup_text"]


def time_together(passes: list[Callable[[], object]], warmup: int, repeats: int, min_seconds: float = 0.0) -> list[float]:
    """The fastest call's seconds of each of ``passes``, timed in interleaved rounds.

    passes:  callables that each run one pass and return once it is done (a CUDA pass
             synchronises its device before returning).
    warmup:  untimed calls of each pass, round by round.
    repeats: timed rounds; each times one call of every pass, starting one pass later than the
             round before, so that no pass is always first.
    min_seconds: more rounds until the timed rounds have taken this long: 30 rounds of 0.2 ms
             passes fit in one time slice of a busy machine, all slowed alike.
    Returns one float per pass, in order: the least of its timed calls.
    """
    for _ in range(warmup):
        for run in passes:
            run()
    best = [float("inf")] * len(passes)
    r, began = 0, time.perf_counter()
    while r < repeats or time.perf_counter() - began < min_seconds:
        for j in range(len(passes)):
            i = (r + j) % len(passes)
            start = time.perf_counter()
            passes[i]()
            best[i] = min(best[i], time.perf_counter() - start)
        r += 1
    return best


def speedup_text(speedup: float | None) -> str:
    """A latency ratio (reference / model) as people say it: ``3.2× faster``, ``2.0× slower``."""
    if not speedup:
        return "of unknown speed"
    return f"{speedup:.1f}× faster" if speedup >= 1 else f"{1 / speedup:.1f}× slower"
