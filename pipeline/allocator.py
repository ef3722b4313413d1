"""The C allocator's thresholds for a process that runs models: a pass's buffers reused, not faulted in anew.

glibc's malloc serves a block above its mmap threshold with a fresh mapping and gives the
top of its heap back to the OS once more than its trim threshold is free there. Both
thresholds start at 128 KiB and rise only as large blocks are freed (to 32 MiB and 64 MiB at
most), and they can settle low: a forward pass whose activations are a few MB then returns
them at every call and faults them in again at the next. Measured on the development
machine (2 cores, glibc 2.36), `distill demo`'s teacher at batch 256 took about 1,250 page
faults a call and 5-7 ms; with the thresholds at their ceilings, none and 3-4 ms, and
`distill evaluate`'s timing of it stopped moving 40% between processes.

``tune_allocator()`` sets them to those ceilings (32 MiB and 64 MiB), where glibc's own rule
would take them after its first large free. `distill evaluate` (and `distill demo`, which
runs it) calls it before timing, so that a pass is timed the way it runs in a long-lived
server, and the setting stays for the rest of the process. `train-teacher` and
`train-student` call it too when they train on a CPU: a step's few-MB gradients and
activations were faulted in afresh at every step (a causal LM student of 0.9M parameters at
512 positions x 4,096: 586,000-840,000 minor page faults in a 150-step run by default,
300,000 with the ceilings), and those 150 steps (`benchmarks/train.py`'s LM workload, offline KD, whole
processes) took 13.9-15.6 s against 17.0-17.4 s, while its memory line (64-example shuffle
blocks) stayed within 5% from 1 to 10 times the store (490 and 510 MB). Stage one leaves glibc's
rule alone: on its memory benchmark the same setting made the peak grow with the data (it
keeps up to 64 MiB of freed heap): stage one's small-shard line read 441 and 474 MB (1.074)
against 434 and 446 MB (1.027) without it, run side by side, for 5% more speed at
V = 32,000. Higher thresholds still (1 GiB and 2 GiB, which a (positions x vocabulary)
tensor of hundreds of MB needs to stay in the heap) made a 19M causal LM teacher's forward
pass 20% faster than glibc's rule, with train-student's small-block line at 1.073. A user
who wants either sets ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in the
environment. What stage one does instead is ``release_free_memory()`` after each shard is
written: its default-shard memory line (`benchmarks/generate.py --memory-default-shards`)
peaked 54 to 159 MB lower at both sizes (690 and 761 MB for 4 and 40 shards, against 744 and
920 MB; 717 and 779 MB for 6 and 60, against 794 and 844 MB), for about 15 ms a shard.

Both leave the allocator alone where the user chose one: any ``MALLOC_*_`` variable or a
malloc tunable in ``GLIBC_TUNABLES``, jemalloc, tcmalloc or mimalloc in ``LD_PRELOAD``, or
``DISTILL_MALLOC=system``; off glibc (macOS, musl) it does nothing. DataLoader workers forked
after it inherit the settings.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "c_library", "release_free_memory", "tune_allocator"]

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc sets the trim threshold to when it raises the mmap threshold
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def tune_allocator(environ: dict[str, str] | None = None, mmap_threshold: int = MMAP_THRESHOLD,
                   trim_threshold: int = TRIM_THRESHOLD) -> str:
    """Raise glibc's mmap and trim thresholds (bytes), unless the user chose an allocator or its settings.

    Returns what was done: ``"tuned"``, ``"user"`` (the environment chose; left alone) or
    ``"unavailable"`` (not glibc, or mallopt refused).
    """
    refused = _refused(environ)
    if refused:
        return refused
    try:
        libc = c_library()
        done = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    except (OSError, AttributeError):
        return "unavailable"
    return "tuned" if done else "unavailable"


def release_free_memory(environ: dict[str, str] | None = None) -> str:
    """Give the heap's free pages back to the OS now (glibc's ``malloc_trim(0)``), unless the user chose an allocator.

    glibc keeps blocks under its mmap threshold in the heap once freed, and the threshold rises
    as large blocks are freed, so the buffers of one finished stage-one shard stay resident
    among live blocks, where the trim threshold (which only returns the heap's top) cannot
    return them; ``malloc_trim`` also releases free pages inside the heap, in every arena. It
    takes about 15 ms on a heap of a few hundred MB. Returns ``"released"``, ``"user"`` or
    ``"unavailable"`` as ``tune_allocator`` does (``"released"`` when glibc gave nothing back too).
    """
    refused = _refused(environ)
    if refused:
        return refused
    try:
        c_library().malloc_trim(0)
    except (OSError, AttributeError):
        return "unavailable"
    return "released"


def _refused(environ: dict[str, str] | None) -> str | None:
    """Why distill leaves the allocator alone: ``"user"`` (the environment chose an allocator or its
    settings), ``"unavailable"`` (not glibc on Linux), or None (go ahead)."""
    env = os.environ if environ is None else environ
    preload = env.get("LD_PRELOAD", "")
    if (env.get("DISTILL_MALLOC", "").lower() == "system" or any(k.startswith("MALLOC_") for k in env)
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", "") or any(a in preload for a in _OTHER_ALLOCATORS)):
        return "user"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "unavailable"
    return None


@functools.cache
def c_library() -> ctypes.CDLL:
    """This process's C library, by ``dlopen(NULL)``: ``ctypes.util.find_library`` would fork ``ldconfig``."""
    return ctypes.CDLL(None)
