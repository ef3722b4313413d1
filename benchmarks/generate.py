"""Stage-one benchmark: what writing the store costs on top of the teacher's forward passes.

For each workload, on the same device, with the same teacher and the same batches:

- ``teacher_only_positions_per_s``: the teacher's forward passes alone (batches built by
  the data module, moved to the device, outputs discarded);
- ``generate_positions_per_s``: the whole `distill generate-labels` path
  (``distill.generate_labels``: load, fingerprint, forward, top-k on the device, encode,
  write, commit, finalize) writing a real store to a temporary directory;
- ``overhead_ratio = generate / teacher_only`` (target: at least 0.95);
- ``loop_overhead_ratio``: the same for the labelling loop alone, without the fixed
  set-up (loading, fingerprinting, creating and sealing the store: ``setup_seconds``),
  which a long job amortises.

The two are run alternately ``--repeats`` times and the median of each is reported; each
ratio is the median of the rounds' own ratios (a round's two runs are seconds apart, so the
host's slower drift cancels), and ``overhead_ratio_of_medians`` the ratio of the medians.

Workloads: ``lm``, a causal LM teacher of GPT-2 small's shape (768 wide, 12 layers) with a
32,000-token vocabulary (built-in ``gpt``, random weights, k=64, temperatures 1 and 2)
over random token sequences; ``lm-small``, the same with a 19M-parameter teacher (384
wide, 4 layers), where the fixed cost of reducing 32,000 logits per position weighs more;
``classifier``, a built-in 1-D CNN over mnist1d-shaped inputs (k=5 of 10 classes).

Memory at the default shard size (``memory_default_shards``, with ``--memory-default-shards N``,
not run otherwise: about 6 s per shard here): the same command with the default shard size
(65,536 positions: 1,024 sequences of 64 tokens), a teacher with a vocabulary of 4,096, k = 64
(and the causal LM's default tail draws), over N shards' worth of data and 10 N. There the
peak rose over the first shards and then levelled off: a longer job more often meets the moments when a
batch's teacher logits and a shard's encoding are alive at once (freed shard buffers also stayed in the heap,
glibc's dynamic mmap threshold). The writer now gives each written shard's buffers back and holds ids as int32,
and the two sizes peak within 3% (see the README).
``MALLOC_MMAP_THRESHOLD_=131072`` in the environment changes the allocator's side, and the JSON records it.

Memory (``memory``): `distill generate-labels` (the real CLI, in a subprocess) on two Parquet
files of token ids (a ``input_ids`` list column, as users write them) 10 times apart in size,
with a small teacher (vocabulary 1,024, 64-token sequences, k=16) and 64-example shards,
so that both runs are past the bound a shard's buffer sets. Each run's peak RSS is the
process's ``ru_maxrss`` plus its children's, taken at exit; ``peak_rss_ratio = large / small``
(target at most 1.05): the data is read a batch of rows at a time into temporary files
(``distill.pipeline.diskarrays``) and the store is written a shard at a time, so neither
stays in memory.

    python benchmarks/generate.py [--quick] [--workload lm|classifier|all|none] [--device auto] [--precision auto]
                                  [--memory-default-shards N]

Prints one line per workload, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distill.pipeline.data import DataConfig, load_data
from distill.pipeline.models import ModelConfig, float32_output_layer, load_model
from distill.pipeline.runtime import PRECISIONS, autocast, resolve_device, weight_dtype
from distill.stages.generate import GenerateConfig, generate_labels
from peakrss import peak_rss_mb  # benchmarks/peakrss.py, beside this script

WORKLOADS = {
    # name: teacher spec, examples (full, quick), sequence length, k, batch size
    "lm": dict(teacher="gpt:vocab_size=32000,d_model=768,n_layers=12,n_heads=12,max_len=128",  # GPT-2 small's shape
               examples=(128, 12), seq_len=128, k=64, batch_size=4),
    "lm-small": dict(teacher="gpt:vocab_size=32000,d_model=384,n_layers=4,n_heads=6,max_len=128",
                     examples=(384, 32), seq_len=128, k=64, batch_size=8),
    "classifier": dict(teacher="cnn:channels=256,depth=4", examples=(32768, 4096), seq_len=None, k=5, batch_size=512),
}
MEMORY = dict(teacher="gpt:vocab_size=1024,d_model=32,n_layers=1,n_heads=2,max_len=64", vocab_size=1024, seq_len=64,
              k=16, batch_size=64, examples_per_shard=64,
              examples=(4096, 128))  # the small data (full, quick); the large one is 10 times bigger

def write_data(name: str, n: int, seq_len: int | None, tmp: str, vocab_size: int = 32000) -> str:
    """A Parquet file of seeded inputs: token ids for the LM, 40 float features for the classifier."""
    rng = np.random.default_rng(0)
    if seq_len is not None:
        ids = rng.integers(0, vocab_size, size=(n, seq_len), dtype=np.int64)
        table = pa.table({"input_ids": pa.array(list(ids))})
    else:
        x = rng.standard_normal((n, 40), dtype=np.float32)
        table = pa.table({"inputs": pa.array(list(x)), "label": rng.integers(0, 10, n)})
    path = os.path.join(tmp, f"{name}.parquet")
    pq.write_table(table, path)
    return path


def teacher_only(config: GenerateConfig, device: torch.device) -> tuple[float, int]:
    """Forward passes over the batches generate-labels would run; returns (seconds, positions)."""
    teacher = load_model(ModelConfig(config.teacher), device=device, dtype=weight_dtype(config.precision, device))
    float32_output_layer(teacher)  # as generate-labels runs it
    data = load_data(DataConfig(config.data, task=teacher.task, tokenizer=config.tokenizer))
    positions = 0
    start = time.perf_counter()
    with torch.inference_mode(), autocast(config.precision, device):
        for a in range(0, len(data), config.batch_size):
            batch = data.gather(torch.arange(a, min(a + config.batch_size, len(data))))  # as generate-labels builds them
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            teacher.logits(batch)
            positions += len(batch["position_index"]) if "position_index" in batch else len(next(iter(batch.values())))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, positions


def generate(config: GenerateConfig, tmp: str, name: str, round_: int) -> tuple[float, int, float]:
    """The whole generate-labels call; returns (wall seconds, positions, seconds of the labelling loop)."""
    out = os.path.join(tmp, f"{name}-store-{round_}")
    start = time.perf_counter()
    result = generate_labels(dataclasses.replace(config, out=out))
    seconds = time.perf_counter() - start
    return seconds, result["positions"], result["seconds"]


def _paired(num: list[float], den: list[float]) -> float:
    """The median over rounds of num[r] / den[r]."""
    return statistics.median(a / b for a, b in zip(num, den))


def run_workload(name: str, quick: bool, device_name: str, repeats: int, tmp: str, examples: int | None = None,
                 precision: str = "auto") -> dict:
    w = WORKLOADS[name]
    n = examples or w["examples"][1 if quick else 0]
    data = write_data(name, n, w["seq_len"], tmp)
    device = resolve_device(device_name)
    config = GenerateConfig(teacher=w["teacher"], data=data, out=os.path.join(tmp, "unused"), k=w["k"],
                            batch_size=w["batch_size"], device=device_name, progress=False, precision=precision,
                            task="causal-lm" if w["seq_len"] else "classification")
    teacher_runs, generate_runs, loop_runs, setup = [], [], [], []
    positions = None
    teacher_only(config, device)  # warm-up: first-call allocations, lazy imports
    for r in range(repeats):
        s, p = teacher_only(config, device)
        teacher_runs.append(p / s)
        s, q, loop = generate(config, tmp, name, r)
        generate_runs.append(q / s)
        loop_runs.append(q / loop)
        setup.append(s - loop)
        assert p == q, f"teacher-only saw {p} positions, generate-labels {q}"
        positions = p
    t, g = statistics.median(teacher_runs), statistics.median(generate_runs)
    params = sum(p.numel() for p in load_model(ModelConfig(config.teacher)).module.parameters())
    return {
        "teacher": w["teacher"], "teacher_params": params, "examples": n, "positions": positions, "k": w["k"],
        "batch_size": w["batch_size"], "device": str(device), "precision": precision, "repeats": repeats,
        "teacher_only_positions_per_s": round(t, 1), "generate_positions_per_s": round(g, 1),
        "overhead_ratio": round(_paired(generate_runs, teacher_runs), 4),
        "overhead_ratio_of_medians": round(g / t, 4),
        # the labelling loop alone (no model load, fingerprints, store creation or sealing)
        "generate_loop_positions_per_s": round(statistics.median(loop_runs), 1),
        "loop_overhead_ratio": round(_paired(loop_runs, teacher_runs), 4),
        "setup_seconds": round(statistics.median(setup), 2),
        "teacher_only_runs": [round(x, 1) for x in teacher_runs], "generate_runs": [round(x, 1) for x in generate_runs],
    }


# --- memory: the real CLI in a subprocess, at two data sizes --------------------------------

def generate_peak_rss_mb(data: str, out: str, device: str, m: dict = MEMORY) -> float:
    """Peak RSS (MB) of `distill generate-labels` over ``data`` with the settings ``m`` (no ``examples_per_shard``:
    the default shard size): the process's plus its children's."""
    shards = ["--examples-per-shard", str(m["examples_per_shard"])] if "examples_per_shard" in m else []
    own, children = peak_rss_mb(
        ["generate-labels", "--teacher", m["teacher"], "--data", data, "--out", out, "--k", str(m["k"]),
         "--batch-size", str(m["batch_size"]), "--device", device, *shards,
         "--task", "causal-lm", "--seq-len", str(m["seq_len"]), "--no-progress"], out + ".rss.json")
    return own + children


def run_memory(quick: bool, device: str, tmp: str, examples: int | None) -> dict:
    """generate-labels' peak RSS on data 10 times apart in size."""
    m = MEMORY
    sizes = {"small": examples or m["examples"][quick]}
    sizes["large"] = 10 * sizes["small"]
    rss, positions = {}, {}
    for label, n in sizes.items():
        data = write_data(f"memory-{label}", n, m["seq_len"], tmp, m["vocab_size"])
        start = time.perf_counter()
        rss[label] = generate_peak_rss_mb(data, os.path.join(tmp, f"memory-{label}-store"), device)
        positions[label] = n * m["seq_len"]
        print(f"    memory: {n:,} examples, peak RSS {rss[label]:.0f} MB ({time.perf_counter() - start:.1f} s)",
              file=sys.stderr)
    return {"teacher": m["teacher"], "seq_len": m["seq_len"], "k": m["k"], "batch_size": m["batch_size"],
            "examples_per_shard": m["examples_per_shard"],
            "data": "parquet input_ids", **{f"examples_{k}": n for k, n in sizes.items()},
            **{f"positions_{k}": p for k, p in positions.items()},
            **{f"peak_rss_mb_{k}": round(v, 1) for k, v in rss.items()},
            "peak_rss_ratio": round(rss["large"] / rss["small"], 4), "target_peak_rss_ratio": 1.05}


