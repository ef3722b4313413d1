"""Checkpoints of a training run: written whole or not at all, found again after a crash.

A checkpoint is a directory ``RUN/checkpoints/step-NNNNNNNN`` holding the model weights
(``model.safetensors``) and the trainer's state (``trainer.pt``: optimizer, schedule,
RNG, position in the data; plain tensors and numbers, loaded with ``weights_only=True``).
It is written under a temporary name, fsynced, then renamed into place, and only then
named in ``RUN/checkpoints/latest``; so a kill at any moment leaves either the previous
checkpoint or the new one, never a half-written one that looks complete.

A sharded checkpoint (FSDP training, ``save_sharded_checkpoint``) holds ``shards/``, the
model's and the optimiser's shards as torch.distributed.checkpoint writes them (one file per
rank and a ``.metadata`` written once every rank's file is), instead of ``model.safetensors``
and the optimiser in ``trainer.pt``; every rank writes its shard into the same temporary
directory, then rank 0 writes ``trainer.pt`` and renames it into place, as above.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable

import torch

from distill.errors import ConfigError, first_line, is_write_failure, write_error
from distill.pipeline.modelfiles import save_weights
from distill.pipeline.runtime import Workers
from distill.storage.fs import fsync_dir, fsync_file

__all__ = ["save_checkpoint", "save_sharded_checkpoint", "latest_checkpoint", "load_trainer_state", "SHARDS"]

KEEP = 2  # the newest checkpoints kept; older ones are removed once a newer one is in place
SHARDS = "shards"  # a sharded checkpoint's directory of model and optimiser shards


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, trainer_state: dict) -> str:
    """Write checkpoint ``step`` atomically; returns its directory."""
    root = os.path.join(run_dir, "checkpoints")
    tmp = os.path.join(root, f".step-{step:08d}.tmp-{uuid.uuid4().hex[:8]}")
    return _commit(root, step, tmp, lambda: save_weights(model, os.path.join(tmp, "model.safetensors")), trainer_state)


def save_sharded_checkpoint(run_dir: str, step: int, write_shards: Callable[[str], None], trainer_state: dict,
                            team: Workers) -> str:
    """Write sharded checkpoint ``step`` atomically; every rank of ``team`` calls it; returns its directory.

    write_shards(directory) writes this rank's shards into ``directory`` (the checkpoint's
    ``SHARDS``, made empty by rank 0 first) and returns once every rank's are written, as
    torch.distributed.checkpoint's ``save`` does; ``trainer_state`` (rank 0's) goes to ``trainer.pt``.
    """
    root = os.path.join(run_dir, "checkpoints")
    tmp = os.path.join(root, f".step-{step:08d}.tmp-sharded")  # one name every rank knows without being told
    if team.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed attempt at this step
        try:
            os.makedirs(os.path.join(tmp, SHARDS))
        except OSError as e:
            raise write_error(e, f"checkpoint {os.path.join(root, f'step-{step:08d}')}") from None
    team.barrier()
    if team.rank != 0:
        write_shards(os.path.join(tmp, SHARDS))  # a failure on any rank raises on every rank
        return os.path.join(root, f"step-{step:08d}")
    return _commit(root, step, tmp, lambda: write_shards(os.path.join(tmp, SHARDS)), trainer_state)


def _commit(root: str, step: int, tmp: str, write: Callable[[], None], trainer_state: dict) -> str:
    """Fill ``tmp`` (``write()``, then ``trainer.pt``), fsync it, rename it to checkpoint ``step``, point
    ``latest`` at it and drop the oldest checkpoints; a failure leaves no trace of the new one."""
    name = f"step-{step:08d}"
    final = os.path.join(root, name)
    pointer = os.path.join(root, f".latest.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp, exist_ok=True)
        write()
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
        _fsync_tree(tmp)
        if os.path.exists(final):  # a rerun redid this step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        with open(pointer, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer, os.path.join(root, "latest"))
    except Exception as e:  # a full disk surfaces as OSError, torch's RuntimeError or a SafetensorError
        for leftover in (tmp, pointer):
            shutil.rmtree(leftover, ignore_errors=True) if os.path.isdir(leftover) else _unlink(leftover)
        if is_write_failure(e):
            raise write_error(e, f"checkpoint {final}") from None
        raise
    fsync_dir(root)
    for old in _complete(root)[:-KEEP]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    for entry in os.listdir(root):  # leftovers of a crash mid-write
        if ".tmp-" in entry and not entry.endswith(name):
            path = os.path.join(root, entry)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
    return final


def _fsync_tree(directory: str) -> None:
    for parent, _, files in os.walk(directory):
        for f in files:
            fsync_file(os.path.join(parent, f))
        fsync_dir(parent)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _complete(root: str) -> list[str]:
    return sorted(e for e in os.listdir(root) if e.startswith("step-") and os.path.isfile(os.path.join(root, e, "trainer.pt")))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    try:
        with open(os.path.join(root, "latest")) as f:
            name = f.read().strip()
        if name in _complete(root):
            return os.path.join(root, name)
    except FileNotFoundError:
        pass
    done = _complete(root)  # the pointer is written last: fall back to what is complete
    return os.path.join(root, done[-1]) if done else None


def load_trainer_state(checkpoint: str) -> dict:
    try:
        return torch.load(os.path.join(checkpoint, "trainer.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any damage is the same user-facing problem
        raise ConfigError(f"checkpoint {checkpoint} is unreadable ({type(e).__name__}: {first_line(e)}); "
                          "delete it to resume from the one before, or use a new --out") from None
