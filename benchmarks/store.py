"""Store benchmark: bytes, encode/decode speed and lossy-encoding error on LM-like labels.

Workload: seeded Zipf-shaped logits over random vocabulary permutations
(``distill.storage.synthetic.zipf_logits``), reduced to top-k soft labels by the same
function stage one uses, then written by the real writer to a local directory and read
back by the real reader (checksums, backend decode, decode to torch tensors), one core.

    python benchmarks/store.py [--quick] [--backend zarr|parquet]

Prints a table, then one JSON object as the last line. Speeds repeat the write and read
passes over the same distinct positions; bytes and KL are measured on those positions.

Rate control: each workload's ``sweep`` holds bytes/position and mean KL (T = 1 and 2) at
every ``--value-bits`` in SWEEP_BITS and lossless, on the same labels; ``k_sweep`` (the
largest vocabulary only) the same for other k at a few bits (its KL is over that k's k + 1
buckets). ``budget_point`` lists the settings at k = 50, V = 128,256 that reach issue 17's
budget target: mean KL <= 3e-2 in at most 0.8x the bytes of DistillKit's budget setting
(about 97 B/position; a figure quoted from the issue, DistillKit is not run here).

Real logits (``real``, with ``--real N``): benchmarks/quality.py's cached LM teacher
(.bench-quality/lm-shakespeare; skipped when absent) over N held-out sequences, stored
lossless at k = 64 by generate-labels, then cut to smaller k; per k the same sweep, the ids'
bytes against their entropy (uniform sets: log2 C(V, k); the ids' empirical unigram
entropy), and the ids' bytes after remapping ids by frequency rank (an experiment on the
ids column's codec alone; the store does not do it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numcodecs
import numpy as np
import torch

from distill.storage import BACKENDS, StoreSpec, ValueEncoding, create_store, open_store, topk_labels
from distill.storage.labels import concat_labels
from distill.storage.synthetic import zipf_logits

WORKLOADS = [(32000, 64), (128256, 50)]
SWEEP_BITS = (2, 3, 4, 5, 6, 8, 10, 12)
SWEEP_K = ((16, (4, 6, 8)), (32, (4, 6, 8)), (64, (4, 6)))  # (k, value bits) at the largest vocabulary
BUDGET = {"workload": "V128256_k50", "kl_mean_at_most": 3e-2, "bytes_per_position_at_most": 97.0,
          "source": "issue 17: 0.8x DistillKit's budget-setting bytes at its mean KL (~3e-2); not measured here"}


def make_labels(positions: int, vocab: int, k: int, seed: int, temperatures=(2.0,)):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for start in range(0, positions, 512):
        logits = zipf_logits(min(512, positions - start), vocab, g)  # (B, V)
        parts.append(topk_labels(logits, k, temperatures))
    return concat_labels(parts)


def bucket_kl(exact_lp, exact_tail, lp, tail) -> torch.Tensor:
    """KL(exact || decoded) per position over the k+1 buckets, float64. Both sorted by id."""
    p = torch.cat([exact_lp, exact_tail[:, None]], 1).double()
    q = torch.cat([lp, tail[:, None]], 1).double()
    return (p.exp() * (p - q)).nan_to_num(0.0).sum(1)


def sorted_by_id(labels):
    order = labels.topk_ids.argsort(1)
    return labels.topk_ids.gather(1, order), labels.topk_logprobs.gather(1, order)


def run_one(vocab, k, positions, repeats, backend, encoding, shard, tmp, labels=None):
    """Write and read ``labels`` (default: the workload's own) with ``encoding``; bytes, speeds and KL."""
    if labels is None:
        torch.set_num_threads(os.cpu_count() or 1)  # generating the teacher's logits is not what we time
        labels = make_labels(positions, vocab, k, seed=vocab + k)
    torch.set_num_threads(1)  # the writer and the reader are timed on one core
    positions = labels.num_positions
    spec = StoreSpec("topk", k=k, vocab_size=vocab, num_examples=labels.num_examples, examples_per_shard=shard,
                     temperatures=(1.0, 2.0), value_encoding=encoding, backend=backend,
                     has_token_index=labels.token_index is not None)
    name = encoding if isinstance(encoding, str) else f"{encoding.name}{encoding.levels}"
    path = os.path.join(tmp, f"{vocab}-{k}-{name}")
    t_enc = 0.0
    for _ in range(repeats):
        shutil.rmtree(path, ignore_errors=True)
        writer = create_store(path, spec)
        t0 = time.perf_counter()
        for i in range(spec.num_shards):
            a, b = spec.shard_range(i)
            writer.write_shard(i, labels.examples(a, b))
        t_enc += time.perf_counter() - t0
        writer.finalize()
    reader = open_store(path)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for decoded in reader.iter_shards():
            pass
    t_dec = time.perf_counter() - t0
    decoded = reader.read_all()
    ids, lp = sorted_by_id(labels)
    assert torch.equal(decoded.topk_ids, ids), "ids must round-trip exactly"
    kl = bucket_kl(lp, labels.tail_logprob, decoded.topk_logprobs, decoded.tail_logprob)
    lp2, tail2 = labels.tempered(2.0)
    exact2 = labels.__class__(**{**labels.__dict__, "topk_logprobs": lp2, "tail_logprob": tail2})
    d2_lp, d2_tail = decoded.tempered(2.0)
    kl2 = bucket_kl(sorted_by_id(exact2)[1], tail2, d2_lp, d2_tail)
    s = reader.summary()
    by_column = {}
    for record in reader.records.values():
        for rel, meta in record.files.items():
            column = rel.split("/")[0] if "/" in rel else rel
            by_column[column] = by_column.get(column, 0) + meta["bytes"]
    return {
        "bytes_by_file_per_position": {c: round(b / positions, 3) for c, b in sorted(by_column.items())},
        "bytes_per_position": s["bytes_per_position"],
        "bytes_per_entry": s["bytes_per_entry"],
        "encode_positions_per_s": positions * repeats / t_enc,
        "decode_positions_per_s": positions * repeats / t_dec,
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "kl_mean_t2": float(kl2.mean()),
        "topk_mass_mean": s["topk_mass_mean"],
    }


def rate_point(r: dict) -> dict:
    """The rate-control figures of one run_one result."""
    return {"bytes_per_position": r["bytes_per_position"], "kl_mean": r["kl_mean"], "kl_mean_t2": r["kl_mean_t2"],
            "values_bytes_per_position": r["bytes_by_file_per_position"].get("logprob_codes",
                                                                             r["bytes_by_file_per_position"].get("logprobs")),
            "ids_bytes_per_position": r["bytes_by_file_per_position"].get("ids_delta")}


def sweep(vocab, k, bits, positions, backend, shard, tmp, seed) -> dict:
    """{"bits4": point, ..., "lossless": point} for one (V, k) on the same labels (see rate_point)."""
    torch.set_num_threads(os.cpu_count() or 1)
    labels = make_labels(positions, vocab, k, seed=seed)
    out = {}
    for b in bits:
        out[f"bits{b}"] = rate_point(run_one(vocab, k, positions, 1, backend, ValueEncoding.from_bits(b), shard, tmp, labels))
    out["lossless"] = rate_point(run_one(vocab, k, positions, 1, backend, "lossless", shard, tmp, labels))
    return out


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(REPO, ".bench-quality", "lm-shakespeare")  # benchmarks/quality.py's LM workload
REAL_KS = (16, 32, 50, 64)


def real_labels(sequences: int, tmp: str):
    """Lossless top-64 labels of the cached LM teacher over ``sequences`` held-out sequences (None: not cached)."""
    from distill.stages.generate import GenerateConfig, generate_labels

    teacher = os.path.join(REAL, "teacher", "model")
    if not os.path.isdir(teacher):
        return None
    out = os.path.join(tmp, "real-lossless")
    torch.set_num_threads(os.cpu_count() or 1)
    generate_labels(GenerateConfig(teacher=teacher, data=os.path.join(REAL, "corpus"), split="test", limit=sequences,
                                   tokenizer=os.path.join(REAL, "tokenizer"), seq_len=128, k=max(REAL_KS), tail_samples=0,
                                   value_encoding="lossless", out=out, device="cpu", progress=False))
    reader = open_store(out)
    return reader.read_all(), reader.spec.vocab_size


def head(labels, k: int):
    """The top ``k`` of top-K labels: the dropped entries join the tail; ids ascending again."""
    lp, order = labels.topk_logprobs.topk(k, dim=1)  # (P, k)
    dropped = labels.topk_logprobs.scatter(1, order, float("-inf")).logsumexp(1)  # (P,)
    ids, by_id = labels.topk_ids.gather(1, order).sort(1)
    return dataclasses.replace(labels, topk_ids=ids, topk_logprobs=lp.gather(1, by_id),
                               tail_logprob=torch.logaddexp(labels.tail_logprob, dropped), tail_ids=None, tail_counts=None)


def ids_codec_bytes(ids: torch.Tensor, vocab: int) -> int:
    """Bytes of ascending ids (P, k) as the zarr backend stores them: gaps, blosc zstd 5 with bit shuffle."""
    gaps = ids.clone()
    gaps[:, 1:] -= ids[:, :-1]
    array = np.ascontiguousarray(gaps.numpy().astype(np.uint16 if vocab <= 1 << 16 else np.uint32))
    return len(numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE).encode(array))


