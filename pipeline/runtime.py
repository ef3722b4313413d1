"""Where a stage runs: the device, its numeric precision, and its place among torchrun ranks or job-array tasks.

One precision vocabulary for every command (``--precision``):

    auto   bfloat16 autocast on CUDA (and, for a teacher in generate-labels, bfloat16 weights),
           float32 on the CPU
    fp32   float32 everywhere
    bf16   bfloat16 autocast (and, for a teacher in generate-labels, bfloat16 weights)
    fp16   float16 likewise (inference only: training would need loss scaling)

A teacher's output layer runs in float32 whatever the precision (``float32_output_layer``
in ``distill.pipeline.models``): its logits are what the store's exact log-probabilities are
computed from.

Devices under torchrun: ``auto`` and a bare ``cuda`` are this rank's GPU (``LOCAL_RANK``),
made the current device before anything touches CUDA, and the process group is bound to
it: every rank keeps to its own GPU (no duplicate NCCL devices, no stray contexts on GPU 0).
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import os
from contextlib import AbstractContextManager, nullcontext

import torch

from distill.errors import ConfigError
from distill.pipeline.batching import PackedBatch
from distill.pipeline.config import setting

__all__ = ["DeviceFlags", "PRECISIONS", "TRAINING_PRECISIONS", "PRECISION_ALIASES", "resolve_device", "module_device", "precision_name",
           "compute_dtype", "weight_dtype", "autocast", "to_device", "pin", "Workers", "workers", "parse_shard"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRAINING_PRECISIONS = ("auto", "fp32", "bf16")  # fp16 training needs loss scaling, which the trainer does not do
PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # generate-labels' old --dtype names
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceFlags:
    """Where and in what precision a stage runs: the flags every stage that runs a model shares (keyword-only)."""

    device: str = setting("auto", "auto, cpu, cuda or cuda:N; auto is this rank's CUDA device when there is one.")
    precision: str = setting("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU.", choices=PRECISIONS,
                             value_aliases=PRECISION_ALIASES)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's CUDA device when there is one, else the CPU; ``cuda`` -> this rank's CUDA device.

    This rank's device is ``LOCAL_RANK`` (set by torchrun; 0 otherwise) modulo the visible
    devices. A CUDA device found here becomes the current device (``torch.cuda.set_device``),
    so nothing later creates a context on another GPU. ``cuda:N`` under torchrun with several
    ranks on a node would put them all on one GPU: refused.
    """
    if name == "auto":
        return _current(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for but no CUDA device is available: use --device cpu or auto")
        return _current(device)
    return device


def _current(device: torch.device) -> torch.device:
    """A CUDA device with its index (a bare ``cuda`` is this rank's), made the current device."""
    count = torch.cuda.device_count()
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % count)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"--device {device} puts every torchrun rank of this node on one GPU: use --device cuda "
                          "(or auto), which gives each rank its own (LOCAL_RANK), or CUDA_VISIBLE_DEVICES")
    elif device.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    torch.cuda.set_device(device)
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    first = next(iter(module.parameters()), None)
    if first is None:
        first = next(iter(module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def precision_name(name: str, allowed: tuple[str, ...] = PRECISIONS, flag: str = "--precision") -> str:
    """``name`` in the one vocabulary (old dtype names map onto it); a name not in ``allowed`` is a ConfigError."""
    name = PRECISION_ALIASES.get(name, name)
    if name not in allowed:
        raise ConfigError(f"unknown {flag} {name!r}: use {', '.join(allowed)}")
    return name


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype matrix products run in: ``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


def weight_dtype(precision: str, device: torch.device | None = None) -> torch.dtype | None:
    """The dtype a teacher's weights are loaded in: None (float32) for fp32, and for auto off CUDA.

    ``auto`` on CUDA is bfloat16: autocast would run every matmul in bfloat16 anyway, and
    float32 weights would cost twice the memory plus autocast's bfloat16 copy of each.
    """
    if precision == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else None
    return None if precision == "fp32" else _DTYPES[precision]


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """A fresh context that runs ``precision``'s compute dtype on ``device`` (none for float32)."""
    dtype = compute_dtype(precision, device)
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of ``batch`` on ``device``; host-to-GPU copies are asynchronous only from pinned memory
    (``pin``), so only those are asked to be. A ``PackedBatch`` (from a DataLoader worker) goes as one buffer."""
    if isinstance(batch, PackedBatch):
        return batch.to(device)
    if device.type == "cpu":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=v.is_pinned()) for k, v in batch.items()}


def pin(batch: dict) -> dict:
    """``batch`` in page-locked host memory, for a CUDA device: its copies to the GPU can overlap compute."""
    return {k: v.pin_memory() for k, v in batch.items()}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with 0 <= I < N (a job-array task's share of the work)."""
    if text is None:
        return None
    i, slash, n = str(text).partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index = count = -1
    if not slash or count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {text!r} is not I/N with 0 <= I < N: e.g. --shard 0/4 for the first of 4 tasks")
    return index, count


@dataclasses.dataclass
class Workers:
    """This process's place in the job: ``rank`` of ``world`` workers.

    ``distributed`` is True under torchrun (a process group is up: barriers work);
    a job-array task (``--shard I/N``) has a rank and a world but no process group.
    ``device`` is this rank's CUDA device under NCCL (its barriers run there), else None.
    """

    rank: int = 0
    world: int = 1
    distributed: bool = False
    device: torch.device | None = None

    def barrier(self) -> None:
        if self.distributed:
            if self.device is not None:
                torch.distributed.barrier(device_ids=[self.device.index])
            else:
                torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def workers(shard: tuple[int, int] | None, device: torch.device) -> Workers:
    """torchrun's ranks (RANK/WORLD_SIZE set) or ``--shard I/N``; not both.

    Under torchrun the process group is NCCL on CUDA (bound to ``device``, this rank's GPU,
    which ``resolve_device`` made current) and gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if shard is not None:
            raise ConfigError("--shard I/N and torchrun both split the work: use one of them")
        cuda = device.type == "cuda"
        if not torch.distributed.is_initialized():
            # a long timeout: at the end, ranks wait in a barrier for the slowest one
            options: dict = {"timeout": datetime.timedelta(days=7)}
            if cuda and "device_id" in inspect.signature(torch.distributed.init_process_group).parameters:
                options["device_id"] = device  # NCCL connects eagerly, on this rank's GPU only
            torch.distributed.init_process_group("nccl" if cuda else "gloo", **options)
        return Workers(torch.distributed.get_rank(), torch.distributed.get_world_size(), True,
                       device if cuda else None)
    if shard is not None:
        return Workers(shard[0], shard[1], False)
    return Workers()
