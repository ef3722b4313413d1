"""How good a model's hard predictions are: the task metric and its calibration.

``Score`` accumulates accuracy (classification) or perplexity (causal LM: exp of the mean
next-token cross-entropy) and the expected calibration error over positions that have a
target. train-student / train-teacher use it for the held-out split during training
(``held_out_evaluator``) and `distill evaluate` for its report, so both say the same.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Callable

import torch
import torch.nn.functional as F

from distill.pipeline.models import LoadedModel
from distill.pipeline.runtime import to_device
from distill.pipeline.tasks import IGNORE_INDEX, position_logits

__all__ = ["Score", "held_out_evaluator", "metric_name"]


def metric_name(task: str) -> str:
    """The task's headline metric: perplexity for causal LMs, accuracy for classifiers."""
    return "perplexity" if task == "causal-lm" else "accuracy"


class Score:
    """Running task metric over positions with a target (hard label != IGNORE_INDEX), and the expected
    calibration error of the top-1 prediction (``ECE_BINS`` equal-width confidence bins)."""

    ECE_BINS = 15

    def __init__(self):
        self.loss_sum, self.correct, self.count = 0.0, 0, 0
        self.bin_count = torch.zeros(self.ECE_BINS, dtype=torch.float64)
        self.bin_confidence = torch.zeros(self.ECE_BINS, dtype=torch.float64)
        self.bin_correct = torch.zeros(self.ECE_BINS, dtype=torch.float64)

    def add(self, logits: torch.Tensor, hard: torch.Tensor) -> None:
        """Count positions' logits (P, V) against their hard labels (P,); IGNORE_INDEX positions are skipped."""
        keep = hard != IGNORE_INDEX
        logits, hard = logits[keep].float(), hard[keep]  # (P', V), (P',)
        self.loss_sum += float(F.cross_entropy(logits, hard, reduction="sum"))
        confidence, predicted = logits.softmax(-1).max(-1)  # (P',), (P',)
        right = (predicted == hard).double().cpu()
        self.correct += int(right.sum())
        self.count += len(hard)
        confidence = confidence.double().cpu()
        bins = (confidence * self.ECE_BINS).long().clamp(0, self.ECE_BINS - 1)  # bin b holds [b/n, (b+1)/n); 1.0 joins the last
        self.bin_count += torch.bincount(bins, minlength=self.ECE_BINS).double()
        self.bin_confidence += torch.bincount(bins, confidence, minlength=self.ECE_BINS)
        self.bin_correct += torch.bincount(bins, right, minlength=self.ECE_BINS)

    def ece(self) -> float | None:
        """sum_b |accuracy_b - mean confidence_b| * n_b / n over the bins: 0 is perfectly calibrated."""
        if self.count == 0:
            return None
        return float((self.bin_correct - self.bin_confidence).abs().sum() / self.count)

    def result(self, task: str) -> dict:
        """{"metric": accuracy | perplexity (exp of the mean next-token CE), "value", "loss", "ece", "positions"}."""
        if self.count == 0:
            return {"metric": metric_name(task), "value": None, "positions": 0}
        mean = self.loss_sum / self.count
        value = math.exp(min(mean, 700.0)) if task == "causal-lm" else self.correct / self.count
        return {"metric": metric_name(task), "value": value, "loss": mean, "ece": self.ece(), "positions": self.count}


def held_out_evaluator(model: LoadedModel, data, batch_size: int, device: torch.device,
                       autocast: Callable[[], AbstractContextManager]) -> Callable[[], dict]:
    """A function that scores ``model`` on every example of ``data`` (an ExampleSet) in order.

    It returns {"loss", "accuracy" | "perplexity", "ece", "examples" | "positions"}: the line
    train-student and train-teacher write to metrics.jsonl. ``autocast()`` makes the context
    each forward pass runs in.
    """

    def run() -> dict:
        score = Score()
        for a in range(0, len(data), batch_size):
            batch = to_device(data.collate([data[i] for i in range(a, min(a + batch_size, len(data)))]), device)
            with autocast():
                logits, hard = position_logits(model, batch, model.task)
            score.add(logits, hard)
        r = score.result(model.task)
        return {"loss": r.get("loss"), r["metric"]: r["value"], "ece": r.get("ece"),
                ("positions" if model.task == "causal-lm" else "examples"): r["positions"]}

    return run