def id_entropy(labels, vocab: int) -> dict:
    """Ids' bytes/position stored (this codec) and remapped by frequency rank, against entropy estimates."""
    ids, (p, k) = labels.topk_ids, labels.topk_ids.shape
    freq = torch.bincount(ids.flatten(), minlength=vocab).double()
    f = freq[freq > 0] / freq.sum()
    unigram = float(-(f * f.log2()).sum())  # bits per id, ignoring that a position's ids are a set
    rank = torch.empty(vocab, dtype=torch.int64)
    rank[freq.argsort(descending=True)] = torch.arange(vocab)  # most frequent id -> 0
    remapped = rank[ids].sort(1).values
    return {"ids_bytes_per_position": ids_codec_bytes(ids, vocab) / p,
            "ids_bytes_per_position_freq_remap": ids_codec_bytes(remapped, vocab) / p,
            "uniform_set_bytes_per_position": math.log2(math.comb(vocab, k)) / 8,
            "unigram_bits_per_id": unigram,
            "unigram_set_bytes_per_position": (k * unigram - math.lgamma(k + 1) / math.log(2)) / 8,
            "distinct_ids": int((freq > 0).sum())}


def real_workload(sequences, bits, backend, tmp) -> dict:
    """Per k: the sweep and the ids' entropy figures on the real teacher's labels (None: teacher not cached)."""
    got = real_labels(sequences, tmp)
    if got is None:
        return {"skipped": f"no cached teacher under {REAL}: run benchmarks/quality.py first"}
    labels, vocab = got
    out = {"teacher": os.path.relpath(REAL, REPO), "sequences": labels.num_examples, "positions": labels.num_positions,
           "vocab_size": vocab}
    for k in REAL_KS:
        part = head(labels, k)
        points = {f"bits{b}": rate_point(run_one(vocab, k, 0, 1, backend, ValueEncoding.from_bits(b), 1 << 20, tmp, part))
                  for b in bits}
        points["lossless"] = rate_point(run_one(vocab, k, 0, 1, backend, "lossless", 1 << 20, tmp, part))
        out[f"k{k}"] = {"sweep": points, **id_entropy(part, vocab),
                        "topk_mass_mean": float((-part.tail_logprob.double().expm1()).mean())}
    return out


