"""Figures about a store's labels: the top-k mass per position, its percentiles and histogram, the entropy.

``topk_mass_sum`` is what a commit record's ``stats`` hold; ``label_figures`` reads the
shards themselves (one decoded shard in memory at a time) for what `distill inspect` and
`distill report` show.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from distill.errors import CorruptStoreError
from distill.storage.labels import SoftLabels

__all__ = ["MASS_BINS", "FIGURES_BYTES", "topk_mass", "topk_mass_sum", "figure_shards", "label_figures"]

MASS_BINS = 100_000  # fine bins of the top-k mass: label_figures' percentiles are exact to 1e-5
FIGURES_BYTES = 1 << 30  # label_figures reads stores up to this payload whole, larger ones a sample


def topk_mass(tail_logprob) -> torch.Tensor:
    """(P,) float64: the probability the stored ids hold at each position, 1 - exp(tail_logprob)."""
    return -torch.expm1(torch.as_tensor(tail_logprob).double())


def topk_mass_sum(labels: SoftLabels) -> float:
    """The top-k mass summed over the positions of ``labels`` (a commit record's ``topk_mass_sum``)."""
    return float(topk_mass(labels.tail_logprob).sum())


def figure_shards(reader, max_shards: int | None = None) -> list[int]:
    """The complete shards of ``reader`` (a StoreReader) that ``label_figures`` reads: all, or an evenly
    spaced, deterministic sample.

    max_shards: None reads every shard of a store with at most ``FIGURES_BYTES`` of payload
    and about that many bytes' worth of shards of a larger one; 0 every shard; N at most N.
    """
    if max_shards is not None and max_shards < 0:
        raise ValueError(f"max_shards must be >= 0, got {max_shards}")
    shards = reader.complete_shards()
    if max_shards is None:
        payload = sum(r.payload_bytes for r in reader.records.values())
        max_shards = len(shards) if payload <= FIGURES_BYTES else max(1, len(shards) * FIGURES_BYTES // payload)
    if max_shards == 0 or max_shards >= len(shards):
        return shards
    picks = np.linspace(0, len(shards) - 1, max_shards).round().astype(int)  # distinct for max_shards < len
    return [shards[i] for i in picks]


def label_figures(reader, max_shards: int | None = None, bins: int = 10, skip: Iterable[int] = ()) -> dict:
    """What the teacher's distributions in ``reader`` (a StoreReader) look like, read shard by shard.

    Returns ``topk_mass_percentiles`` ({p1, p10, p50, p90, p99, mean} of the mass the stored
    ids hold per position), ``topk_mass_histogram`` (position counts in ``bins`` equal bins
    over [0, 1], the last one closed), ``teacher_entropy_buckets_mean`` (nats: the entropy
    over the k+1 buckets, ids plus tail, a lower bound of the teacher's entropy over the whole
    vocabulary), ``unique_ids_mean`` (sampled stores: distinct drawn ids per position;
    stores with tail draws: distinct tail ids per position) and which shards were read
    (``figures_*``; see ``figure_shards`` for ``max_shards``). Shards in ``skip`` are left
    out; damaged ones are left out and listed in ``figures_skipped_shards``.
    """
    if MASS_BINS % bins:
        raise ValueError(f"bins must divide {MASS_BINS}, got {bins}")
    planned = figure_shards(reader, max_shards)
    skip = set(skip)
    chosen = [i for i in planned if i not in skip]
    fine = np.zeros(MASS_BINS, np.int64)
    sums = {"mass": 0.0, "entropy": 0.0, "unique": 0.0}
    low, high, damaged = math.inf, -math.inf, []
    for index in chosen:
        try:
            labels = reader.read_shard(index)
        except CorruptStoreError:
            damaged.append(index)
            continue
        mass, entropy = _mass_and_entropy(labels)  # (P,), (P,)
        fine += np.bincount(np.minimum((mass * MASS_BINS).astype(np.int64), MASS_BINS - 1), minlength=MASS_BINS)
        if len(mass):
            low, high = min(low, float(mass.min())), max(high, float(mass.max()))
        sums["mass"] += float(mass.sum())
        sums["entropy"] += float(entropy.sum())
        drawn = labels.counts if labels.counts is not None else labels.tail_counts
        if drawn is not None:
            sums["unique"] += float((drawn > 0).sum())
    n = int(fine.sum())
    mean = (lambda key: sums[key] / n if n else math.nan)  # noqa: E731
    read = [i for i in chosen if i not in damaged]
    return {
        "topk_mass_percentiles": {**_percentiles(fine, n, low, high), "mean": mean("mass")},
        "topk_mass_histogram": fine.reshape(bins, -1).sum(1).tolist(),
        "teacher_entropy_buckets_mean": mean("entropy"),
        **({"unique_ids_mean": mean("unique")} if reader.spec.method == "sample" or reader.spec.tail_samples else {}),
        "figures_positions": n,
        "figures_shards_read": len(read),
        "figures_sampled": len(planned) < len(reader.records),
        "figures_skipped_shards": sorted(damaged),
    }


def _mass_and_entropy(labels: SoftLabels) -> tuple[np.ndarray, np.ndarray]:
    """Per position (P,) float64: the mass of the stored ids in [0, 1], and the entropy (nats) over ids plus tail."""
    mass = np.clip(topk_mass(labels.tail_logprob).numpy(), 0.0, 1.0)
    tail = labels.tail_logprob.double().numpy()  # (P,)
    buckets = np.concatenate([labels.topk_logprobs.double().numpy(), tail[:, None]], axis=1)  # (P, K+1)
    finite = np.isfinite(buckets)  # -inf: padding slots, or no tail; they hold no mass
    plogp = np.exp(buckets) * np.where(finite, buckets, 0.0)
    return mass, -plogp.sum(1)


def _percentiles(fine: np.ndarray, n: int, low: float, high: float) -> dict:
    """p1..p99 of ``n`` values from their fine histogram ``fine`` (equal bins over [0, 1]).

    Each is the midpoint of the bin holding its rank, kept within the values' [low, high].
    """
    if not n:
        return {f"p{q}": math.nan for q in (1, 10, 50, 90, 99)}
    cdf = np.cumsum(fine)
    out = {}
    for q in (1, 10, 50, 90, 99):
        b = int(np.searchsorted(cdf, q / 100 * n, side="left"))
        out[f"p{q}"] = min(max((b + 0.5) / len(fine), low), high)
    return out
