"""The two tasks, and what a position and its hard label are in each.

A *position* is one teacher distribution: one per example for a classifier, one per
non-padding token for a causal LM (the position at token t predicts token t+1). Every
stage that runs a model over a batch (training, scoring, online distillation, evaluation)
takes its logits at the positions through ``position_logits``, so the positions line up
with the store's exactly.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # models.py imports TASKS from here
    from distill.pipeline.models import LoadedModel

__all__ = ["TASKS", "IGNORE_INDEX", "position_index", "position_logits", "next_token_labels"]

TASKS = ("classification", "causal-lm")
IGNORE_INDEX = -100  # Hugging Face's "not a target" label: cross-entropy skips it


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
    device = logits.device
    if task == "causal-lm":
        flat = logits.reshape(-1, logits.shape[-1])  # (B * L, V)
        following = next_token_labels(batch, device).reshape(-1)  # (B * L,)
        index = position_index(batch)
        if index.numel() == flat.shape[0]:
            return flat, following
        index = index.to(device, non_blocking=True)
        return flat.index_select(0, index), following.index_select(0, index)  # (P, V), (P,)
    labels = batch["labels"].to(device)
    return logits, labels.masked_fill(labels < 0, IGNORE_INDEX)