def budget_point(results: dict) -> dict:
    """The sweep's settings that meet BUDGET, cheapest first, and the cheapest overall with its KL."""
    points = results[BUDGET["workload"]]["sweep"]
    ok = sorted((p["bytes_per_position"], name) for name, p in points.items()
                if p["kl_mean"] <= BUDGET["kl_mean_at_most"] and p["bytes_per_position"] <= BUDGET["bytes_per_position_at_most"])
    return {**BUDGET, "meeting": [name for _, name in ok],
            "cheapest": min(points, key=lambda n: points[n]["bytes_per_position"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (under a minute on 2 cores)")
    ap.add_argument("--backend", default="zarr", choices=BACKENDS)
    ap.add_argument("--positions", type=int, default=0, help="override the number of distinct positions")
    ap.add_argument("--no-sweep", action="store_true", help="skip the rate-control sweeps (bits and k)")
    ap.add_argument("--real", type=int, default=0, metavar="N",
                    help="also the real-logits workload over N held-out sequences of the cached LM teacher")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    positions, repeats, shard = (2048, 5, 2048) if args.quick else (32768, 3, 8192)
    positions = args.positions or positions
    results = {"backend": args.backend, "quick": args.quick, "positions": positions, "generator": "zipf_logits s~U[1,2], noise 0.3"}
    tmp = tempfile.mkdtemp(prefix="distill-bench-")
    try:
        for vocab, k in WORKLOADS:
            key = f"V{vocab}_k{k}"
            lossy = run_one(vocab, k, positions, repeats, args.backend, "sqrt", shard, tmp)
            lossless = run_one(vocab, k, positions, 1, args.backend, "lossless", shard, tmp)
            id_bits = math.ceil(math.log2(vocab))
            results[key] = {
                **lossy,
                "lossless_bytes_per_position": lossless["bytes_per_position"],
                "lossless_decode_positions_per_s": lossless["decode_positions_per_s"],
                "naive_bytes_per_position": 8 * k,  # int32 ids + float32 values
                "packed_bytes_per_position": math.ceil(k * id_bits / 8) + 2 * k,  # ceil(log2 V)-bit ids + bf16
                "id_entropy_bits": math.log2(math.comb(vocab, k)) / k,
            }
            if not args.no_sweep:  # same seed as above: the same labels
                results[key]["sweep"] = sweep(vocab, k, SWEEP_BITS, positions, args.backend, shard, tmp, vocab + k)
        if not args.no_sweep:
            vocab = WORKLOADS[-1][0]
            results["k_sweep"] = {f"V{vocab}_k{k}": sweep(vocab, k, bits, positions, args.backend, shard, tmp, vocab + k)
                                  for k, bits in SWEEP_K}
            results["budget_point"] = budget_point(results)
        if args.real:
            results["real"] = real_workload(args.real, SWEEP_BITS, args.backend, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for key, r in results.items():
        if isinstance(r, dict) and "bytes_per_position" in r:
            print(f"{key}: {r['bytes_per_position']:.1f} B/pos ({r['bytes_per_entry']:.3f} B/entry; lossless "
                  f"{r['lossless_bytes_per_position']:.1f}, naive {r['naive_bytes_per_position']}, packed "
                  f"{r['packed_bytes_per_position']}), KL {r['kl_mean']:.2e} (T=2: {r['kl_mean_t2']:.2e}), "
                  f"encode {r['encode_positions_per_s']:,.0f}/s, decode {r['decode_positions_per_s']:,.0f}/s", file=sys.stderr)
        for name, p in (r.get("sweep", {}) if isinstance(r, dict) else {}).items():
            print(f"  {name:>8}: {p['bytes_per_position']:6.1f} B/pos, KL {p['kl_mean']:.2e} (T=2: {p['kl_mean_t2']:.2e})",
                  file=sys.stderr)
    for key, points in results.get("k_sweep", {}).items():
        for name, p in points.items():
            print(f"{key} {name:>8}: {p['bytes_per_position']:6.1f} B/pos, KL {p['kl_mean']:.2e}", file=sys.stderr)
    for key, r in results.get("real", {}).items():
        if isinstance(r, dict):
            print(f"real {key}: ids {r['ids_bytes_per_position']:.1f} B/pos (freq remap "
                  f"{r['ids_bytes_per_position_freq_remap']:.1f}; uniform sets {r['uniform_set_bytes_per_position']:.1f}, "
                  f"unigram sets {r['unigram_set_bytes_per_position']:.1f}); "
                  + ", ".join(f"{n} {p['bytes_per_position']:.1f} B KL {p['kl_mean']:.1e}" for n, p in r["sweep"].items()),
                  file=sys.stderr)
    if "budget_point" in results:
        print(f"budget point (KL <= 3e-2, <= 97 B/pos at V128256_k50): {results['budget_point']['meeting'] or 'none'}",
              file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
