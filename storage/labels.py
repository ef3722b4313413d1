"""Soft labels in memory: what the store holds for a run of consecutive examples.

A *position* is one teacher distribution (one per classification example, one per
non-padding token of a causal LM). ``offsets`` maps examples to contiguous position
ranges, so ragged sequences carry no padding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

__all__ = ["SoftLabels", "topk_labels", "sampled_labels", "concat_labels"]


@dataclasses.dataclass
class SoftLabels:
    """Teacher distributions for ``num_examples`` consecutive examples.

    Fields (P positions, K slots, E examples, nT stored temperatures other than 1):
        offsets:        (E+1,) int64, example e owns positions offsets[e]:offsets[e+1].
        topk_ids:       (P, K) int64, top-k ids (method "topk") or sampled ids (method
                        "sample", unique, padded with count-0 slots); ascending within a
                        position (the store sorts them if they are not).
        topk_logprobs:  (P, K) float32, exact log-probabilities of those ids under the
                        teacher's full-vocabulary softmax at T=1 (-inf on padding slots).
        tail_logprob:   (P,) float32, log of the mass outside the K ids (-inf if none).
        tempered_lse:   (P, nT) float32, logsumexp(logprobs / T) over the whole vocabulary
                        for each temperature T in ``temperatures`` (T=1 needs none).
        temperatures:   the nT temperatures of ``tempered_lse``' columns.
        counts:         (P, K) int32 draw counts (method "sample"), else None.
        token_index:    (P,) int32 token index of each position within its example, or
                        None when position i of an example is token i.
        example_start:  global index of the first example.
    """

    offsets: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    tempered_lse: torch.Tensor
    temperatures: tuple[float, ...] = ()
    counts: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    example_start: int = 0

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_positions(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def example(self, e: int) -> "SoftLabels":
        """Labels of the e-th example held here (0-based, relative to ``example_start``)."""
        return self.examples(e, e + 1)

    def examples(self, start: int, stop: int) -> "SoftLabels":
        """Labels of examples ``start:stop`` held here (relative indices)."""
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        cut = lambda t: None if t is None else t[a:b]  # noqa: E731
        return SoftLabels(
            offsets=self.offsets[start : stop + 1] - a,
            topk_ids=self.topk_ids[a:b],
            topk_logprobs=self.topk_logprobs[a:b],
            tail_logprob=self.tail_logprob[a:b],
            tempered_lse=self.tempered_lse[a:b],
            temperatures=self.temperatures,
            counts=cut(self.counts),
            token_index=cut(self.token_index),
            example_start=self.example_start + start,
        )

    def tempered(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact tempered log-probabilities of the stored ids and of the tail.

        Returns ``(logprobs_T (P, K), tail_logprob_T (P,))``, float32, a distribution over
        K+1 buckets. ``temperature`` must be 1 or one of ``temperatures``.
        """
        if temperature == 1.0:
            return self.topk_logprobs, self.tail_logprob
        if temperature not in self.temperatures:
            held = ", ".join(str(t) for t in (1.0, *self.temperatures))
            raise ValueError(f"temperature {temperature} is not in the store (it holds {held})")
        col = self.temperatures.index(temperature)
        lp = self.topk_logprobs.double() / temperature - self.tempered_lse[:, col : col + 1].double()
        mass = lp.exp().sum(1)
        # Lossy values or a float16 normaliser can push the k-mass a hair past 1: clamp, renormalise.
        tail = (1.0 - mass).clamp_min(0.0)
        log_total = torch.log(mass + tail)
        return (lp - log_total[:, None]).float(), (tail.log() - log_total).float()


def concat_labels(parts: list[SoftLabels]) -> SoftLabels:
    """Concatenate labels of consecutive example runs."""
    if len(parts) == 1:
        return parts[0]
    offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += p.num_positions
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return SoftLabels(
        offsets=torch.cat(offsets),
        topk_ids=cat("topk_ids"),
        topk_logprobs=cat("topk_logprobs"),
        tail_logprob=cat("tail_logprob"),
        tempered_lse=cat("tempered_lse"),
        temperatures=parts[0].temperatures,
        counts=cat("counts"),
        token_index=cat("token_index"),
        example_start=parts[0].example_start,
    )


