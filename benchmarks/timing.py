"""Timing benchmark: how far `distill evaluate`'s speed figures move between runs, and how far the machine drifts.

    python benchmarks/timing.py [--drift-s 20] [--window 0.5] [--runs 5] [--probe-s 2] [--min-timing-s S] [--burst-s S]

``drift``: a fixed workload, the built-in student (``mlp:hidden=128``) forward at batch 1 on
one intra-op thread, called back to back for ``--drift-s`` seconds in this process; the
figure of each ``--window`` is its fastest call (as ``distill.pipeline.timing`` takes a
pass's figure). The workload never changes, so ``max_over_min`` of the windows is how much
the host's own speed moved (clock frequency, a neighbour on the same core), which no
timing method inside the guest can remove.

``runs``: the built-in student (``mlp:hidden=128``) and teacher (``cnn:channels=64``) of
`distill demo` are saved untrained (their seeded initial weights) as model directories,
beside a Parquet file of mnist1d-shaped data (40 float features, 10 classes; seeded random
values: a dense layer does the same work whatever the values), once. Then each run is a
separate process running the real command,

    python -m distill evaluate --model STUDENT --teacher TEACHER --data DATA --split train --json

(interleaved rounds of bursts, fastest pass, on evaluate's default --timing-threads, one),
and its report's latency_ms (batch 1) and throughput (examples/s at batch 256) of each
model and its speedup are read. Before each run a ``--probe-s`` drift probe (the fixed
workload's fastest call) says which phase of the machine that run saw;
``student_latency_over_probe`` divides the student's latency by it. ``others_cpu_share`` (of
the drift and of each run) is the share of the machine's CPU time (all cores) that other
processes took meanwhile: /proc/stat's busy time less this process's and its children's
(None off Linux). A run whose share is high had neighbours inside this guest, which the
probe, on one thread, does not see but `distill evaluate`'s intra-op threads do.

``spread`` is max/min - 1 over the runs of each figure: how much two runs of `distill
evaluate` on this machine can disagree. The probe runs in this process, on whichever
core it is on: a slow phase can be one core's, not the machine's. Prints the drift, a line
per run and the spreads, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill.pipeline.modelfiles import save_model
from distill.pipeline.models import ModelConfig, load_model

STUDENT, TEACHER = "mlp:hidden=128", "cnn:channels=64"
FIGURES = ("student_latency_ms", "teacher_latency_ms", "student_throughput", "teacher_throughput", "speedup",
           "probe_ms", "student_latency_over_probe")


def fastest_per_window(work, seconds: float, window: float) -> list[float]:
    """The fastest call of ``work`` (ms) in each ``window`` seconds, calling it back to back for ``seconds``."""
    figures, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # the fixed workload: one intra-op thread, whatever this process was set to
    try:
        with torch.inference_mode():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or not figures:
                best, window_end = float("inf"), time.perf_counter() + window
                while time.perf_counter() < window_end:
                    start = time.perf_counter()
                    work()
                    best = min(best, time.perf_counter() - start)
                figures.append(best * 1e3)
    finally:
        torch.set_num_threads(threads)
    return figures


def busy_cpu_seconds() -> float | None:
    """CPU-seconds every process on the machine has spent so far (/proc/stat), or None where there is none."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds of this process and its finished children."""
    usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


def with_others_share(work):
    """work() and the share of all cores' time that other processes took while it ran (None off Linux)."""
    busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    result = work()
    wall, busy_after = time.perf_counter() - start, busy_cpu_seconds()
    if busy is None or busy_after is None:
        return result, None
    others = busy_after - busy - (own_cpu_seconds() - own)
    return result, round(max(0.0, others / (wall * os.cpu_count())), 3)


def prepare(directory: str, examples: int = 64) -> dict[str, str]:
    """Save the untrained student and teacher and write the data into ``directory``: {student, teacher, data} paths."""
    paths = {name: os.path.join(directory, name) for name in ("student", "teacher")}
    for name, spec in (("student", STUDENT), ("teacher", TEACHER)):
        save_model(load_model(ModelConfig(spec)), paths[name])
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((examples, 40)).astype(np.float32)  # (N, F), mnist1d's 40 features
    paths["data"] = os.path.join(directory, "data.parquet")
    pq.write_table(pa.table({"inputs": list(inputs), "label": rng.integers(0, 10, examples)}), paths["data"])
    return paths


def timing_flags(min_timing_s: float | None, burst_s: float | None) -> list[str]:
    """``--min-timing-s`` and ``--burst-s`` of `distill evaluate`, each only when given (else evaluate's default)."""
    given = (("--min-timing-s", min_timing_s), ("--burst-s", burst_s))
    return [part for flag, value in given if value is not None for part in (flag, str(value))]


