"""The two tasks, and what a position and its hard label are in each.

A *position* is one teacher distribution: one per example for a classifier, one per
non-padding token for a causal LM (the position at token t predicts token t+1). Every
stage that runs a model over a batch (training, scoring, online distillation, evaluation)
takes its logits at the positions through ``position_logits``, so the positions line up
with the store's exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # models.py imports TASKS from here
    from distill.pipeline.models import LoadedModel

__all__ = ["TASKS", "IGNORE_INDEX", "LOGITS_CHUNK_ELEMENTS", "position_index", "position_logits", "next_token_labels",
           "Positions", "chunk_spans"]

TASKS = ("classification", "causal-lm")
IGNORE_INDEX = -100  # Hugging Face's "not a target" label: cross-entropy skips it
LOGITS_CHUNK_ELEMENTS = 1 << 25  # (positions x vocabulary) values worked on at once: 128 MiB of float32


def position_index(batch: dict) -> torch.Tensor:
    """Flat indices (P,) into a causal-LM batch's B * L tokens of the positions it keeps.

    The collated batch carries them (``position_index``, made on the host by
    ``ExampleSet.collate``); a batch without them gets them from its ``position_mask``,
    which costs a host synchronisation when the mask is on a GPU. P == B * L means every
    position is kept: a shape, which the host knows without asking the device.
    """
    index = batch.get("position_index")
    if index is None:
        index = batch["position_mask"].reshape(-1).nonzero()[:, 0]
    return index


def next_token_labels(batch: dict, device: torch.device) -> torch.Tensor:
    """(B, L) hard label of every token of a causal-LM batch: the next token, IGNORE_INDEX after the last."""
    ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    following = torch.full_like(ids, IGNORE_INDEX)
    following[:, :-1] = ids[:, 1:].masked_fill(attention[:, 1:] == 0, IGNORE_INDEX)
    return following


def position_logits(model: LoadedModel, batch: dict, task: str,
                    module: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits at the store's positions (P, V) and each position's hard label (P,).

    Causal LM: the hard label of the position at token t is token t+1 (IGNORE_INDEX after
    the last token); only the positions of ``position_index(batch)`` are kept. When a batch
    keeps every position (no padding, no mask) the logits are a view, not a copy.
    Classification: the example's label (a negative label in the data = IGNORE_INDEX).
    ``module`` runs the forward pass instead of ``model.module`` (the DDP wrapper when distributed).
    No step here makes the host wait for the device.
    """
    forward = model if module is None else dataclasses.replace(model, module=module)
    logits = forward.logits(batch)
    positions = Positions.of(batch, task, logits.device)
    return positions.rows(logits, slice(None)), positions.hard


def chunk_spans(positions: int, vocab: int, chunk_elements: int | None = None) -> Iterator[slice]:
    """Consecutive spans covering ``positions`` rows of ``vocab`` values, about ``chunk_elements`` values each.

    None means ``LOGITS_CHUNK_ELEMENTS``. A row counts as at least 64 values, which bounds the
    per-position tables (ECE bins) of a classifier with few classes too.
    """
    rows = max(1, (chunk_elements or LOGITS_CHUNK_ELEMENTS) // max(vocab, 64))
    for a in range(0, positions, rows):
        yield slice(a, min(a + rows, positions))


@dataclasses.dataclass(frozen=True)
class Positions:
    """A batch's positions as rows of its raw logits, and their hard labels.

    Causal LM: the kept tokens (``position_index``) of the (B * L, V) flattened logits, with
    the next token as hard label; classification: every example, its label. ``rows`` gathers
    a span of them, so a caller scores a padded batch chunk by chunk without copying it whole.
    """

    index: torch.Tensor | None  # (P,) rows of the flat logits; None: every row, in order
    hard: torch.Tensor  # (P,) IGNORE_INDEX where a position has no target

    @classmethod
    def of(cls, batch: dict, task: str, device: torch.device) -> Positions:
        """The positions of ``batch`` (collated, on ``device``) for ``task``; no host synchronisation."""
        if task != "causal-lm":
            labels = batch["labels"].to(device)
            return cls(None, labels.masked_fill(labels < 0, IGNORE_INDEX))
        following = next_token_labels(batch, device).reshape(-1)  # (B * L,)
        index = position_index(batch)
        if index.numel() == following.numel():
            return cls(None, following)
        index = index.to(device, non_blocking=True)
        return cls(index, following.index_select(0, index))

    def __len__(self) -> int:
        return len(self.hard)

    def rows(self, logits: torch.Tensor, span: slice) -> torch.Tensor:
        """Logits (p, V) of positions ``span`` out of the model's raw (B, L, V) or (B, C) logits."""
        flat = logits.reshape(-1, logits.shape[-1])  # (B * L, V), a view
        return flat[span] if self.index is None else flat.index_select(0, self.index[span])

    def spans(self, vocab: int, chunk_elements: int | None = None) -> Iterator[slice]:
        """Chunks of these positions (see ``chunk_spans``)."""
        return chunk_spans(len(self), vocab, chunk_elements)
