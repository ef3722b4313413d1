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

__all__ = ["TASKS", "IGNORE_INDEX", "position_logits"]

TASKS = ("classification", "causal-lm")
IGNORE_INDEX = -100  # Hugging Face's "not a target" label: cross-entropy skips it


def position_logits(model: LoadedModel, batch: dict, task: str,
                    module: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits at the store's positions (P, V) and each position's hard label (P,).

    Causal LM: the hard label of the position at token t is token t+1 (IGNORE_INDEX after
    the last token); only positions in ``batch["position_mask"]`` (B, L) are kept.
    Classification: the example's label (a negative label in the data = IGNORE_INDEX).
    ``module`` runs the forward pass instead of ``model.module`` (the DDP wrapper when distributed).
    """
    forward = model if module is None else dataclasses.replace(model, module=module)
    logits = forward.logits(batch)
    device = logits.device
    if task == "causal-lm":
        mask = batch["position_mask"].to(device).bool()  # (B, L)
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        following = torch.full_like(ids, IGNORE_INDEX)
        following[:, :-1] = ids[:, 1:].masked_fill(attention[:, 1:] == 0, IGNORE_INDEX)  # (B, L)
        return logits[mask], following[mask]  # (P, V), (P,)
    labels = batch["labels"].to(device)
    return logits, labels.masked_fill(labels < 0, IGNORE_INDEX)
