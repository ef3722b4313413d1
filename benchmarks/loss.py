"""Loss benchmark: the distillation loss alone (forward and backward) against cross-entropy, on the CPU.

    python benchmarks/loss.py [--shape P V] ... [--k 64 (at most V)] [--temperature 2] [--alpha 0.5] [--rounds 7]

Random logits, top-k labels with the tail from the teacher's own logits (``topk_labels``; their
tempered log-probabilities worked out ahead, ``with_tempered``, as train-student's stream does),
``TopKDistillationLoss("kl", T, alpha)`` as train-student builds it (``default``: the fused loss
from 1,024 outputs, the dense one of ``distill.pipeline.fused.dense_bucket_loss`` below), ``fused=True``
and ``fused=False`` (the plain autograd loss), and ``F.cross_entropy`` on the same student logits, each timed for 10 steps per
round in alternating rounds on one intra-op thread; the figure is the median round. Prints a
line per shape, then one JSON object as the last line. It uses only the public API, so the
same file run against an older checkout measures that checkout's loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from distill.pipeline.losses import TopKDistillationLoss
from distill.storage.labels import topk_labels


def time_shape(p: int, v: int, k: int, temperature: float, alpha: float, rounds: int) -> dict:
    k = min(k, v)  # a classifier's labels keep every class
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(p, v, generator=g) * 3
    student = (torch.randn(p, v, generator=g) * 3).requires_grad_()
    labels = topk_labels(teacher, k, temperatures=(temperature,) if temperature != 1.0 else ())
    labels = labels.with_tempered(temperature)  # as train-student's stream hands them to the loss
    hard = teacher.argmax(1)
    losses = {"default": TopKDistillationLoss("kl", temperature, alpha),
              "fused": TopKDistillationLoss("kl", temperature, alpha, fused=True),
              "plain": TopKDistillationLoss("kl", temperature, alpha, fused=False)}

    def step(name):
        student.grad = None
        if name == "cross_entropy":
            F.cross_entropy(student, hard).backward()
        else:
            losses[name](student, labels, hard)["loss"].backward()

    names = ["cross_entropy", "default", "fused", "plain"]
    times = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            for _ in range(2):
                step(name)
            start = time.perf_counter()
            for _ in range(10):
                step(name)
            times[name].append((time.perf_counter() - start) / 10 * 1e3)
    ms = {n: statistics.median(t) for n, t in times.items()}
    return {"positions": p, "vocab_size": v, "k": k, **{f"{n}_ms": round(m, 2) for n, m in ms.items()},
            "fused_vs_ce": round(ms["fused"] / ms["cross_entropy"], 3),
            "default_vs_ce": round(ms["default"] / ms["cross_entropy"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=2, type=int, action="append", metavar=("P", "V"),
                    help="positions and vocabulary (default: 256 10, 512 4096 and 2048 32000)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for p, v in args.shape or [(256, 10), (512, 4096), (2048, 32000)]:
        r = time_shape(p, v, args.k, args.temperature, args.alpha, args.rounds)
        print(f"{p} x {v}: default {r['default_ms']} ms, fused {r['fused_ms']} ms, plain {r['plain_ms']} ms, cross-entropy {r['cross_entropy_ms']} ms",
              flush=True)
        rows.append(r)
    print(json.dumps({"benchmark": "loss", "k": args.k, "temperature": args.temperature, "alpha": args.alpha,
                      "threads": 1, "rounds": args.rounds, "shapes": rows}))


if __name__ == "__main__":
    main()
