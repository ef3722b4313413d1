"""Stage two, `distill train-student`, and `distill train-teacher`: one trainer, two sources of targets.

train-student reads top to bottom: open the store, load the student and the data, refuse a
store made for other data or another vocabulary, stream batches joined to their soft
labels, train with the distillation loss, save the student. The teacher is never loaded.
train-teacher is the same trainer with hard labels only: step one of the classic recipe,
and the "same model trained from scratch" baseline every distillation result is compared with.

A run directory holds ``config.json``, ``metrics.jsonl``, ``checkpoints/`` and, at the
end, ``model/`` (a Hugging Face model saved with ``save_pretrained``; any other model as
``model.safetensors`` plus ``model.json``, which says how to rebuild it) and ``summary.json``.
Rerunning the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from distill.errors import ConfigError, StoreError, write_error
from distill.pipeline.config import config_to_dict
from distill.pipeline.data import DataConfig, DataFlags, ExampleSet, load_data
from distill.pipeline.models import LoadedModel, ModelConfig, load_model, quiet_hf, save_weights
from distill.pipeline.runtime import resolve_device, workers
from distill.pipeline.checkpoint import latest_checkpoint
from distill.pipeline.trainer import Schedule, fit
from distill.storage import open_store
from distill.storage.stream import LabelStream, labels_from_batch

__all__ = ["TrainConfig", "StudentConfig", "train_student", "train_teacher"]

PRECISIONS = ("auto", "fp32", "bf16")
# settings that may change between a run and its resumption
_RESUMABLE_CHANGES = ("progress", "workers", "device", "log_every", "checkpoint_every", "eval_every", "overwrite")


@dataclasses.dataclass(frozen=True)
class TrainConfig(DataFlags):
    """Settings of a training run (the flags of `distill train-teacher`; train-student adds its own).

    out:               the run directory (config, metrics, checkpoints, final model).
    data:              data spec, as for generate-labels (must be the same data the store was made from).
    model:             the model to train: a built-in (mlp, cnn, gpt), a Hugging Face directory, package.module:factory.
    epochs / steps:    how long: whole passes over the data, or optimiser steps (default: 1 epoch).
    batch_size:        examples per batch; grad_accum batches per optimiser step.
    lr, weight_decay, warmup_steps (None: 5% of steps), min_lr_ratio, clip_grad: AdamW, warm-up then cosine decay.
    device:            auto, cpu, cuda, cuda:N. precision: auto (bf16 autocast on CUDA), fp32, bf16.
    seed:              data order, dropout.
    eval_split / eval_data: held-out split (of eval_data, default data) evaluated every eval_every steps and at the end.
    checkpoint_every, log_every: in optimiser steps.
    workers:           DataLoader worker processes (0: load in the training process).
    shuffle_buffer:    examples per shuffled block of shards in each worker; None: about 65,536 positions' worth.
    overwrite:         replace a run directory holding a run with other settings.
    weights, trust_remote_code, task, split, tokenizer, seq_len, text_column, ids_column, label_column, limit: as for generate-labels.
    """

    out: str = ""
    data: str | None = None
    model: str | None = None
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    clip_grad: float | None = 1.0
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    eval_every: int | None = None
    eval_split: str | None = None
    eval_data: str | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    workers: int = 1
    shuffle_buffer: int | None = None
    overwrite: bool = False
    weights: str | None = None
    trust_remote_code: bool = False
    task: str | None = None
    progress: bool = True

    def __post_init__(self):
        if not self.out:
            raise ConfigError("missing --out: pass the run directory")
        if not self.data or not self.model:
            raise ConfigError(f"missing --data or --{self._model_flag()}: both are required")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("pass --epochs or --steps, not both")
        for name in ("epochs", "steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise ConfigError("--lr must be > 0, --min-lr-ratio in [0, 1], --weight-decay >= 0")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown --precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.workers < 0:
            raise ConfigError("--workers must be >= 0")
        if self.eval_every is not None and self.eval_split is None:
            raise ConfigError("--eval-every needs --eval-split (e.g. --eval-split test)")

    def _model_flag(self) -> str:
        return "model"

    def schedule(self) -> Schedule:
        fields = {f.name for f in dataclasses.fields(Schedule)}
        return Schedule(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclasses.dataclass(frozen=True)
class StudentConfig(TrainConfig):
    """train-student's settings: TrainConfig plus the store and the loss.

    labels:      the soft-label store written by generate-labels.
    loss:        kl (forward, default), reverse-kl, jsd, skew-kl (top-k stores; sampled stores use the sampled
                 cross-entropy), or argmax: cross-entropy on the teacher's top-1 id (hard pseudo-labels, no T).
    temperature: softening temperature T; the store must hold its normaliser (generate-labels --temperature).
    alpha:       weight of the hard-label cross-entropy: loss = alpha * CE + (1 - alpha) * T^2 * soft.
    beta, skew:  parameters of jsd and skew-kl.
    tail:        False: drop the tail bucket and renormalise teacher and student over the k stored ids
                 (what most offline tools do; top-k stores only). Kept to measure what the tail is worth.
    """

    labels: str | None = None
    loss: str = "kl"
    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 0.5
    skew: float = 0.1
    tail: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.labels:
            raise ConfigError("missing --labels: pass the store written by `distill generate-labels`")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"--temperature must be finite and > 0, got {self.temperature}")

    def _model_flag(self) -> str:
        return "student"


# --- the two stages -----------------------------------------------------------------------

def train_student(config: StudentConfig, online_teacher: LoadedModel | None = None) -> dict:
    """Train the student on the store's soft labels (and the data's hard labels); returns the summary.

    ``online_teacher`` (library only, for reference measurements): online distillation instead,
    the teacher's full-vocabulary logits computed every step replace the store's labels in the
    forward KL (``config.loss`` must be kl); the store still sets the examples and their order.
    """
    from distill.pipeline.losses import make_loss

    store = open_complete_store(config.labels)
    spec = store.spec
    task = spec.extra.get("task", config.task)
    loss_fn = make_loss(spec.method, config.loss, config.temperature, config.alpha, beta=config.beta, skew=config.skew,
                        sample_temperature=spec.sample_temperature or 1.0, tail=config.tail)
    if online_teacher is not None:
        if config.loss != "kl":
            raise ConfigError(f"online distillation uses the forward KL, not {config.loss!r}: pass loss='kl'")
        loss_fn = OnlineDistillationLoss(online_teacher, task, config.temperature, config.alpha)
    if config.loss != "argmax" and config.temperature != 1.0 and config.temperature not in spec.temperatures:
        held = ", ".join(f"{t:g}" for t in spec.temperatures)
        raise ConfigError(f"temperature {config.temperature:g} is not in the store (it holds {held}): pass --temperature "
                          f"one of {held}, or regenerate the labels with --temperature {config.temperature:g}")

    def check(student: LoadedModel, data: ExampleSet) -> None:
        check_store_matches(store, config.labels, data, student.output_size, "student")

    def loss(model, batch, student: LoadedModel) -> dict:
        logits, hard = _positions(student, model, batch, task)
        labels = labels_from_batch(_to(batch, logits.device), spec.stored_temperatures)
        if labels.num_positions != len(logits):
            raise StoreError(f"a batch has {len(logits)} positions in the data but {labels.num_positions} in the store")
        out = loss_fn(logits, labels if online_teacher is None else batch, hard if config.alpha > 0 else None)
        return {"loss": out["loss"], "soft": out["soft"], "ce": out.get("ce"), "positions": len(logits)}

    return _train(config, task, store, check, loss)


def train_teacher(config: TrainConfig) -> dict:
    """Train a model on the data's hard labels alone (cross-entropy); returns the summary."""

    def loss(model, batch, student: LoadedModel) -> dict:
        logits, hard = _positions(student, model, batch, student.task)
        ce = F.cross_entropy(logits.float(), hard, ignore_index=-100)
        return {"loss": ce, "ce": ce, "positions": int((hard != -100).sum())}

    return _train(config, config.task, None, lambda student, data: None, loss)


