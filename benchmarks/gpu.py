"""Both speed benchmarks on a GPU: stage one (``generate.py``) and stage two (``train.py``) on CUDA.

Runs ``benchmarks/generate.py`` and ``benchmarks/train.py`` in turn, each in its own process
(so one's CUDA memory and failures stay its own), with ``--device cuda --precision bf16``:
a bfloat16 teacher in generate-labels, bfloat16 autocast in training, and the fused
distillation loss (train-student's default for a language model's vocabulary). Prints each
benchmark's lines as they come, then one JSON object as the last line: ``{"benchmark": "gpu",
"generate": <generate.py's JSON>, "train": <train.py's JSON>, ...}``; a benchmark that failed
has ``{"error": ...}`` in its place, and the exit status is 1.

Without a CUDA device it prints a one-line note and ``{"benchmark": "gpu", "skipped": true,
...}``, exit status 0.

    python benchmarks/gpu.py [--quick] [--no-memory] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FLAGS = ["--device", "cuda", "--precision", "bf16"]


def run_benchmark(script: str, extra: list[str], timeout: float) -> dict:
    """``benchmarks/<script>.py`` with the GPU flags and ``extra``: its last stdout line as JSON, or {"error": ...}."""
    cmd = [sys.executable, str(HERE / f"{script}.py"), *FLAGS, *extra]
    start = time.perf_counter()
    try:  # its figure lines (stderr) pass through as they come; stdout is kept for its JSON
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": cmd}
    seconds = round(time.perf_counter() - start, 1)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}", "command": cmd, "seconds": seconds}
    try:
        out = json.loads(lines[-1])
    except ValueError:
        return {"error": "its last line is not JSON", "command": cmd, "seconds": seconds, "last_line": lines[-1][-500:]}
    return {**out, "command": cmd, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick")
    parser.add_argument("--no-memory", action="store_true", help="train.py without its peak-RSS check")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each benchmark may run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu: no CUDA device here: skipped", file=sys.stderr)
        print(json.dumps({"benchmark": "gpu", "skipped": True, "reason": "no CUDA device"}))
        return 0
    quick = ["--quick"] if args.quick else []
    generate = run_benchmark("generate", quick, args.timeout)
    train = run_benchmark("train", quick + (["--no-memory"] if args.no_memory else []), args.timeout)
    props = torch.cuda.get_device_properties(0)
    out = {"benchmark": "gpu", "skipped": False, "quick": args.quick, "flags": FLAGS,
           "machine": {"cuda": torch.cuda.get_device_name(0), "memory_gb": round(props.total_memory / 2**30, 1),
                       "cuda_version": torch.version.cuda, "torch": torch.__version__, "cpus": os.cpu_count()},
           "generate": generate, "train": train,
           "meets_targets": {"generate": generate.get("meets_target"), "train": train.get("meets_target")}}
    print(json.dumps(out))
    return 1 if "error" in generate or "error" in train else 0


if __name__ == "__main__":
    sys.exit(main())