def evaluate_command(paths: dict[str, str], timing: list[str]) -> list[str]:
    """The `distill evaluate` command of each run, with ``timing``'s flags."""
    return [sys.executable, "-m", "distill", "evaluate", "--model", paths["student"], "--teacher", paths["teacher"],
            "--data", paths["data"], "--split", "train", *timing, "--json"]


def one_run(command: list[str], probe_ms: float) -> dict:
    """One `distill evaluate` process: its speed figures, and the probe taken just before it."""
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"distill evaluate failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    student, teacher = report, report["teacher"]
    run = {"probe_ms": round(probe_ms, 4),
           "student_latency_ms": round(student["latency_ms"], 4), "teacher_latency_ms": round(teacher["latency_ms"], 4),
           "student_throughput": round(student["throughput"]), "teacher_throughput": round(teacher["throughput"])}
    run["speedup"] = round(run["teacher_latency_ms"] / run["student_latency_ms"], 4)
    run["student_latency_over_probe"] = round(run["student_latency_ms"] / run["probe_ms"], 4)
    return run


def spread(values: list[float]) -> float:
    """max/min - 1: how far apart the most distant two of ``values`` are, as a fraction."""
    return round(max(values) / min(values) - 1, 4)


def drift_summary(windows_ms: list[float]) -> dict:
    """The windows' figures (ms), their least and greatest, and the ratio of the two, all from the rounded figures."""
    windows_ms = [round(w, 4) for w in windows_ms]
    return {"windows_ms": windows_ms, "min_ms": min(windows_ms), "max_ms": max(windows_ms),
            "max_over_min": round(max(windows_ms) / min(windows_ms), 4)}


def measure_drift(work, seconds: float, window: float) -> dict:
    """The drift of ``work``'s fastest call per window over ``seconds``, and others' CPU share meanwhile."""
    windows, others = with_others_share(lambda: fastest_per_window(work, seconds, window))
    drift = {**drift_summary(windows), "others_cpu_share": others}
    print(f"drift: fastest call per {window} s over {seconds} s: {drift['min_ms']}-{drift['max_ms']} ms "
          f"(max/min {drift['max_over_min']}); others' CPU share {others}", flush=True)
    return drift


def measure_runs(work, command: list[str], runs: int, probe_s: float) -> list[dict]:
    """``runs`` runs of ``command``, each after a ``probe_s`` probe of ``work`` (see ``one_run``)."""
    results = []
    for i in range(runs):
        probe = min(fastest_per_window(work, probe_s, probe_s))
        run, others = with_others_share(lambda: one_run(command, probe))  # noqa: B023 (called at once)
        results.append(r := {**run, "others_cpu_share": others})
        print(f"run {i + 1}: probe {r['probe_ms']} ms; student {r['student_latency_ms']} ms, "
              f"{r['student_throughput']:,} ex/s; teacher {r['teacher_latency_ms']} ms, "
              f"{r['teacher_throughput']:,} ex/s; speedup {r['speedup']}; others' CPU share {others}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drift-s", type=float, default=20.0, help="seconds of the drift measurement")
    ap.add_argument("--window", type=float, default=0.5, help="seconds per drift window (its fastest call)")
    ap.add_argument("--runs", type=int, default=5, help="separate `distill evaluate` processes")
    ap.add_argument("--probe-s", type=float, default=2.0, help="seconds of drift probe before each run")
    ap.add_argument("--min-timing-s", type=float, default=None,
                    help="`distill evaluate --min-timing-s` of each run (default: evaluate's own default)")
    ap.add_argument("--burst-s", type=float, default=None,
                    help="`distill evaluate --burst-s` of each run (default: evaluate's own default)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(tmp)
        student, one = load_model(ModelConfig(STUDENT)).module, torch.zeros(1, 40)  # one: (1, F)
        drift = measure_drift(lambda: student(one), args.drift_s, args.window)
        timing = timing_flags(args.min_timing_s, args.burst_s)
        runs = measure_runs(lambda: student(one), evaluate_command(paths, timing), args.runs, args.probe_s)
    spreads = {name: spread([r[name] for r in runs]) for name in FIGURES}
    print("spread (max/min - 1): " + ", ".join(f"{k} {v:.1%}" for k, v in spreads.items()), flush=True)
    settings = {**vars(args), "student": STUDENT, "teacher": TEACHER, "drift_threads": 1,
                "evaluate_command": " ".join(["python -m distill evaluate --model STUDENT --teacher TEACHER --data DATA "
                                              "--split train", *timing, "--json"]),
                "torch": torch.__version__, "cpus": os.cpu_count(), "machine": platform.machine()}
    print(json.dumps({"benchmark": "timing", "drift": drift, "runs": runs, "spread": spreads, "settings": settings}))


if __name__ == "__main__":
    main()
