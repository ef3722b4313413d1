"""Stage two, `distill train-student`, and `distill train-teacher`: one trainer, two sources of targets.

train-student reads top to bottom: open the store, load the student and the data, refuse a
store made for other data or another vocabulary, stream batches joined to their soft
labels, train with the distillation loss, save the student. The teacher is never loaded.
train-teacher is the same trainer with hard labels only: step one of the classic recipe,
and the "same model trained from scratch" baseline every distillation result is compared with.

A run directory holds ``config.json``, ``metrics.jsonl``, ``checkpoints/`` and, at the
end, ``model/`` (a Hugging Face model saved with ``save_pretrained``; any other model as
``model.safetensors`` plus ``model.json``, which says how to rebuild it; beside either, the
tokenizer the run read text with, saved with ``save_pretrained``, and the model card
``README.md``, distill.pipeline.modelcard) and ``summary.json``.
Rerunning the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import torch.nn.functional as F

from distill.errors import ConfigError, StoreError
from distill.pipeline.adapters import (ADAPTER_DIR, StudentFlags, check_student_flags, is_adapted, merged,
                                      prepare_student, save_adapter)
from distill.pipeline.allocator import tune_allocator
from distill.pipeline.config import check_settings, setting, settings
from distill.pipeline.context import check_fits_context, resolve_seq_len, stored_seq_len
from distill.pipeline.data import DataConfig, DataFlags, ExampleSet, choose_split, load_data, only_split
from distill.pipeline.files import write_json, write_text
from distill.pipeline.labelstore import check_store_matches, open_complete_store
from distill.pipeline.losses import LOSS_NAMES, OnlineDistillationLoss, TopKDistillationLoss, make_loss
from distill.pipeline.metricsinks import LogFlags, check_sinks
from distill.pipeline.modelcard import CARD_FILE, training_card
from distill.pipeline.modelfiles import save_model
from distill.pipeline.models import (CROSSES_DOCUMENTS, LoadedModel, ModelConfig, ModelFlags, load_model,
                                    packed_attention)
from distill.pipeline.rundir import prepare_run_dir
from distill.pipeline.runtime import TRAINING_PRECISIONS, DeviceFlags, autocast, resolve_device, workers
from distill.pipeline.scoring import held_out_evaluator
from distill.pipeline.tasks import IGNORE_INDEX, position_logits
from distill.pipeline.tokenize import tokenizer_beside
from distill.pipeline.tokenfiles import looked_for_tokenizer, save_tokenizer
from distill.pipeline.sharding import check_team, gathered_weights
from distill.pipeline.trainer import RunPlace, Schedule, fit, loader_workers
from distill.storage.stream import LabelStream, labels_from_batch

__all__ = ["TrainConfig", "StudentConfig", "train_student", "train_teacher"]



@dataclasses.dataclass(frozen=True)
class LossDefaults:
    """train-student's defaults for a task (what wins the quality benchmark, docs/RESULTS.md)."""

    temperature: float
    alpha: float


DEFAULTS = {"classification": LossDefaults(temperature=2.0, alpha=0.5),
            "causal-lm": LossDefaults(temperature=1.0, alpha=0.0)}


def _default_help(name: str) -> str:
    values = {task: f"{getattr(d, name):g}" for task, d in DEFAULTS.items()}
    return f"{values['causal-lm']} for causal LMs, {values['classification']} for classifiers"


@dataclasses.dataclass(frozen=True)
class TrainConfig(Schedule, DataFlags, ModelFlags, DeviceFlags, StudentFlags, LogFlags):
    """Settings of a training run: the flags of `distill train-teacher` (train-student adds its own).

    Each field's help is its flag's; the optimiser and loop settings are the ``Schedule``'s,
    the data, model and device flags those of every stage.
    """

    out: str = setting("", "Run directory: config, metrics.jsonl, checkpoints, the final model.")
    data: str | None = setting(None, "Data spec, as for generate-labels (for a student: the data the store was made from).")
    model: str | None = setting(None, "The model to train: a built-in (mlp, cnn, gpt), a Hugging Face directory, or "
                                      "package.module:factory.")
    batch_size: int = setting(32, "Examples per batch.", minimum=1)
    eval_split: str | None = setting(None, "Held-out split to evaluate, e.g. test.",
                                     default_help="with --eval-every or --eval-data: test, or --eval-data's only split")
    eval_data: str | None = setting(None, "Data spec of the held-out split.", default_help="--data")
    shuffle_buffer: int | None = setting(None, "Examples per shuffled block of shards.", minimum=1,
                                         default_help="about 65,536 positions' worth")
    overwrite: bool = setting(False, "Start over in a run directory holding another run.")
    progress: bool = setting(True, "No progress bar or log lines.")
    precision: str = setting("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU.", choices=TRAINING_PRECISIONS,
                             kw_only=True)

    def __post_init__(self):
        check_settings(self)
        if not self.out:
            raise ConfigError("missing --out: pass the run directory")
        if not self.data or not self.model:
            raise ConfigError(f"missing --data or {_flag(type(self), 'model')}: both are required")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("pass --epochs or --steps, not both")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise ConfigError("--lr must be > 0, --min-lr-ratio in [0, 1], --weight-decay >= 0")

    def schedule(self) -> Schedule:
        """The optimiser and loop settings alone."""
        return Schedule(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Schedule)})


