"""How good a model's hard predictions are: the task metric and its calibration.

``Score`` accumulates accuracy (classification) or perplexity (causal LM: exp of the mean
next-token cross-entropy) and the expected calibration error over positions that have a
target. train-student / train-teacher use it for the held-out split during training
(``held_out_evaluator``) and `distill evaluate` for its report, so both say the same.

Memory: beside the model's own logits, scoring works on one chunk of about
``distill.pipeline.tasks.LOGITS_CHUNK_ELEMENTS`` (positions x vocabulary) values at a time, in a few float32 buffers
of that size however long the batch. ``Positions`` picks a batch's positions out of its raw
logits chunk by chunk, so a padded batch is never copied whole, and ``Score.add`` works
through its (P, V) input chunk by chunk. Its sums stay on the logits' device until
``result`` reads them, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from distill.pipeline.models import LoadedModel
from distill.pipeline.runtime import Workers, to_device
from distill.pipeline.sharding import is_sharded
from distill.pipeline.tasks import IGNORE_INDEX, Positions, chunk_spans

__all__ = ["Score", "held_out_evaluator", "metric_name"]


def metric_name(task: str) -> str:
    """The task's headline metric: perplexity for causal LMs, accuracy for classifiers."""
    return "perplexity" if task == "causal-lm" else "accuracy"


class Score:
    """Running task metric over positions with a target (hard label != IGNORE_INDEX), and the expected
    calibration error of the top-1 prediction (``ECE_BINS`` equal-width confidence bins).

    The running sums are one float64 vector on the device of the logits added: added to
    another Score's (``merge``) or summed over the ranks of a process group (``all_reduce``),
    they give the result over the union of the positions.
    """

    ECE_BINS = 15
    # the sums' layout: loss, correct, count, then per bin its count, confidence and correct
    _LOSS, _CORRECT, _COUNT, _BINS = 0, 1, 2, 3
    SIZE = 3 + 3 * ECE_BINS

    def __init__(self):
        self.sums: torch.Tensor | None = None  # (SIZE,) float64; None until a position is added

    def add(self, logits: torch.Tensor, hard: torch.Tensor, chunk_elements: int | None = None) -> None:
        """Count positions' logits (P, V) against their hard labels (P,); IGNORE_INDEX positions are skipped.

        Works through about ``chunk_elements`` (P x V) values at a time (None: LOGITS_CHUNK_ELEMENTS).
        """
        for span in chunk_spans(len(hard), logits.shape[-1], chunk_elements):
            self._add(logits[span], hard[span].to(logits.device))

    @torch.no_grad()
    def _add(self, logits: torch.Tensor, hard: torch.Tensor) -> None:
        n = self.ECE_BINS
        keep = hard != IGNORE_INDEX  # (p,)
        logprobs = F.log_softmax(logits, -1, dtype=torch.float32)  # (p, V)
        picked = logprobs.gather(1, torch.where(keep, hard, 0)[:, None])[:, 0]  # (p,)
        loss = torch.where(keep, -picked.double(), 0.0)
        top, predicted = logprobs.max(-1)  # (p,), (p,)
        del logprobs  # the (p, V) buffer goes before the (p, bins) tables come
        confidence = top.double().exp()
        right = ((predicted == hard) & keep).double()  # (p,)
        bins = (confidence * n).long().clamp(0, n - 1)  # bin b holds [b/n, (b+1)/n); 1.0 joins the last
        table = ((bins[:, None] == torch.arange(n, device=bins.device)) & keep[:, None]).double()  # (p, n)
        chunk = torch.cat([torch.stack([loss.sum(), right.sum(), keep.sum().double()]), table.sum(0),
                           (table * confidence[:, None]).sum(0), (table * right[:, None]).sum(0)])  # (SIZE,)
        self.sums = chunk if self.sums is None else self.sums + chunk

    def merge(self, other: Score) -> Score:
        """These sums plus ``other``'s (positions scored elsewhere), in place; returns self."""
        if other.sums is not None:
            self.sums = other.sums.clone() if self.sums is None else self.sums + other.sums.to(self.sums.device)
        return self

    def all_reduce(self, device: torch.device) -> Score:
        """Sum these sums over every rank of the default process group, in place; returns self.

        Every rank must call it; each then holds the sums over all ranks' positions. The sums
        travel on ``device`` (NCCL needs CUDA tensors, gloo takes CPU ones).
        """
        sums = torch.zeros(self.SIZE, dtype=torch.float64) if self.sums is None else self.sums
        sums = sums.to(device, copy=True)
        torch.distributed.all_reduce(sums)
        self.sums = sums
        return self

    def _totals(self) -> torch.Tensor:
        """The sums on the host (one synchronisation); zeros before any position."""
        return torch.zeros(self.SIZE, dtype=torch.float64) if self.sums is None else self.sums.cpu()

    def ece(self) -> float | None:
        """sum_b |accuracy_b - mean confidence_b| * n_b / n over the bins: 0 is perfectly calibrated."""
        return self._ece(self._totals())

    def _ece(self, totals: torch.Tensor) -> float | None:
        count, n, b = float(totals[self._COUNT]), self.ECE_BINS, self._BINS
        if count == 0:
            return None
        confidence, correct = totals[b + n : b + 2 * n], totals[b + 2 * n : b + 3 * n]
        return float((correct - confidence).abs().sum() / count)

    def result(self, task: str) -> dict:
        """{"metric": accuracy | perplexity (exp of the mean next-token CE), "value", "loss", "ece", "positions"}."""
        totals = self._totals()
        count = int(totals[self._COUNT])
        if count == 0:
            return {"metric": metric_name(task), "value": None, "positions": 0}
        mean = float(totals[self._LOSS]) / count
        value = math.exp(min(mean, 700.0)) if task == "causal-lm" else float(totals[self._CORRECT]) / count
        return {"metric": metric_name(task), "value": value, "loss": mean, "ece": self._ece(totals),
                "positions": count}


