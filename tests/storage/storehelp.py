"""Helpers shared by the store tests: seeded ragged labels and a one-call store writer."""

import torch

from distill.storage import StoreSpec, create_store, sampled_labels, topk_labels
from distill.storage.synthetic import zipf_logits

V, K = 300, 8


def make_labels(method: str, n_examples: int = 23, seed: int = 0, temperatures=(2.0, 4.0), token_index=False,
                tail_samples: int = 0):
    """Ragged labels for ``n_examples`` examples (0 to 4 positions each) from seeded logits."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (n_examples,), generator=g)
    logits = zipf_logits(int(lengths.sum()), V, g)
    if method == "topk":
        labels = topk_labels(logits, K, temperatures, lengths=lengths, tail_samples=tail_samples, generator=g)
    else:
        labels = sampled_labels(logits, K, temperatures, lengths=lengths, generator=g)
    if token_index:
        labels.token_index = torch.cat([torch.arange(int(n), dtype=torch.int32) * 2 for n in lengths])
    return labels


def write_store(url, labels, method="topk", backend="zarr", encoding="lossless", per_shard=5, finalize=True, **kw):
    spec = StoreSpec(method, k=K, vocab_size=V, num_examples=labels.num_examples, examples_per_shard=per_shard,
                     temperatures=(1.0, *labels.temperatures), value_encoding=encoding, backend=backend,
                     teacher_fingerprint="teacher-a", dataset_fingerprint="data-a",
                     has_token_index=labels.token_index is not None, **kw)
    writer = create_store(str(url), spec)
    for i in writer.pending_shards():
        a, b = spec.shard_range(i)
        writer.write_shard(i, labels.examples(a, b))
    if finalize:
        writer.finalize()
    return writer


def by_id(labels):
    """(ids, logprobs, counts) sorted ascending by id within each position."""
    order = labels.topk_ids.argsort(dim=1, stable=True)
    counts = None if labels.counts is None else labels.counts.gather(1, order)
    return labels.topk_ids.gather(1, order), labels.topk_logprobs.gather(1, order), counts