@dataclasses.dataclass(frozen=True)
class StudentConfig(TrainConfig):
    """train-student's settings: TrainConfig plus the store and the loss (each field's help is its flag's).

    ``tail`` False (``--no-tail``) drops the tail bucket and renormalises teacher and student
    over the k stored ids, what most offline tools do; it is kept to measure what the tail is worth.
    """

    labels: str | None = setting(None, "The soft-label store written by generate-labels.")
    model: str | None = setting(None, "Student: a built-in (mlp, cnn, gpt), a Hugging Face directory, or "
                                      "package.module:factory.", flag="--student")
    loss: str = setting("kl", "Divergence to the teacher's top-k + tail; argmax: cross-entropy on the teacher's "
                              "top-1 id (hard pseudo-labels).", choices=LOSS_NAMES)
    temperature: float | None = setting(None, "Softening temperature; the store must hold it.",
                                        default_help=_default_help("temperature"))
    alpha: float | None = setting(None, "Weight of the hard-label cross-entropy: alpha*CE + (1-alpha)*T^2*soft.",
                                  default_help=_default_help("alpha"))
    beta: float = setting(0.5, "Beta of the generalised JSD.")
    skew: float = setting(0.1, "Skew of skew-kl (DistiLLM's alpha).")
    tail: bool = setting(True, "Drop the tail bucket and renormalise over the k stored ids (what most offline tools "
                               "do; for comparison).")
    tail_samples: bool = setting(True, "Leave out the store's tail draws: the top-k and the tail bucket alone (for "
                                       "comparison, or with a --loss or --temperature the draws do not serve).")
    license: str | None = setting(None, "Licence in the student's model card (model/README.md), a Hub licence id.",
                                  default_help="the teacher's, as the store's provenance records it")

    def __post_init__(self):
        super().__post_init__()
        if not self.labels:
            raise ConfigError("missing --labels: pass the store written by `distill generate-labels`")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"--temperature must be finite and > 0, got {self.temperature}")

    def for_task(self, task: str) -> "StudentConfig":
        """This config with the task's defaults (``DEFAULTS``) where a setting was left unset."""
        unset = {name: getattr(DEFAULTS[task], name) for name in ("temperature", "alpha") if getattr(self, name) is None}
        return dataclasses.replace(self, **unset)


def _flag(cls: type, name: str) -> str:
    return next(s.flag for s in settings(cls) if s.name == name)


# --- the two stages -----------------------------------------------------------------------