def _train(config: TrainConfig, task: str | None, store, check, loss) -> dict:
    device = resolve_device(config.device)
    team = workers(None, device)
    try:
        _prepare_run_dir(config, team)
        student = load_model(ModelConfig(config.model, weights=config.weights, task=task,
                                         trust_remote_code=config.trust_remote_code), device=device)
        data = load_data(_data_config(config, config.data, config.split, student.task))
        check(student, data)
        student.module.train()
        stream = LabelStream(data, store, batch_size=config.batch_size, seed=config.seed, rank=team.rank,
                             world=team.world, shuffle_buffer=config.shuffle_buffer, workers=config.workers)
        evaluate = None
        if config.eval_split is not None:
            held_out = load_data(dataclasses.replace(  # --limit trims the training data, never the held-out split
                _data_config(config, config.eval_data or config.data, config.eval_split, student.task), limit=None))
            evaluate = _evaluator(student, held_out, config.batch_size, device, _autocast(config, device))
        schedule = config.schedule()
        if schedule.eval_every is None and evaluate is not None:
            schedule = dataclasses.replace(schedule, eval_every=1 << 62)  # at the end only
        last = fit(student.module, stream, lambda model, batch: loss(model, batch, student), schedule, config.out,
                   team, device, lambda: _autocast(config, device), evaluate=evaluate, progress=config.progress)
        summary = {"out": config.out, "model": student.describe, "task": student.task, "metrics": last,
                   "params": sum(p.numel() for p in student.module.parameters())}
        if team.rank == 0:
            _save_model(student, os.path.join(config.out, "model"))
            _write_json(os.path.join(config.out, "summary.json"), summary)
        team.barrier()
        return summary
    finally:
        team.close()


