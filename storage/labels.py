"""Soft labels in memory: what the store holds for a run of consecutive examples.

A *position* is one teacher distribution (one per classification example, one per
non-padding token of a causal LM). ``offsets`` maps examples to contiguous position
ranges, so ragged sequences carry no padding.
"""

from __future__ import annotations

import dataclasses

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

    def select(self, examples) -> "SoftLabels":
        """Labels of the given examples (relative indices, any order, repeats allowed), gathered at once."""
        examples = torch.as_tensor(examples, dtype=torch.int64)
        starts = self.offsets[examples]  # (E',)
        lengths = self.offsets[examples + 1] - starts  # (E',)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        total = int(offsets[-1])
        # position j of output example i reads position starts[i] + (j - offsets[i])
        index = torch.arange(total) + torch.repeat_interleave(starts - offsets[:-1], lengths, output_size=total)
        take = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return SoftLabels(
            offsets=offsets,
            topk_ids=take(self.topk_ids),
            topk_logprobs=take(self.topk_logprobs),
            tail_logprob=take(self.tail_logprob),
            tempered_lse=take(self.tempered_lse),
            temperatures=self.temperatures,
            counts=take(self.counts),
            token_index=take(self.token_index),
            example_start=0,
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
        tail = torch.where(torch.isneginf(self.tail_logprob), 0.0, tail)  # no mass outside at T=1: none at any T
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
    """The teacher's softmax over the vocabulary from one exp pass, done in place.

    On a CPU the passes over (P, V) cost as much as a small teacher's output layer, so
    everything is derived from ``e = exp(logits - max)`` (P, V), overwritten step by step:
    the normaliser (held in float64: max + log sum, so large logits keep their digits),
    the tail (a sum of the positive terms outside the kept ids: no cancellation, tiny
    tails keep their digits) and each tempered normaliser (a power of ``e``, in place).
    Terms under ~1e-38 of the top id's mass underflow to 0: for the tail that reads as
    -inf when nothing else is left; for T > 1 it drops at most V * exp(-87 / T) of the
    tempered mass (1e-14 at T=2, 5e-5 at T=4 with V=128k, in the worst case).
    """

    def __init__(self, logits: torch.Tensor, row_max: torch.Tensor | None = None, consume: bool = False):
        self.m = logits.amax(1, keepdim=True) if row_max is None else row_max  # (P, 1)
        self.e = (logits.sub_(self.m) if consume else logits - self.m).exp_()  # (P, V) in [0, 1]
        self.s = self.e.sum(1, keepdim=True).double()  # (P, 1)
        self.lse = self.m.double() + self.s.log()  # (P, 1) float64

    def finish(self, ids: torch.Tensor, kept_logits: torch.Tensor, kept: torch.Tensor, temperatures):
        """Log-probs (P, K), tail (P,) and tempered normalisers (P, nT) of the kept ids.

        ids/kept_logits (P, K): the kept ids and their logits; ``kept`` (P, K) is False on
        padding slots (which repeat a kept id). Overwrites ``e``.
        """
        values = torch.where(kept, (kept_logits.double() - self.lse).float(), float("-inf"))
        kept_shifted = torch.where(kept, kept_logits - self.m, float("-inf"))  # (P, K)
        self.e.scatter_(1, ids, 0.0)  # e now holds the tail's terms only
        tail = (self.e.sum(1).double().log() - self.s.log()[:, 0]).float()  # log(0) = -inf: no tail (k = V)
        cols, power = {}, 1.0
        for t in sorted(set(temperatures), reverse=True):  # exponents 1/T rising: 1/4, 1/2, ...
            ratio, power = (1.0 / t) / power, 1.0 / t
            self.e.sqrt_() if ratio == 0.5 else self.e.pow_(ratio)  # e = exp((logits - max) / T)
            total = self.e.sum(1).double() + (kept_shifted.double() / t).exp().sum(1)  # sum exp((logits - max) / T)
            cols[t] = total.log() + (self.m.double() - self.lse)[:, 0] / t
        tempered = torch.stack([cols[t] for t in temperatures], 1).float() if temperatures else values.new_zeros(len(ids), 0)
        return values, tail, tempered


def _positions_tensor(n: int, lengths) -> torch.Tensor:
    if lengths is None:
        return torch.arange(n + 1, dtype=torch.int64)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if int(lengths.sum()) != n:
        raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {n} positions")
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


@torch.no_grad()
def topk_labels(logits: torch.Tensor, k: int, temperatures=(), lengths=None, consume: bool = False) -> SoftLabels:
    """Top-k soft labels from full logits, computed where ``logits`` live (GPU or CPU).

    logits: (P, V) any float dtype; the softmax is taken in float32.
    lengths: positions per example (E,), or None for one position per example.
    consume: ``logits`` (if float32) may be overwritten, sparing a (P, V) copy.
    Only (P, K + 1 + nT) numbers leave the device. Passes over the vocabulary: one top-k,
    one exp, one power per stored temperature, and a few sums.
    """
    logits = logits.float()
    top, ids = logits.topk(k, dim=-1)  # (P, K) by rank; top[:, 0] is the row max
    ids, order = ids.sort(dim=-1)  # by id, as the store keeps them: sorting here runs on the device
    sm = _Softmax(logits, row_max=top[:, :1].clone(), consume=consume)
    kept = torch.ones_like(ids, dtype=torch.bool)
    return _to_host(sm, ids, top.gather(1, order), kept, temperatures, lengths)


@torch.no_grad()
def sampled_labels(
    logits: torch.Tensor, samples: int, temperatures=(), lengths=None, generator: torch.Generator | None = None,
    sample_temperature: float = 1.0, consume: bool = False,
) -> SoftLabels:
    """Sampled soft labels: ``samples`` draws per position from the teacher's distribution.

    Keeps the unique drawn ids (ascending, padded to ``samples`` slots with count 0 and
    id repeated), their draw counts and their exact log-probabilities.
    """
    logits = logits.float()
    sm = _Softmax(logits, consume=consume)
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
    kept_logits = sm.e.gather(1, ids).log() + sm.m  # drawn ids have e > 0; relative error ~1e-7
    return _to_host(sm, ids, kept_logits, kept, temperatures, lengths, counts)


def _to_host(sm: _Softmax, ids, kept_logits, kept, temperatures, lengths, counts=None) -> SoftLabels:
    """Log-probs, tail and normalisers on the device, then only (P, K + 1 + nT) numbers to the host."""
    temps = tuple(float(t) for t in temperatures if t != 1.0)
    values, tail, tempered_lse = sm.finish(ids, kept_logits, kept, temps)
    return SoftLabels(
        offsets=_positions_tensor(len(ids), lengths),
        topk_ids=ids.cpu(),
        topk_logprobs=values.cpu(),
        tail_logprob=tail.cpu(),
        tempered_lse=tempered_lse.cpu(),
        temperatures=temps,
        counts=None if counts is None else counts.int().cpu(),
    )
