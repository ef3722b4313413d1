"""Wall time of forward passes: several passes timed together, in rounds, so that they see one machine.

Timing two models one after the other compares them under two machine states (another
process busy during one, the CPU's clock changing between them); timing them in rounds
(one call of each, then again) shares whatever happens between them. The figure of a pass
is its fastest call: other processes (and, on a busy machine, the intra-op threads waiting
for each other) make a call slower, never faster, so the fastest call is the figure that two
runs agree on, where a median on a shared 2-core machine moved 100-fold between runs.

In each round a pass runs in a burst: called back to back until the burst has taken
``burst_seconds``. A pass of a few microseconds timed once a round, straight after another
model's large batch, is timed cold (its weights evicted from the caches, the intra-op
threads asleep) and only a few hundred times, where a served model answers request after
request warm; the burst's later calls are the warm figure, and enough of them reach the
machine's fast phases. A virtual machine's speed moves in phases of a second or two (the
host's other tenants, its clock), which is why ``min_seconds`` must span several of them.
"""

from __future__ import annotations

import os
import time
from typing import Callable

__all__ = ["time_together", "speedup_text"]


def time_together(passes: list[Callable[[], object]], warmup: int, repeats: int, min_seconds: float = 0.0,
                  burst_seconds: float = 0.0, cores: list[int] | None = None) -> list[float]:
    """The fastest call's seconds of each of ``passes``, timed in interleaved rounds.

    passes:  callables that each run one pass and return once it is done (a CUDA pass
             synchronises its device before returning).
    warmup:  untimed calls of each pass, round by round.
    repeats: timed rounds; each times one call of every pass, starting one pass later than the
             round before, so that no pass is always first.
    min_seconds: more rounds until the timed rounds have taken this long: 30 rounds of 0.2 ms
             passes fit in one time slice of a busy machine, all slowed alike.
    burst_seconds: in each round, call a pass again until its calls of this round have taken
             this long (at least one call); every call is timed.
    cores:   CPU cores to take turns on (Linux): round r runs on ``cores[r % len(cores)]`` alone,
             so that every pass is timed on each core, and the fastest call is the least
             disturbed core's; the process's own set of cores is given back afterwards.
    Returns one float per pass, in order: the least of its timed calls.
    """
    for _ in range(warmup):
        for run in passes:
            run()
    best = [float("inf")] * len(passes)
    rotate = cores is not None and len(cores) > 1 and hasattr(os, "sched_setaffinity")
    own = os.sched_getaffinity(0) if rotate else None
    r, began = 0, time.perf_counter()
    try:
        while r < repeats or time.perf_counter() - began < min_seconds:
            if rotate:
                os.sched_setaffinity(0, {cores[r % len(cores)]})
            _round(passes, r, burst_seconds, best)
            r += 1
    finally:
        if rotate:
            os.sched_setaffinity(0, own)
    return best


def _round(passes: list[Callable[[], object]], r: int, burst_seconds: float, best: list[float]) -> None:
    """One timed round: a burst of each pass, starting with pass r mod n; each call's seconds lower ``best``."""
    for j in range(len(passes)):
        i = (r + j) % len(passes)
        burst_end = time.perf_counter() + burst_seconds
        while True:
            start = time.perf_counter()
            passes[i]()
            end = time.perf_counter()
            best[i] = min(best[i], end - start)
            if end >= burst_end:
                break


def speedup_text(speedup: float | None) -> str:
    """A latency ratio (reference / model) as people say it: ``3.2× faster``, ``2.0× slower``."""
    if not speedup:
        return "of unknown speed"
    return f"{speedup:.1f}× faster" if speedup >= 1 else f"{1 / speedup:.1f}× slower"