# --- pieces ---------------------------------------------------------------------------------

class OnlineDistillationLoss:
    """Online distillation, the reference the store is measured against: the teacher runs on every
    batch and the student matches its full-vocabulary distribution,

        loss = alpha * CE(student, hard) + (1 - alpha) * T^2 * mean_P KL(p_teacher,T || q_student,T)

    the top-k loss with k = V (an empty tail). Called as ``loss(student_logits (P, V), batch, hard)``.
    """

    def __init__(self, teacher: LoadedModel, task: str, temperature: float, alpha: float):
        self.teacher, self.task, self.temperature, self.alpha = teacher, task, float(temperature), float(alpha)
        teacher.module.eval()

    def __call__(self, student_logits: torch.Tensor, batch: dict, hard: torch.Tensor | None) -> dict:
        with torch.no_grad():
            target = _positions(self.teacher, self.teacher.module, _to(batch, student_logits.device), self.task)[0]
        if target.shape != student_logits.shape:
            raise ConfigError(f"the teacher gives logits {tuple(target.shape)} but the student "
                              f"{tuple(student_logits.shape)}: use models of one vocabulary")
        t = self.temperature
        p_log = (target.float() / t).log_softmax(-1)  # (P, V)
        q_log = (student_logits.float() / t).log_softmax(-1)  # (P, V)
        soft = F.kl_div(q_log, p_log, log_target=True, reduction="sum") / max(1, len(q_log))
        mixed = (1.0 - self.alpha) * t**2 * soft
        if self.alpha == 0.0 or hard is None:
            return {"loss": mixed, "soft": soft, "ce": None}
        keep = hard != -100
        ce = F.cross_entropy(student_logits.float(), hard, ignore_index=-100, reduction="sum") / keep.sum().clamp_min(1)
        return {"loss": self.alpha * ce + mixed, "soft": soft, "ce": ce}


def open_complete_store(url: str):
    """The store at ``url``, refused unless every shard is complete."""
    store = open_store(url)
    if not store.complete:
        raise StoreError(f"the store {url} is not complete ({len(store.complete_shards())} of "
                         f"{store.spec.num_shards} shards): finish it with `distill generate-labels` first")
    return store


def check_store_matches(store, url: str, data: ExampleSet, output_size: int, what: str) -> None:
    """Refuse a store made from other data, or for another output size than the ``what`` (student, model) has."""
    spec = store.spec
    if data.fingerprint() != spec.dataset_fingerprint:
        raise ConfigError(f"the store {url} was made from other data (dataset fingerprint "
                          f"{spec.dataset_fingerprint[:19]}..., this data {data.fingerprint()[:19]}...): pass the "
                          "same --data, --split, --seq-len and --limit as generate-labels")
    if output_size != spec.vocab_size:
        raise ConfigError(f"the {what} outputs {output_size} values but the store's vocabulary is "
                          f"{spec.vocab_size}: use a {what} with the teacher's output size")


class Score:
    """Running task metric over positions with a target (hard label != -100), and the expected
    calibration error of the top-1 prediction (``ECE_BINS`` equal-width confidence bins)."""

    ECE_BINS = 15

    def __init__(self):
        self.loss_sum, self.correct, self.count = 0.0, 0, 0
        self.bin_count = torch.zeros(self.ECE_BINS, dtype=torch.float64)
        self.bin_confidence = torch.zeros(self.ECE_BINS, dtype=torch.float64)
        self.bin_correct = torch.zeros(self.ECE_BINS, dtype=torch.float64)

    def add(self, logits: torch.Tensor, hard: torch.Tensor) -> None:
        keep = hard != -100
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
            return {"metric": "perplexity" if task == "causal-lm" else "accuracy", "value": None, "positions": 0}
        mean = self.loss_sum / self.count
        if task == "causal-lm":
            value = math.exp(min(mean, 700.0))
        else:
            value = self.correct / self.count
        return {"metric": "perplexity" if task == "causal-lm" else "accuracy", "value": value, "loss": mean,
                "ece": self.ece(), "positions": self.count}