def train_student(config: StudentConfig, online_teacher: LoadedModel | None = None) -> dict:
    """Train the student on the store's soft labels (and the data's hard labels); returns the summary.

    ``online_teacher`` (library only, for reference measurements): online distillation instead,
    the teacher's full-vocabulary logits computed every step replace the store's labels in the
    forward KL (``config.loss`` must be kl); the store still sets the examples and their order.
    """
    store = open_complete_store(config.labels)
    spec = store.spec
    task = spec.task if spec.task is not None else config.task
    if task is None:
        raise ConfigError(f"the store {config.labels} does not say its task: pass --task classification or causal-lm")
    config = config.for_task(task)
    loss_fn = make_loss(spec.method, config.loss, config.temperature, config.alpha, beta=config.beta, skew=config.skew,
                        sample_temperature=spec.sample_temperature or 1.0, tail=config.tail,
                        tail_samples=config.tail_samples)
    if spec.tail_samples and online_teacher is None and isinstance(loss_fn, TopKDistillationLoss):
        loss_fn.check_tail_draws()  # refused before the run directory is made, not at the first step
    if online_teacher is not None:
        if config.loss != "kl":
            raise ConfigError(f"online distillation uses the forward KL, not {config.loss!r}: pass loss='kl'")
        loss_fn = OnlineDistillationLoss(online_teacher, task, config.temperature, config.alpha)
    if config.loss != "argmax" and config.temperature != 1.0 and config.temperature not in spec.temperatures:
        held = ", ".join(f"{t:g}" for t in spec.temperatures)
        if "imported" in spec.extra:  # import-labels: the top-k alone gives no tempered normalisers
            raise ConfigError(f"temperature {config.temperature:g} needs the teacher's tempered normaliser, which the "
                              f"store {config.labels}, imported from top-k labels, does not hold (it holds {held}): pass "
                              f"--temperature one of {held}, or import a --tempered-lse-column for {config.temperature:g}")
        raise ConfigError(f"temperature {config.temperature:g} is not in the store (it holds {held}): pass --temperature "
                          f"one of {held}, or regenerate the labels with --temperature {config.temperature:g}")

    def check(student: LoadedModel, data: ExampleSet) -> None:
        check_store_matches(store, config.labels, data, student.output_size, "student")
        if student.output_size > spec.vocab_size:  # a padded vocabulary: its extra logits leave both terms
            student.use_vocabulary(spec.vocab_size)

    def loss(model, batch, student: LoadedModel) -> dict:
        logits, hard = position_logits(student, batch, task, module=model)
        labels = labels_from_batch(batch, spec.stored_temperatures)  # the trainer moved the batch to the device
        if labels.num_positions != len(logits):
            raise StoreError(f"a batch has {len(logits)} positions in the data but {labels.num_positions} in the store")
        out = loss_fn(logits, labels if online_teacher is None else batch, hard if config.alpha > 0 else None)
        return {"loss": out["loss"], "soft": out["soft"], "ce": out.get("ce"), "positions": len(logits)}

    return _train(config, task, store, check, loss)


def train_teacher(config: TrainConfig) -> dict:
    """Train a model on the data's hard labels alone (cross-entropy); returns the summary."""

    def loss(model, batch, student: LoadedModel) -> dict:
        logits, hard = position_logits(student, batch, student.task, module=model)
        ce = F.cross_entropy(logits.float(), hard, ignore_index=IGNORE_INDEX)
        return {"loss": ce, "ce": ce, "positions": (hard != IGNORE_INDEX).sum()}  # counted on the device

    return _train(config, config.task, None, lambda student, data: None, loss)


def _train(config: TrainConfig, task: str | None, store, check, loss) -> dict:
    device = resolve_device(config.device)
    team = workers(None, device)
    try:
        check_team(config.distributed, team)  # before anything is written
        check_student_flags(config, config.model, config.distributed)
        check_sinks(config.log_to)
        # config.json records the split read and the DataLoader workers used
        config = dataclasses.replace(config, eval_split=_eval_split(config),
                                     workers=loader_workers(config.workers, device))
        if device.type == "cpu":
            tune_allocator()  # a step's buffers reused, not faulted in again at every step (distill.pipeline.allocator)
        student = load_model(ModelConfig(config.model, weights=config.weights, task=task,
                                         trust_remote_code=config.trust_remote_code), device=device)
        config = dataclasses.replace(config, seq_len=_seq_len(config, student, store))  # refused before the run dir
        student.module = prepare_student(student.module, student.task, config, config.seed)  # checkpointing, LoRA
        role = "student" if store is not None else "model"  # how messages name it
        with looked_for_tokenizer(**{role: config.model}):
            data = load_data(_data_config(config, config.data, config.split, student.task))
        check(student, data)
        check_fits_context(data, f"data {config.data!r}", **{role: student})
        attention = packed_attention(student) if data.packed else None  # probed in eval mode, before .train()
        if attention == CROSSES_DOCUMENTS and team.rank == 0:
            print(f"{'train-student' if store is not None else 'train-teacher'}: the data is packed, but the {role}'s "
                  "attention crosses documents (only Hugging Face models that read packed position ids, and the "
                  "built-in gpt, keep it within each)", file=sys.stderr, flush=True)
        prepare_run_dir(config, team.rank)  # only once the data is known to fit: bad input writes nothing
        team.barrier()
        student.module.train()
        stream = LabelStream(data, store, batch_size=config.batch_size, seed=config.seed, rank=team.rank,
                             world=team.world, shuffle_buffer=config.shuffle_buffer, workers=config.workers,
                             temperature=1.0 if store is None else config.temperature)  # train-teacher: no labels
        evaluate = None
        if config.eval_split is not None:
            held_out = load_data(dataclasses.replace(  # --limit trims the training data, never the held-out split
                _data_config(config, config.eval_data or config.data, config.eval_split, student.task), limit=None))
            evaluate = held_out_evaluator(student, held_out, config.batch_size, device,
                                          lambda: autocast(config.precision, device), team)
        schedule = config.schedule()
        if schedule.eval_every is None and evaluate is not None:
            schedule = dataclasses.replace(schedule, eval_every=1 << 62)  # at the end only
        last = fit(student.module, stream, lambda model, batch: loss(model, batch, student), schedule,
                   RunPlace(config.out, team, device, lambda: autocast(config.precision, device),
                            progress=config.progress, log_to=config.log_to),
                   evaluate=evaluate)
        summary = {"out": config.out, "model": student.describe, "task": student.task, "metrics": last,
                   **({"packed_attention": attention} if attention else {}),
                   "params": sum(p.numel() for p in student.module.parameters()),
                   "trainable_params": sum(p.numel() for p in student.module.parameters() if p.requires_grad)}
        if team.rank == 0 and is_adapted(student.module):  # RUN/adapter: the adapter alone; RUN/model: merged
            save_adapter(student.module, os.path.join(config.out, ADAPTER_DIR))
            student.module = merged(student.module)
        weights = gathered_weights(student.module, team.rank)  # FSDP: every rank sends its shards to rank 0
        _suppress_padding(student)
        if team.rank == 0:
            # with the tokenizer it was trained with: the run directory works as a --teacher, the model with AutoTokenizer
            save_model(student, os.path.join(config.out, "model"), weights,
                       also=lambda path: (save_tokenizer(_tokenizer(config), path),
                                          write_text(os.path.join(path, CARD_FILE), _card(config, student, store, last))))
            write_json(os.path.join(config.out, "summary.json"), summary)
        team.barrier()
        return summary
    finally:
        team.close()


