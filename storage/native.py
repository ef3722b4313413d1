"""Compiled CPU kernels, built on first use: stage one's top-k reduction (``reduce.c``) and the
classifier's dense bucket loss (``distill/pipeline/bucketloss.c``, called from ``distill.pipeline.fused``).

On a CPU, ``topk_labels`` in plain torch makes several memory-bound passes over (positions x
vocabulary): the top k, an exp, a power per temperature, the block sums. ``reduce.c`` reads each
row twice (the second time from cache) with vectorised loops; ``python benchmarks/reduction.py``
times both. Each C file is compiled with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``) for this machine's CPU into ``$DISTILL_CACHE/native`` (default ``~/.cache/distill``), once
per source, compiler and CPU, and loaded with ctypes. Where there is no compiler, or
``DISTILL_NATIVE=0``, ``library()`` is None and the torch path runs instead (the same labels, to float32
rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["BLOCK", "MAX_EXPONENTS", "build", "compiled", "default_compiler", "library", "topk_reduce"]

SOURCE = Path(__file__).with_name("reduce.c")
_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {  # the exported functions' argument types, set on whichever library has them
    "distill_topk_reduce": ([_P, _I64, _I64, _I64, _I64, _INT, _P, _P, _P, _P, _P, _P, _I64, _P, _P], _INT),
    "distill_dense_bucket_loss": ([_P, _I64, _I64, _P, _I64, _P, _P, _P, _F32, _F32, _I64, _P, _P], _INT),
}
BLOCK = 32  # reduce.c's BLOCK: the columns of each block sum
MAX_EXPONENTS = 8
FLAGS = ("-O3", "-std=c99", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
         "-fassociative-math", "-fno-signed-zeros",  # reassociation: the horizontal sums of `omp simd` as trees
         "-ffp-contract=fast")  # fused multiply-adds where the CPU has them (ISO C mode, -std=c99, turns them off)
ARCH_FLAGS = (("-march=native",), ())  # tried in turn: some compilers and CPUs have no -march=native
MIN_ROWS_PER_THREAD = 16

_lock = threading.Lock()
_state: dict = {}


def library() -> ctypes.CDLL | None:
    """The compiled reduction, or None where it cannot be built here (or ``DISTILL_NATIVE=0``)."""
    return compiled(SOURCE)


def compiled(source: Path) -> ctypes.CDLL | None:
    """``source`` compiled and loaded once per process; None where it cannot be built here (or ``DISTILL_NATIVE=0``)."""
    if os.environ.get("DISTILL_NATIVE", "1") == "0":
        return None
    with _lock:
        if source not in _state:
            _state[source] = build(source=source)
    return _state[source]


def build(compiler: str | None = None, cache: str | os.PathLike | None = None,
          source: Path = SOURCE) -> ctypes.CDLL | None:
    """Compiles ``source`` (unless ``cache`` already holds this build) and loads it; None, with a line on
    stderr, where it cannot be built. ``compiler``: default ``$CC``, else ``cc``, ``gcc`` or ``clang``;
    ``cache``: default ``$DISTILL_CACHE/native``."""
    compiler = compiler or default_compiler()
    if not compiler:
        return _unavailable(source, "no C compiler: set CC, or install gcc")
    identity = "\0".join([source.read_text(), compiler, _version(compiler), _cpu(), " ".join(FLAGS)])
    name = f"{source.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    folder = _cache_dir(cache)
    path = folder / name
    if not path.exists():
        errors = []
        for arch in ARCH_FLAGS:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            try:
                run = subprocess.run([compiler, *FLAGS, *arch, str(source), "-o", tmp, "-lm"], capture_output=True,
                                     text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                os.unlink(tmp)
                return _unavailable(source, f"{compiler} did not run: {e}")
            if run.returncode == 0:
                os.replace(tmp, path)  # atomic: other processes (torchrun's ranks) see the whole file or none
                break
            os.unlink(tmp)
            errors.append(run.stderr.strip().splitlines()[-1:] or [f"exit status {run.returncode}"])
        else:
            return _unavailable(source, f"{compiler} failed: {errors[-1][0]}")
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in SIGNATURES.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    return lib


def default_compiler() -> str | None:
    """The C compiler ``build`` uses: ``$CC``, else the first of ``cc``, ``gcc`` and ``clang`` on the PATH."""
    return os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)


def _unavailable(source: Path, why: str) -> None:
    print(f"distill: compiled code ({source.name}) is not available ({why}); using the slower torch path",
          file=sys.stderr)
    return None


def _version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu() -> str:
    """What -march=native compiles for: a shared cache (NFS home) must not hand one CPU's build to another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir(cache) -> Path:
    base = os.environ.get("DISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "distill")
    folder = Path(cache) if cache is not None else Path(base) / "native"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="distill-native-"))


def _pool(threads: int) -> ThreadPoolExecutor:
    if _state.get("threads") != threads:
        _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="distill-reduce")
        _state["threads"] = threads
    return _state["pool"]


def topk_reduce(logits: torch.Tensor, k: int, exponents=(), offsets: torch.Tensor | None = None,
                draws: int = 0) -> tuple[torch.Tensor, ...] | None:
    """The compiled reduction of ``logits`` (P, V) float32 on the CPU, unit column stride.

    Returns, with ``m`` each row's max and ``e = exp(logits - m)``: the k largest logits (P, k), in no
    order, and their ids (P, k) int64; the block sums of e outside those ids (P, ceil(V / BLOCK)) float32,
    and their total (P,) float64; for each exponent a, the sum of e^a over the whole row (P, len(exponents))
    float64; with ``draws`` M > 0, the tail's systematic draws (P, M) int64, ascending, from each row's
    offset u in ``offsets`` (P,) float32 in [0, 1): the points (u + i) / M of the tail's mass, as
    ``distill.storage.labels.draw`` places them. None where the library is not available, or a row holds a
    NaN or +inf or fewer than k values above -inf (the caller takes the torch path). Rows are split over
    torch's intra-op threads.
    """
    lib = library()
    rows, v = logits.shape
    if lib is None or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(1) != 1:
        return None
    blocks = -(-v // BLOCK)
    if len(exponents) > MAX_EXPONENTS or blocks < k:
        return None
    top, ids = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int64)
    sums, tail = torch.empty(rows, blocks), torch.empty(rows, dtype=torch.float64)
    tempered = torch.empty(rows, len(exponents), dtype=torch.float64)
    powers = torch.tensor(list(exponents), dtype=torch.float32)
    drawn = torch.empty(rows, draws, dtype=torch.int64)
    offsets = torch.zeros(rows) if offsets is None else offsets.contiguous().float()
    threads = max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD))
    cuts = [rows * i // threads for i in range(threads + 1)]

    def part(a: int, b: int) -> int:  # ctypes lets go of the GIL: the parts run in parallel
        if a == b:
            return 0
        return lib.distill_topk_reduce(logits[a].data_ptr(), b - a, v, logits.stride(0), k, len(exponents),
                                       powers.data_ptr(), top[a].data_ptr(), ids[a].data_ptr(), sums[a].data_ptr(),
                                       tail[a:].data_ptr(), tempered[a].data_ptr(), draws, offsets[a:].data_ptr(),
                                       drawn[a].data_ptr())

    if threads == 1:
        status = [part(0, rows)]
    else:
        status = list(_pool(threads).map(part, cuts[:-1], cuts[1:]))
    return (top, ids, sums, tail, tempered, drawn) if not any(status) else None