DEFAULT_SHARDS = dict(teacher="gpt:vocab_size=4096,d_model=32,n_layers=1,n_heads=2,max_len=64", vocab_size=4096,
                      seq_len=64, k=64, batch_size=64, sequences_per_shard=1024)


def run_memory_default_shards(shards: int, device: str, tmp: str) -> dict:
    """generate-labels' peak RSS over ``shards`` and 10x as many shards of the default size."""
    m = DEFAULT_SHARDS
    rss = {}
    for label, n in (("small", shards), ("large", 10 * shards)):
        data = write_data(f"default-shards-{n}", n * m["sequences_per_shard"], m["seq_len"], tmp, m["vocab_size"])
        start = time.perf_counter()
        rss[label] = generate_peak_rss_mb(data, os.path.join(tmp, f"default-shards-{n}-store"), device, m)
        print(f"    memory, default shards: {n} shards, peak RSS {rss[label]:.0f} MB "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return {**m, "shards_small": shards, "shards_large": 10 * shards,
            "positions_per_shard": m["sequences_per_shard"] * m["seq_len"],
            **{f"peak_rss_mb_{k}": round(v, 1) for k, v in rss.items()},
            "peak_rss_ratio": round(rss["large"] / rss["small"], 4), "target_peak_rss_ratio": 1.05,
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs: under a minute on 2 CPU cores")
    parser.add_argument("--workload", choices=[*WORKLOADS, "all", "none"], default="all",
                        help="none: only the memory checks asked for (--only-memory, --memory-default-shards)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="generate-labels' --precision (auto: a bf16 teacher on CUDA, fp32 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 3, quick 2)")
    parser.add_argument("--examples", type=int, default=None, help="override the workload's number of examples")
    parser.add_argument("--memory-examples", type=int, default=None,
                        help="examples of the small data of the memory check (the large one has 10 times more)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory check (it runs with --workload all, the default, or --only-memory)")
    parser.add_argument("--only-memory", action="store_true", help="run the memory check alone")
    parser.add_argument("--memory-default-shards", type=int, default=0, metavar="N",
                        help="also measure peak RSS over N and 10 N shards of the default size (about 6 s a shard)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    names = ([] if args.only_memory or args.workload == "none" else list(WORKLOADS) if args.workload == "all"
             else [args.workload])
    results, memory, default_shards = {}, None, None
    with tempfile.TemporaryDirectory(prefix="distill-bench-gen-") as tmp:
        for name in names:
            results[name] = r = run_workload(name, args.quick, args.device, repeats, tmp, args.examples, args.precision)
            print(f"{name:>10}: teacher only {r['teacher_only_positions_per_s']:>10,.0f} pos/s, "
                  f"generate-labels {r['generate_positions_per_s']:>10,.0f} pos/s, ratio {r['overhead_ratio']:.3f} "
                  f"(loop alone {r['loop_overhead_ratio']:.3f}; set-up {r['setup_seconds']:.1f} s)",
                  file=sys.stderr)
        if args.only_memory or (args.workload == "all" and not args.no_memory):
            memory = run_memory(args.quick, "cpu" if args.device == "auto" else args.device, tmp,
                                args.memory_examples)
            print(f"    memory: generate-labels peak RSS {memory['peak_rss_mb_small']:.0f} MB at "
                  f"{memory['positions_small']:,} positions, {memory['peak_rss_mb_large']:.0f} MB at "
                  f"{memory['positions_large']:,} (ratio {memory['peak_rss_ratio']:.3f})", file=sys.stderr)
        if args.memory_default_shards:
            default_shards = run_memory_default_shards(args.memory_default_shards,
                                                       "cpu" if args.device == "auto" else args.device, tmp)
    out = {
        "benchmark": "generate", "quick": args.quick, "target_overhead_ratio": 0.95,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.machine(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__},
        "workloads": results, "memory": memory, "memory_default_shards": default_shards,
        "meets_target": all(r["overhead_ratio"] >= 0.95 for r in results.values()) if results else None,
        "meets_memory_target": None if memory is None else memory["peak_rss_ratio"] <= 1.05,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
