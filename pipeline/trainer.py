"""The training loop both training stages share: optimiser, schedule, checkpoints, metrics.

``fit`` trains a model on a ``LabelStream`` with a loss callback, resuming from the run
directory's newest checkpoint when there is one. On a CPU a resumed run ends with
weights bitwise equal to an uninterrupted run's: the data order is a pure function of
(seed, epoch), skipped batches are counted, and the optimiser, schedule and RNG states are
restored exactly.

Steps: every rank takes the same number of optimiser steps per epoch (DDP needs it):
with one process, ceil(batches / grad_accum); with several, the smallest rank's
floor(batches / grad_accum), dropping the larger ranks' last batches of that epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable

import torch
from torch.utils.data import DataLoader

from distill.errors import ConfigError, DistillError, write_error
from distill.pipeline.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from distill.pipeline.progress import Progress
from distill.pipeline.runtime import Workers
from distill.storage.stream import LabelStream

__all__ = ["Schedule", "fit", "steps_per_epoch", "total_steps"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Optimiser and loop settings (a subset of the stage configs, same names)."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int | None = None  # None: 5% of the steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_accum: int = 1
    clip_grad: float | None = 1.0
    epochs: int | None = None
    steps: int | None = None
    checkpoint_every: int = 500
    log_every: int = 10
    eval_every: int | None = None
    seed: int = 0
    workers: int = 1


def steps_per_epoch(stream: LabelStream, epoch: int, world: int, accum: int) -> int:
    if world == 1:
        return -(-stream.batches(epoch, 0) // accum)
    return min(stream.batches(epoch, r) for r in range(world)) // accum


def total_steps(stream: LabelStream, schedule: Schedule, world: int) -> int:
    if schedule.steps is not None:
        return schedule.steps
    return sum(steps_per_epoch(stream, e, world, schedule.grad_accum) for e in range(schedule.epochs or 1))


def _optimizer(model: torch.nn.Module, schedule: Schedule) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]  # biases, norms: no decay
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


def fit(module: torch.nn.Module, stream: LabelStream, batch_loss: Callable[[torch.nn.Module, dict], dict],
        schedule: Schedule, run_dir: str, team: Workers, device: torch.device, autocast,
        evaluate: Callable[[], dict] | None = None, progress: bool = True) -> dict:
    """Train ``module`` (on ``device``) for the schedule's steps; returns the last metrics.

    batch_loss(model, batch) -> {"loss": tensor, "positions": int, other scalars...}; it runs
    under ``autocast``. Checkpoints go to ``run_dir/checkpoints``, metrics (rank 0) to
    ``run_dir/metrics.jsonl``.
    """
    torch.manual_seed(schedule.seed)
    optimizer = _optimizer(module, schedule)
    total = total_steps(stream, schedule, team.world)
    if total < 1:
        raise ConfigError("the data gives no full optimiser step per rank: use a smaller --batch-size or --grad-accum")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(total, schedule))
    pos = _resume(run_dir, module, optimizer, scheduler, device)
    model = module
    if team.distributed:
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    metrics = _Metrics(run_dir, pos.step, enabled=team.rank == 0)
    bar = Progress(total, unit="steps", rate_unit="examples", enabled=progress and team.rank == 0)
    bar.done = pos.step
    last: dict = {}
    window = {"start": time.perf_counter(), "examples": 0, "positions": 0, "steps": 0, "sums": {}}

    while pos.step < total:
        per_epoch = steps_per_epoch(stream, pos.epoch, team.world, schedule.grad_accum)
        batches = stream.batches(pos.epoch)
        done_steps = -(-pos.batches_in_epoch // schedule.grad_accum)
        stream.set_epoch(pos.epoch, skip=pos.batches_in_epoch)
        loader = DataLoader(stream, batch_size=None, num_workers=schedule.workers,
                            pin_memory=device.type == "cuda", prefetch_factor=2 if schedule.workers else None,
                            generator=torch.Generator().manual_seed(schedule.seed))  # leaves the global RNG alone
        it = iter(loader)
        while pos.step < total and done_steps < per_epoch:
            n_micro = min(schedule.grad_accum, batches - pos.batches_in_epoch)
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for micro in range(n_micro):
                batch = _next_batch(it)
                sync = micro == n_micro - 1 or not team.distributed
                with (model.no_sync() if not sync else _null()), autocast():
                    out = batch_loss(model, batch)
                (out["loss"] / n_micro).backward()
                for key, value in out.items():
                    if key != "positions" and value is not None:
                        sums[key] = sums.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value) / n_micro
                window["positions"] += int(out["positions"])
                window["examples"] += int(batch["example_index"].numel())
                pos.batches_in_epoch += 1
            grad_norm = None
            if schedule.clip_grad:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), schedule.clip_grad))
            optimizer.step()
            scheduler.step()
            pos.step += 1
            done_steps += 1
            bar.update(1, int(batch["example_index"].numel()) * n_micro)
            window["steps"] += 1
            for key, value in sums.items():
                window["sums"][key] = window["sums"].get(key, 0.0) + value
            end_of_epoch = done_steps >= per_epoch
            if pos.step % schedule.log_every == 0 or pos.step == total:
                last = _log(metrics, window, pos, scheduler.get_last_lr()[0], grad_norm)
            if evaluate is not None and schedule.eval_every and (pos.step % schedule.eval_every == 0 or pos.step == total):
                last = {**last, **_eval(metrics, evaluate, pos, module)}
            if pos.step % schedule.checkpoint_every == 0 or pos.step == total:
                _checkpoint(run_dir, module, optimizer, scheduler, pos, team, end_of_epoch)
        del it, loader
        pos.epoch += 1
        pos.batches_in_epoch = 0
    bar.close()
    return last


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


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _resume(run_dir, module, optimizer, scheduler, device) -> _Position:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return _Position()
    from safetensors.torch import load_model

    load_model(module, os.path.join(ckpt, "model.safetensors"), device=str(device))
    state = load_trainer_state(ckpt)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return _Position(**state["position"])


def _checkpoint(run_dir, module, optimizer, scheduler, pos: _Position, team: Workers, end_of_epoch: bool) -> None:
    saved = dataclasses.replace(pos)
    if end_of_epoch:  # resume at the next epoch's start, not at an exhausted one
        saved.epoch, saved.batches_in_epoch = pos.epoch + 1, 0
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
             "position": dataclasses.asdict(saved)}
    if torch.cuda.is_available() and next(module.parameters()).is_cuda:
        state["cuda_rng"] = torch.cuda.get_rng_state(next(module.parameters()).device)
    if team.rank == 0:
        save_checkpoint(run_dir, pos.step, module, state)
    team.barrier()


def _log(metrics: "_Metrics", window: dict, pos: _Position, lr: float, grad_norm: float | None) -> dict:
    seconds = time.perf_counter() - window["start"]
    steps = max(1, window["steps"])
    record = {"step": pos.step, "epoch": pos.epoch, **{k: v / steps for k, v in window["sums"].items()}, "lr": lr,
              "grad_norm": grad_norm, "steps_per_s": window["steps"] / seconds if seconds else None,
              "examples_per_s": window["examples"] / seconds if seconds else None,
              "positions_per_s": window["positions"] / seconds if seconds else None}
    metrics.write(record)
    window.update(start=time.perf_counter(), examples=0, positions=0, steps=0, sums={})
    return record


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

    def __init__(self, run_dir: str, resumed_step: int, enabled: bool):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
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


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line from a crash: dropped
