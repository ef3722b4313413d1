"""Reduction benchmark: stage one's reduction of teacher logits to soft labels, alone, on the CPU.

    python benchmarks/reduction.py [--shape P V] [--rounds 7] [--threads N]

``topk_labels`` (what `distill generate-labels` runs on each chunk of positions, ``consume=True``
as it does) on random float32 logits (P, V) (default 1,024 x 32,000), for the settings that
matter: the causal-LM default (k = 4 with 48 tail draws), k = 64 with 48 tail draws, and
k = 64 alone, each storing the normalisers of T = 1 and 2, each by both paths: the compiled
reduction (``distill.storage.native``, what runs on a CPU with a C compiler) and plain torch
(``DISTILL_NATIVE=0``, what runs without one). Two kinds of logits: ``N(0, 3^2)``
(each row's max about 12, as a language model's), and the same minus 20 (every max below
0, as log-probabilities given as logits), which takes the shifted path of
``distill.storage.labels._Softmax``. Each setting is timed on a fresh copy of the logits,
``--rounds`` times in alternating rounds; the figure is the median (ms per call and ns per
logit), and ``speedup`` the median of each round's torch time over its compiled time. It
uses only ``topk_labels``, so the same file run against an older checkout measures that
checkout's reduction. Prints a line per setting, then one JSON object as the
last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from distill.storage import native
from distill.storage.labels import topk_labels

PATHS = {"compiled": "1", "torch": "0"}  # DISTILL_NATIVE
SETTINGS = {"k4_draws48": (4, 48), "k64_draws48": (64, 48), "k64": (64, 0)}
LOGITS = {"lm": 0.0, "below_zero": -20.0}  # added to N(0, 3^2) logits


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=2, type=int, default=(1024, 32000), metavar=("P", "V"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default, as stage one)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p, v = args.shape
    base = torch.randn(p, v, generator=torch.Generator().manual_seed(0)) * 3
    work = torch.empty_like(base)
    times: dict[tuple, list[float]] = {(s, kind, path): [] for kind in LOGITS for s in SETTINGS for path in PATHS}
    before = os.environ.get("DISTILL_NATIVE")
    try:
        for _ in range(args.rounds):
            for setting, kind, path in times:
                k, draws = SETTINGS[setting]
                os.environ["DISTILL_NATIVE"] = PATHS[path]
                torch.add(base, LOGITS[kind], out=work)  # a fresh copy: the reduction overwrites its input
                generator = torch.Generator().manual_seed(1)
                start = time.perf_counter()
                topk_labels(work, k, (1.0, 2.0), consume=True, tail_samples=draws, generator=generator, host=False)
                times[setting, kind, path].append(time.perf_counter() - start)
    finally:
        os.environ.pop("DISTILL_NATIVE") if before is None else os.environ.update(DISTILL_NATIVE=before)
    rows: dict[str, dict] = {}
    for (setting, kind, path), seconds in times.items():
        ms = statistics.median(seconds) * 1e3
        row = rows.setdefault(f"{setting}/{kind}", {})
        row[path] = {"ms": round(ms, 2), "ns_per_logit": round(ms * 1e6 / (p * v), 3)}
        print(f"{setting + '/' + kind:>24} {path:>8}: {ms:7.1f} ms per {p:,} x {v:,} "
              f"({row[path]['ns_per_logit']} ns per logit)", flush=True)
        if path == "torch":
            compiled = times[setting, kind, "compiled"]
            row["speedup"] = round(statistics.median([t / c for t, c in zip(seconds, compiled)]), 2)
    result = {"benchmark": "reduction", "positions": p, "vocab_size": v, "temperatures": [1.0, 2.0],
              "threads": torch.get_num_threads(), "rounds": args.rounds, "torch": torch.__version__,
              "compiled_available": native.library() is not None, "settings": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