def held_out_evaluator(model: LoadedModel, data, batch_size: int, device: torch.device,
                       autocast: Callable[[], AbstractContextManager], team: Workers | None = None,
                       *, chunk_elements: int | None = None) -> Callable[[], dict]:
    """A function that scores ``model`` on every example of ``data`` (an ExampleSet).

    It returns {"loss", "accuracy" | "perplexity", "ece", "examples" | "positions"}: the line
    train-student and train-teacher write to metrics.jsonl. ``autocast()`` makes the context
    each forward pass runs in. Under a process group (``team.distributed``) rank r scores
    batches r, r + world, ... and the ranks sum their scores, so every rank returns the
    whole set's result, as one process would; every rank must call the function. An FSDP-sharded
    model gathers its weights in every forward pass, with every rank: a rank whose batches run
    out first runs its first batch again, unscored, until the others are done.
    """
    rank, world = (team.rank, team.world) if team is not None and team.distributed else (0, 1)

    def run() -> dict:
        score = Score()
        starts = list(range(rank * batch_size, len(data), world * batch_size))
        rounds = -(-len(data) // (world * batch_size)) if world > 1 and is_sharded(model.module) else len(starts)
        for n in range(rounds):
            a = starts[n] if n < len(starts) else 0
            batch = to_device(data.gather(torch.arange(a, min(a + batch_size, len(data)))), device)
            with autocast():
                logits = model.logits(batch)  # (B, C) or (B, L, V)
            if n >= len(starts):  # in step with the other ranks' forward passes, not scored
                continue
            positions = Positions.of(batch, model.task, logits.device)
            for span in positions.spans(logits.shape[-1], chunk_elements):
                score.add(positions.rows(logits, span), positions.hard[span], chunk_elements)
        if world > 1:
            score.all_reduce(device)
        r = score.result(model.task)
        return {"loss": r.get("loss"), r["metric"]: r["value"], "ece": r.get("ece"),
                ("positions" if model.task == "causal-lm" else "examples"): r["positions"]}

    return run
