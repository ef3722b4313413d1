"""Where a stage runs: the device, and its place among torchrun ranks or job-array tasks."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch

from distill.errors import ConfigError

__all__ = ["resolve_device", "Workers", "workers", "parse_shard"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> this rank's CUDA device when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but no CUDA device is available: use --device cpu or auto")
    return device


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
    """

    rank: int = 0
    world: int = 1
    distributed: bool = False

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def workers(shard: tuple[int, int] | None, device: torch.device) -> Workers:
    """torchrun's ranks (RANK/WORLD_SIZE set) or ``--shard I/N``; not both."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if shard is not None:
            raise ConfigError("--shard I/N and torchrun both split the work: use one of them")
        if not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            # a long timeout: at the end, ranks wait in a barrier for the slowest one
            torch.distributed.init_process_group(backend, timeout=datetime.timedelta(days=7))
        return Workers(torch.distributed.get_rank(), torch.distributed.get_world_size(), True)
    if shard is not None:
        return Workers(shard[0], shard[1], False)
    return Workers()
