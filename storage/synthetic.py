"""Seeded LM-like teacher logits for tests, the store benchmark and the demo.

Each position gets a Zipf-shaped distribution over a random permutation of the
vocabulary: the logit of the token at rank r is ``-s * log(r) + 0.3 * noise`` with the
exponent s drawn uniformly from [1, 2] per position (s = 1 is flat enough that the top-64
of 32k ids hold about half the mass; s = 2 puts about 60% on the top token) and standard
normal noise, so ranks do not fall exactly on the power law.
"""

from __future__ import annotations

import torch

__all__ = ["zipf_logits"]


def zipf_logits(positions: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """(positions, vocab_size) float32 logits; deterministic for a given generator state."""
    s = 1.0 + torch.rand(positions, 1, generator=generator)  # (P, 1)
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float32)  # (V,)
    by_rank = -s * ranks.log() + 0.3 * torch.randn(positions, vocab_size, generator=generator)  # (P, V)
    perm = torch.stack([torch.randperm(vocab_size, generator=generator) for _ in range(positions)])  # id of each rank
    return torch.empty_like(by_rank).scatter_(1, perm, by_rank)