class _Softmax:
    """The teacher's softmax over the vocabulary, from one exp pass (the costly part on a CPU).

    Keeps ``exp(logits - max)`` (P, V) and its row sums; the log-normaliser is held in
    float64 (max + log sum) so log-probabilities of large logits keep their digits. The
    tail and every tempered normaliser are sums over ``e`` (or a power of it): no other
    exp pass over the vocabulary.
    """

    def __init__(self, logits: torch.Tensor, row_max: torch.Tensor | None = None):
        self.logits = logits  # (P, V) float32
        self.m = logits.amax(1, keepdim=True) if row_max is None else row_max  # (P, 1)
        self.e = (logits - self.m).exp_()  # (P, V) in (0, 1]
        self.s = self.e.sum(1, keepdim=True).double()  # (P, 1)
        self.lse = self.m.double() + self.s.log()  # (P, 1) float64

    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact log-probabilities of ``ids`` (P, K), float32."""
        return (self.logits.gather(1, ids).double() - self.lse).float()

    def tail(self, ids: torch.Tensor) -> torch.Tensor:
        """Log-mass outside ``ids`` (P, K), (P,) float32. Call last: it zeroes ``ids`` in ``e``.

        A sum of the positive terms outside (no cancellation, float32 relative error ~1e-7),
        so tiny tails keep their digits; a tail under ~1e-38 of the top id's mass reads as
        -inf (exp underflows), which no loss can tell from the truth.
        """
        if ids.shape[1] >= self.logits.shape[1]:
            return self.logits.new_full((len(ids),), float("-inf"))
        outside = self.e.scatter_(1, ids, 0.0).sum(1, keepdim=True).double()  # (P, 1)
        return (outside.log() - self.s.log())[:, 0].float()

    def tempered_lse(self, temperatures) -> torch.Tensor:
        """logsumexp(logprobs / T) over the vocabulary per temperature, (P, nT) float32."""
        cols = []
        for t in temperatures:
            powered = self.e.sqrt() if t == 2.0 else self.e.pow(1.0 / t)  # exp((logits - max) / T)
            s_t = powered.sum(1, keepdim=True).double()
            cols.append((s_t.log() + (self.m.double() - self.lse) / t)[:, 0])
        return torch.stack(cols, 1).float() if cols else self.logits.new_zeros(len(self.logits), 0)


def _positions_tensor(n: int, lengths) -> torch.Tensor:
    if lengths is None:
        return torch.arange(n + 1, dtype=torch.int64)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if int(lengths.sum()) != n:
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {n} positions")
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


@torch.no_grad()
def topk_labels(logits: torch.Tensor, k: int, temperatures=(), lengths=None) -> SoftLabels:
    """Top-k soft labels from full logits, computed where ``logits`` live (GPU or CPU).

    logits: (P, V) any float dtype; the softmax is taken in float32.
    lengths: positions per example (E,), or None for one position per example.
    Only (P, K + 1 + nT) numbers leave the device. Passes over the vocabulary: a top-k,
    one exp, a few sums, and one power per stored temperature.
    """
    logits = logits.float()
    top, ids = logits.topk(k, dim=-1)  # (P, K) by rank
    sm = _Softmax(logits, row_max=top[:, :1])
    ids = ids.sort(dim=-1).values  # by id, as the store keeps them: sorting here runs on the device
    return _to_host(sm, ids, sm.logprobs(ids), temperatures, lengths)


@torch.no_grad()
def sampled_labels(
    logits: torch.Tensor, samples: int, temperatures=(), lengths=None, generator: torch.Generator | None = None,
    sample_temperature: float = 1.0,
) -> SoftLabels:
    """Sampled soft labels: ``samples`` draws per position from the teacher's distribution.

    Keeps the unique drawn ids (ascending, padded to ``samples`` slots with count 0 and
    id repeated), their draw counts and their exact log-probabilities.
    """
    logits = logits.float()
    sm = _Softmax(logits)
    weights = sm.e if sample_temperature == 1.0 else sm.e.pow(1.0 / sample_temperature)  # unnormalised
    draws = torch.multinomial(weights, samples, replacement=True, generator=generator)  # (P, M)
    draws, _ = draws.sort(dim=1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    # Count of each unique id = run length; place uniques first, pad by repeating the last one.
    rank = first.long().cumsum(1) - 1  # (P, M) slot of each draw's unique id
    counts = torch.zeros_like(draws).scatter_add_(1, rank, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(1, rank, draws)
    n_unique = first.sum(1, keepdim=True)
    slot = torch.arange(samples, device=draws.device)[None, :]
    kept = slot < n_unique
    ids = torch.where(kept, ids, ids.gather(1, n_unique - 1))
    values = torch.where(kept, sm.logprobs(ids), float("-inf"))
    return _to_host(sm, ids, values, temperatures, lengths, counts)  # padding repeats a kept id: no effect on the tail


def _to_host(sm: _Softmax, ids, values, temperatures, lengths, counts=None) -> SoftLabels:
    """Tail and normalisers on the device, then only (P, K + 1 + nT) numbers to the host."""
    temps = tuple(float(t) for t in temperatures if t != 1.0)
    tempered_lse = sm.tempered_lse(temps)  # before sm.tail, which zeroes the kept ids in sm.e
    return SoftLabels(
        offsets=_positions_tensor(len(ids), lengths),
        topk_ids=ids.cpu(),
        topk_logprobs=values.cpu(),
        tail_logprob=sm.tail(ids).cpu(),
        tempered_lse=tempered_lse.cpu(),
        temperatures=temps,
        counts=None if counts is None else counts.int().cpu(),
    )
