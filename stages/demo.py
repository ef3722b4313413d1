"""`distill demo`: for now, the soft-label store end to end on generated teacher outputs.

Until the stages land (generate-labels, train-student), the demo writes LM-like teacher
distributions (seeded, ``distill.storage.synthetic``) to a store with the default lossy
encoding and losslessly, reads both back, and prints what each costs and how far the
default encoding is from the exact labels.
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from distill.storage import StoreSpec, concat_labels, create_store, open_store, topk_labels
from distill.storage.synthetic import zipf_logits

__all__ = ["run_demo"]


def _write(url: str, labels, encoding: str, vocab: int, k: int, per_shard: int) -> float:
    spec = StoreSpec("topk", k=k, vocab_size=vocab, num_examples=labels.num_examples, examples_per_shard=per_shard,
                     temperatures=(1.0, 2.0), value_encoding=encoding, teacher_fingerprint="synthetic-zipf",
                     dataset_fingerprint="synthetic-zipf-seed0")
    writer = create_store(url, spec, overwrite=True)
    t0 = time.perf_counter()
    for i in writer.pending_shards():
        a, b = spec.shard_range(i)
        writer.write_shard(i, labels.examples(a, b))
    writer.finalize()
    return time.perf_counter() - t0


def run_demo(out_dir: str, examples: int = 64, seq_len: int = 128, vocab: int = 32000, k: int = 64) -> dict:
    """Write and read back a store of ``examples`` sequences of ``seq_len`` positions."""
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    print(f"teacher: synthetic LM distributions, vocabulary {vocab:,}; {examples} sequences x {seq_len} tokens; top-{k}")
    parts = [topk_labels(zipf_logits(seq_len, vocab, g), k, (2.0,), lengths=[seq_len]) for _ in range(examples)]
    labels = concat_labels(parts)
    rows = []
    for encoding in ("sqrt", "lossless"):
        url = os.path.join(out_dir, f"labels-{encoding}.zarr")
        seconds = _write(url, labels, encoding, vocab, k, per_shard=16)
        reader = open_store(url)
        assert reader.verify() == []
        back = reader.read_all()
        order = labels.topk_ids.argsort(dim=1)
        p = torch.cat([labels.topk_logprobs.gather(1, order), labels.tail_logprob[:, None]], 1).double()
        q = torch.cat([back.topk_logprobs, back.tail_logprob[:, None]], 1).double()
        kl = float((p.exp() * (p - q)).sum(1).mean())
        s = reader.summary()
        rows.append((encoding, s, kl, seconds))
    print(f"{'encoding':<10}{'bytes/position':>16}{'bytes/entry':>13}{'mean KL (nats)':>16}{'write s':>9}")
    for encoding, s, kl, seconds in rows:
        print(f"{encoding:<10}{s['bytes_per_position']:>16.1f}{s['bytes_per_entry']:>13.3f}{kl:>16.2e}{seconds:>9.2f}")
    naive = 8 * k
    print(f"naive int32 ids + float32 values: {naive} bytes/position; top-{k} mass mean {rows[0][1]['topk_mass_mean']:.3f}")
    print(f"stores written under {out_dir}/ — look inside with: distill inspect {out_dir}/labels-sqrt.zarr")
    shutil.rmtree(os.path.join(out_dir, "labels-lossless.zarr"), ignore_errors=True)
    return {enc: s for enc, s, _, _ in rows}