# --- pieces ---------------------------------------------------------------------------------

def _card(config: TrainConfig, student: LoadedModel, store, last: dict) -> str:
    """The model card of the saved model (distill.pipeline.modelcard): how it was made, from what."""
    library = "transformers" if student.describe.get("kind") == "hf" else "pytorch"
    if store is None:
        how = {"model": config.model, "data": config.data, "split": config.split, "loss": "cross-entropy on the "
               "hard labels", "steps": last.get("step"), "batch size": config.batch_size, "lr": config.lr}
        return training_card(how, student.task, library)
    how = {"student": config.model, "data": config.data, "split": config.split, "labels": config.labels,
           "loss": config.loss, "temperature": config.temperature, "alpha": config.alpha,
           "tail": None if config.tail else "dropped (renormalised over the k ids)", "steps": last.get("step"),
           "batch size": config.batch_size, "lr": config.lr}
    return training_card(how, student.task, library, store.spec, config.license)


def _suppress_padding(student: LoadedModel) -> None:
    """A padded vocabulary's extra ids were never trained: a Hugging Face student's generate() never picks them."""
    generation = getattr(student.module, "generation_config", None)
    if student.vocab_limit is not None and generation is not None:
        generation.suppress_tokens = list(range(student.vocab_limit, student.output_size))


def _eval_split(config: TrainConfig) -> str | None:
    """--eval-split; with --eval-every or --eval-data but no --eval-split, "test", or the held-out data's only split."""
    if config.eval_split is not None or (config.eval_every is None and config.eval_data is None):
        return config.eval_split
    if config.eval_data is None and only_split(config.data) is not None:
        raise ConfigError(f"--eval-every: data {config.data!r} has one split, which is the training data: pass "
                          "--eval-data HELD_OUT, or --eval-split NAME to evaluate on that split anyway")
    return choose_split(config.eval_data or config.data, "test", flag="--eval-split")


def _data_config(config: TrainConfig, spec: str, split: str, task: str) -> DataConfig:
    return config.data_config(spec, task=task, split=split, tokenizer=_tokenizer(config))


def _tokenizer(config: TrainConfig) -> str | None:
    """--tokenizer, else the one beside the model (a Hugging Face student's own, a run directory's)."""
    return config.tokenizer or tokenizer_beside(config.model)


def _seq_len(config: TrainConfig, student: LoadedModel, store) -> int:
    """--seq-len resolved for the model trained; a student's defaults to the store's (the data cut as for the teacher)."""
    if store is None:
        return resolve_seq_len(config.seq_len, model=student)
    return stored_seq_len(config.seq_len, store.spec.extra, config.labels, student)
