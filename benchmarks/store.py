"""Store benchmark: bytes, encode/decode speed and lossy-encoding error on LM-like labels.

Workload: seeded Zipf-shaped logits over random vocabulary permutations
(``distill.storage.synthetic.zipf_logits``), reduced to top-k soft labels by the same
function stage one uses, then written by the real writer to a local directory and read
back by the real reader (checksums, backend decode, decode to torch tensors), one core.

    python benchmarks/store.py [--quick] [--backend zarr|parquet]

Prints a table, then one JSON object as the last line. Speeds repeat the write and read
passes over the same distinct positions; bytes and KL are measured on those positions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numcodecs
import torch

from distill.storage import BACKENDS, StoreSpec, create_store, open_store, topk_labels
from distill.storage.labels import concat_labels
from distill.storage.synthetic import zipf_logits

WORKLOADS = [(32000, 64), (128256, 50)]


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


def run_one(vocab, k, positions, repeats, backend, encoding, shard, tmp):
    torch.set_num_threads(os.cpu_count() or 1)  # generating the teacher's logits is not what we time
    labels = make_labels(positions, vocab, k, seed=vocab + k)
    torch.set_num_threads(1)  # the writer and the reader are timed on one core
    spec = StoreSpec("topk", k=k, vocab_size=vocab, num_examples=positions, examples_per_shard=shard,
                     temperatures=(1.0, 2.0), value_encoding=encoding, backend=backend)
    path = os.path.join(tmp, f"{vocab}-{k}-{encoding}")
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (under a minute on 2 cores)")
    ap.add_argument("--backend", default="zarr", choices=BACKENDS)
    ap.add_argument("--positions", type=int, default=0, help="override the number of distinct positions")
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for key, r in results.items():
        if isinstance(r, dict):
            print(f"{key}: {r['bytes_per_position']:.1f} B/pos ({r['bytes_per_entry']:.3f} B/entry; lossless "
                  f"{r['lossless_bytes_per_position']:.1f}, naive {r['naive_bytes_per_position']}, packed "
                  f"{r['packed_bytes_per_position']}), KL {r['kl_mean']:.2e} (T=2: {r['kl_mean_t2']:.2e}), "
                  f"encode {r['encode_positions_per_s']:,.0f}/s, decode {r['decode_positions_per_s']:,.0f}/s", file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