def _data_config(config: TrainConfig, spec: str, split: str, task: str) -> DataConfig:
    from distill.stages.generate import tokenizer_beside

    tokenizer = config.tokenizer or tokenizer_beside(config.model)  # a Hugging Face student's own tokenizer
    return config.data_config(spec, task=task, split=split, tokenizer=tokenizer)


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _positions(student: LoadedModel, model, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's logits at the store's positions (P, V) and each position's hard label (P,), -100 = none.

    Causal LM: the position at token t predicts token t+1, so its hard label is the next
    token (none after the last); classification: the example's label (-1 in the data = none).
    """
    forward = dataclasses.replace(student, module=model)  # the DDP wrapper when distributed
    logits = forward.logits(batch)
    device = logits.device
    if task == "causal-lm":
        mask = batch["position_mask"].to(device).bool()  # (B, L)
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        following = torch.full_like(ids, -100)
        following[:, :-1] = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)  # (B, L)
        return logits[mask], following[mask]  # (P, V), (P,)
    labels = batch["labels"].to(device)
    return logits, labels.masked_fill(labels < 0, -100)


def _evaluator(student: LoadedModel, data: ExampleSet, batch_size: int, device: torch.device, autocast):
    """Accuracy (classification) or perplexity (causal LM) of the student's hard predictions on ``data``."""

    def run() -> dict:
        score = Score()
        for a in range(0, len(data), batch_size):
            batch = _to(data.collate([data[i] for i in range(a, min(a + batch_size, len(data)))]), device)
            with autocast:
                logits, hard = _positions(student, student.module, batch, student.task)
            score.add(logits, hard)
        r = score.result(student.task)
        return {"loss": r.get("loss"), r["metric"]: r["value"], "ece": r.get("ece"),
                ("positions" if student.task == "causal-lm" else "examples"): r["positions"]}

    return run


def _save_model(student: LoadedModel, directory: str) -> None:
    try:
        _save_model_files(student, directory)
    except OSError as e:
        shutil.rmtree(directory + ".tmp", ignore_errors=True)
        raise write_error(e, f"the model in {directory}") from None


def _save_model_files(student: LoadedModel, directory: str) -> None:
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if student.describe.get("kind") == "hf":
        with quiet_hf():
            student.module.save_pretrained(tmp)
    else:
        save_weights(student.module, os.path.join(tmp, "model.safetensors"))
        _write_json(os.path.join(tmp, "model.json"), student.describe)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(e, path) from None


def _prepare_run_dir(config: TrainConfig, team) -> None:
    """A new run directory, or the same run's to resume; a run with other settings is refused."""
    path = os.path.join(config.out, "config.json")
    mine = {k: v for k, v in config_to_dict(config).items() if k not in _RESUMABLE_CHANGES}
    if team.rank == 0:
        if os.path.exists(config.out) and not os.path.isdir(config.out):
            raise ConfigError(f"{config.out} is a file, not a run directory: choose a new --out")
        if os.path.isfile(path) and not config.overwrite and latest_checkpoint(config.out) is not None:
            try:
                with open(path) as f:
                    theirs = {k: v for k, v in json.load(f).items() if k not in _RESUMABLE_CHANGES}
            except (ValueError, AttributeError):
                raise ConfigError(f"{path} is damaged: use --overwrite to start over, or a new --out") from None
            diff = next((k for k in mine if mine[k] != theirs.get(k)), None)
            if diff is not None:
                raise ConfigError(f"{config.out} holds a run with {diff}={theirs.get(diff)!r}, not {mine[diff]!r}: "
                                  "use a new --out, or --overwrite to start over")
        elif os.path.isdir(config.out) and os.listdir(config.out):
            if not os.path.isfile(path):
                raise ConfigError(f"{config.out} exists and is not a distill run directory: choose a new --out")
            shutil.rmtree(config.out)
        if not os.path.isfile(path):
            try:
                os.makedirs(config.out, exist_ok=True)
            except OSError as e:
                raise write_error(e, f"the run directory {config.out}") from None
            _write_json(path, config_to_dict(config))
    team.barrier()
