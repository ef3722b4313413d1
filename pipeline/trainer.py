"""The training loop both training stages share: optimiser, schedule, checkpoints, metrics.

``fit`` trains a model on a ``LabelStream`` with a loss callback, resuming from the run
directory's newest checkpoint when there is one. On a CPU a resumed run ends with
weights bitwise equal to an uninterrupted run's: the data order is a pure function of
(seed, epoch), skipped batches are counted, and the optimiser, schedule and RNG states are
restored exactly.

Steps: every rank takes the same number of optimiser steps per epoch (DDP needs it):
with one process, ceil(batches / grad_accum); with several, the smallest rank's
floor(batches / grad_accum), dropping the larger ranks' last batches of that epoch.

Several processes (torchrun) train with DDP (a whole copy of the model per rank) or, with
``distributed="fsdp"``, FSDP2 (``distill.pipeline.sharding``: each rank holds a shard of the
weights, gradients and optimiser state; checkpoints are sharded). Resuming is exact either way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch.utils.data import DataLoader

from distill.errors import ConfigError, DistillError, write_error
from distill.pipeline.batching import pack_batch
from distill.pipeline.checkpoint import (SHARDS, latest_checkpoint, load_trainer_state, save_checkpoint,
                                         save_sharded_checkpoint)
from distill.pipeline.config import setting
from distill.pipeline.metricsinks import open_sinks
from distill.pipeline.progress import Progress, loss_text
from distill.pipeline.runtime import Workers, to_device
from distill.pipeline.sharding import (DISTRIBUTED, check_team, load_shards, replicated_value, shard_model,
                                       shard_writer)
from distill.storage.stream import LabelStream

__all__ = ["Schedule", "RunPlace", "fit", "loader_workers", "make_optimizer", "steps_per_epoch", "total_steps"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """How long and how a model trains: the optimiser and loop settings (keyword-only).

    The training configs (train-teacher, train-student) inherit these fields, so their flags
    and defaults are these.
    """

    epochs: int | None = setting(None, "Passes over the data.", minimum=1, default_help="1")
    steps: int | None = setting(None, "Optimiser steps (instead of --epochs).", minimum=1)
    grad_accum: int = setting(1, "Batches per optimiser step.", minimum=1)
    lr: float = setting(1e-3, "Peak learning rate of AdamW.")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases and norms).")
    warmup_steps: int | None = setting(None, "Linear warm-up steps.", minimum=0, default_help="5% of the steps")
    min_lr_ratio: float = setting(0.1, "Cosine decay ends at lr times this.")
    clip_grad: float | None = setting(1.0, "Gradient-norm clipping.")
    seed: int = setting(0, "Seed of the data order and dropout.")
    eval_every: int | None = setting(None, "Evaluate on --eval-split every N steps (and at the end).", minimum=1)
    checkpoint_every: int = setting(500, "Checkpoint every N steps (and at the end).", minimum=1)
    log_every: int = setting(10, "Metrics line every N steps.", minimum=1)
    workers: int | None = setting(None, "DataLoader worker processes (0: load in the training process).", minimum=0,
                                  default_help="1 on a GPU, 0 on a CPU")
    distributed: str = setting("ddp", "How torchrun's processes train together: ddp (a whole model per process) or "
                                      "fsdp (FSDP2: weights, gradients and optimiser state sharded across them).",
                               choices=DISTRIBUTED)


@dataclasses.dataclass(frozen=True)
class RunPlace:
    """Where and how a run executes, as opposed to what it does (the ``Schedule``)."""

    run_dir: str
    """The run directory: checkpoints go to ``run_dir/checkpoints``, metrics to ``run_dir/metrics.jsonl``."""
    team: Workers
    """This process's rank among the processes training together (``Workers()``: alone)."""
    device: torch.device
    """Where the model is; batches are pinned for it when it is a CUDA device."""
    autocast: Callable[[], AbstractContextManager]
    """A new context to run each micro-batch's forward pass and loss under (bf16 autocast, or a null context)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    log_to: tuple[str, ...] = ()
    """Live metrics sinks besides metrics.jsonl (``distill.pipeline.metricsinks``): tensorboard, wandb."""


def loader_workers(workers: int | None, device: torch.device) -> int:
    """DataLoader worker processes: ``workers``, or by default 1 for a GPU and 0 for a CPU.

    A worker overlaps reading and collating the next batch with a GPU's step. On a CPU the
    model's intra-op threads already keep every core busy, so a worker process only takes its
    time from them and adds the batch's trip through shared memory: measured on 2 cores
    (``benchmarks/train.py``'s workloads, alternated in one process, two runs), training with
    none ran 9-17% more steps a second on the causal LM and 20-36% more on the classifier. The
    order of the batches is the same with 0 workers as with 1 (``LabelStream``).
    """
    if workers is not None:
        return workers
    return 0 if torch.device(device).type == "cpu" else 1


def steps_per_epoch(stream: LabelStream, epoch: int, world: int, accum: int) -> int:
    if world == 1:
        return -(-stream.batches(epoch, 0) // accum)
    return min(stream.batches(epoch, r) for r in range(world)) // accum


def total_steps(stream: LabelStream, schedule: Schedule, world: int) -> int:
    if schedule.steps is not None:
        return schedule.steps
    return sum(steps_per_epoch(stream, e, world, schedule.grad_accum) for e in range(schedule.epochs or 1))


def make_optimizer(module: torch.nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    """AdamW over ``module``'s trainable parameters at ``schedule.lr``; weight decay on matrices only."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]  # biases, norms: no decay
    groups = [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=schedule.lr)


def _lr_factor(total: int, schedule: Schedule) -> Callable[[int], float]:
    warmup = schedule.warmup_steps if schedule.warmup_steps is not None else max(1, total // 20)

    def factor(step: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


@dataclasses.dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    examples: int = 0
    positions: int = 0


@dataclasses.dataclass
class _Window:
    """What happened since the last metrics line: for its rates and mean scalars.

    Scalars the device computes (losses, positions counted on it, the gradient norm) stay
    device tensors, summed there; ``record`` reads them back once, for the metrics line.
    """

    start: float = dataclasses.field(default_factory=time.perf_counter)
    examples: int = 0
    positions: int | torch.Tensor = 0
    steps: int = 0
    sums: dict[str, float | torch.Tensor] = dataclasses.field(default_factory=dict)  # per-step means, summed

    def add_step(self, sums: dict[str, float | torch.Tensor]) -> None:
        self.steps += 1
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def record(self, pos: _Position, lr: float, grad_norm: float | torch.Tensor | None) -> dict:
        """The metrics line for the window ending at ``pos`` (the one host synchronisation of the window)."""
        names = list(self.sums)
        values = _read_back([self.sums[k] for k in names] + [self.positions, grad_norm])
        sums, positions, grad_norm = dict(zip(names, values[:len(names)])), values[-2], values[-1]
        seconds = time.perf_counter() - self.start
        steps = max(1, self.steps)
        return {"step": pos.step, "epoch": pos.epoch, **{k: v / steps for k, v in sums.items()}, "lr": lr,
                "grad_norm": grad_norm, "steps_per_s": self.steps / seconds if seconds else None,
                "examples_per_s": self.examples / seconds if seconds else None,
                "positions_per_s": positions / seconds if seconds else None}


def _read_back(values: list) -> list:
    """Tensors among ``values`` as Python floats, read in one copy from the device; other values as they are."""
    tensors = [v for v in values if torch.is_tensor(v)]
    if not tensors:
        return values
    numbers = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist())
    return [next(numbers) if torch.is_tensor(v) else v for v in values]


def fit(module: torch.nn.Module, stream: LabelStream, batch_loss: Callable[[torch.nn.Module, dict], dict],
        schedule: Schedule, place: RunPlace, evaluate: Callable[[], dict] | None = None) -> dict:
    """Train ``module`` (on ``place.device``) for the schedule's steps; returns the last metrics.

    batch_loss(model, batch) -> {"loss": tensor, "positions": int, other scalars...}; it runs
    under ``place.autocast()``. evaluate() -> dict runs every ``schedule.eval_every`` steps and
    at the end. Checkpoints go to ``place.run_dir/checkpoints``, metrics (rank 0) to
    ``place.run_dir/metrics.jsonl``; a run directory with a checkpoint is resumed from it.
    """
    torch.manual_seed(schedule.seed)
    loop = _Loop(module, stream, batch_loss, schedule, place, evaluate)  # resumes from the newest checkpoint
    try:
        while loop.pos.step < loop.total:
            loop.run_epoch()
    finally:
        loop.metrics.close()
    loop.bar.close()
    return loop.last


class _Loop:
    """One call of ``fit``: its optimiser, LR schedule, position in the data, metrics and progress bar."""

    def __init__(self, module: torch.nn.Module, stream: LabelStream,
                 batch_loss: Callable[[torch.nn.Module, dict], dict], schedule: Schedule, place: RunPlace,
                 evaluate: Callable[[], dict] | None):
        self.module, self.stream, self.batch_loss = module, stream, batch_loss
        self.schedule, self.place, self.evaluate = schedule, place, evaluate
        check_team(schedule.distributed, place.team)
        self.sharded = schedule.distributed == "fsdp"
        if self.sharded:  # before the optimiser: its parameters are the shards
            shard_model(module, place.device, place.team.world)
        self.optimizer = make_optimizer(module, schedule)
        self.total = total_steps(stream, schedule, place.team.world)
        # (with --steps too: an epoch of no step per rank, e.g. fewer shards than ranks, would loop for ever)
        if self.total < 1 or steps_per_epoch(stream, 0, place.team.world, schedule.grad_accum) < 1:
            raise ConfigError("the data gives no full optimiser step per rank: use a smaller --batch-size or "
                              "--grad-accum, or fewer ranks than the store has shards")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(self.total, schedule))
        self.pos = _resume(place.run_dir, module, self.optimizer, self.scheduler, place.device, self.sharded)
        self.model = self._wrapped()
        self.metrics = _Metrics(place.run_dir, self.pos.step, enabled=place.team.rank == 0, log_to=place.log_to)
        self.bar = Progress(self.total, unit="steps", rate_unit="examples",
                            enabled=place.progress and place.team.rank == 0)
        self.bar.done = self.pos.step
        self.last: dict = {}
        self.window = _Window()

    def _wrapped(self) -> torch.nn.Module:
        """The module the loss calls: DDP around it when several processes train together (and not FSDP,
        which shards the module itself)."""
        if not self.place.team.distributed or self.sharded:
            return self.module
        device = self.place.device
        device_ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids)

    def run_epoch(self) -> None:
        """The optimiser steps left in the position's epoch (up to the total), then on to the next epoch."""
        accum = self.schedule.grad_accum
        per_epoch = steps_per_epoch(self.stream, self.pos.epoch, self.place.team.world, accum)
        batches = self.stream.batches(self.pos.epoch)
        done_steps = -(-self.pos.batches_in_epoch // accum)
        it = iter(self._epoch_loader())  # its workers stop when this method returns
        while self.pos.step < self.total and done_steps < per_epoch:
            n_micro = min(accum, batches - self.pos.batches_in_epoch)  # an epoch's last step may have fewer
            sums, examples = self._accumulate(it, n_micro)
            grad_norm = self._optimiser_step()
            done_steps += 1
            self._after_step(sums, examples, grad_norm, end_of_epoch=done_steps >= per_epoch)
        self.pos.epoch += 1
        self.pos.batches_in_epoch = 0

    def _epoch_loader(self) -> DataLoader:
        """The position's epoch, from its next batch on (the batches before it are skipped, not loaded)."""
        schedule = self.schedule
        n = loader_workers(schedule.workers, self.place.device)
        self.stream.set_epoch(self.pos.epoch, skip=self.pos.batches_in_epoch)
        return DataLoader(self.stream, batch_size=None, num_workers=n,
                          collate_fn=pack_batch if n else None,  # one buffer crosses, not one per field
                          pin_memory=self.place.device.type == "cuda", prefetch_factor=2 if n else None,
                          generator=torch.Generator().manual_seed(schedule.seed))  # leaves the global RNG alone

    def _accumulate(self, it, n_micro: int) -> tuple[dict, int]:
        """Gradients of one optimiser step's ``n_micro`` batches -> (their mean scalars, examples for the bar)."""
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(n_micro):
            batch = to_device(_next_batch(it), self.place.device)  # pinned by the loader: an asynchronous copy
            sync = micro == n_micro - 1 or not self.place.team.distributed  # DDP all-reduces on the last only
            if self.sharded:  # FSDP: reduce-scatter on the last only
                self.module.set_requires_gradient_sync(sync)
            with (self.model.no_sync() if not sync and not self.sharded else nullcontext()), self.place.autocast():
                out = self.batch_loss(self.model, batch)
            (out["loss"] / n_micro).backward()
            _add_scalars(sums, out, n_micro)
            self.window.positions += out["positions"]  # an int, or a count still on the device
            self.window.examples += int(batch["example_index"].numel())
            self.pos.batches_in_epoch += 1
        return sums, int(batch["example_index"].numel()) * n_micro

    def _optimiser_step(self) -> torch.Tensor | None:
        """Clip, step the optimiser and the LR schedule; returns the gradient norm before clipping (a device
        scalar, not read back here), if clipped."""
        grad_norm = None
        if self.schedule.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.schedule.clip_grad).detach()
            if self.sharded:  # over FSDP's shards: a DTensor every rank holds whole
                grad_norm = replicated_value(grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def _after_step(self, sums: dict, examples: int, grad_norm: torch.Tensor | None, end_of_epoch: bool) -> None:
        """Count the step; log, evaluate and checkpoint when it is their turn (and always at the last step)."""
        self.pos.step += 1
        self.bar.update(1, examples)
        self.window.add_step(sums)
        if self._due(self.schedule.log_every):
            self.last = self._log(grad_norm)
        if self.evaluate is not None and self.schedule.eval_every and self._due(self.schedule.eval_every):
            self.last = {**self.last, **_eval(self.metrics, self.evaluate, self.pos, self.module)}
        if self._due(self.schedule.checkpoint_every):
            self._checkpoint(end_of_epoch)

    def _due(self, every: int) -> bool:
        return self.pos.step % every == 0 or self.pos.step == self.total

    def _log(self, grad_norm: torch.Tensor | None) -> dict:
        record = self.window.record(self.pos, self.scheduler.get_last_lr()[0], grad_norm)
        self.metrics.write(record)
        self.bar.note = loss_text(record)  # the progress lines show the latest logged loss
        self.window = _Window()
        return record

    def _checkpoint(self, end_of_epoch: bool) -> None:
        saved = dataclasses.replace(self.pos)
        if end_of_epoch:  # resume at the next epoch's start, not at an exhausted one
            saved.epoch, saved.batches_in_epoch = self.pos.epoch + 1, 0
        state = {"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                 "position": dataclasses.asdict(saved)}
        if torch.cuda.is_available() and next(self.module.parameters()).is_cuda:
            state["cuda_rng"] = torch.cuda.get_rng_state(next(self.module.parameters()).device)
        if self.sharded:  # the optimiser's state is in the shards
            save_sharded_checkpoint(self.place.run_dir, self.pos.step, shard_writer(self.module, self.optimizer),
                                    state, self.place.team)
        elif self.place.team.rank == 0:
            save_checkpoint(self.place.run_dir, self.pos.step, self.module,
                            {"optimizer": self.optimizer.state_dict(), **state})
        self.place.team.barrier()


def _add_scalars(sums: dict, out: dict, n_micro: int) -> None:
    """Adds ``out``'s scalars (all but ``positions``), each divided by ``n_micro``, to ``sums``: device
    tensors stay on the device (reading one back would make the host wait for the step)."""
    for key, value in out.items():
        if key != "positions" and value is not None:
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            sums[key] = sums.get(key, 0.0) + value / n_micro


def _next_batch(it):
    """The next batch; a DistillError raised in a DataLoader worker comes back as itself, one line.

    The DataLoader re-raises a worker's exception as the same type with the worker's whole
    traceback as its message; the user's error is its last line.
    """
    try:
        return next(it)
    except DistillError as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        name = f"{type(e).__module__}.{type(e).__name__}: "
        raise type(e)(last[len(name):] if last.startswith(name) else last) from None


def _resume(run_dir, module, optimizer, scheduler, device, sharded: bool) -> _Position:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return _Position()
    if os.path.isdir(os.path.join(ckpt, SHARDS)) != sharded:
        how = "without" if sharded else "with"
        raise ConfigError(f"checkpoint {ckpt} was written {how} --distributed fsdp: resume it the way it was "
                          "written, or use a new --out")
    state = load_trainer_state(ckpt)
    if sharded:
        load_shards(os.path.join(ckpt, SHARDS), module, optimizer)
    else:
        from safetensors.torch import load_model

        load_model(module, os.path.join(ckpt, "model.safetensors"), device=str(device))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return _Position(**state["position"])


def _eval(metrics: "_Metrics", evaluate, pos: _Position, module: torch.nn.Module) -> dict:
    was_training = module.training
    module.eval()
    with torch.inference_mode():
        result = evaluate()
    module.train(was_training)
    metrics.write({"step": pos.step, "eval": result})
    return {"eval": result}


class _Metrics:
    """``metrics.jsonl``: one JSON object per line; a resumed run drops lines past its checkpoint."""

    def __init__(self, run_dir: str, resumed_step: int, enabled: bool, log_to: tuple[str, ...] = ()):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self.sinks = open_sinks(log_to, run_dir, resumed_step) if enabled else None  # TensorBoard, wandb
        if enabled and os.path.exists(self.path):
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and _step(ln) <= resumed_step]
            try:
                with open(self.path, "w") as f:
                    f.writelines(keep)
            except OSError as e:
                raise write_error(e, self.path) from None

    def write(self, record: dict) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise write_error(e, self.path) from None
            if self.sinks is not None:
                self.sinks.write(record)

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line from a crash: dropped
