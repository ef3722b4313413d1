"""FSDP2 training: a model's parameters, gradients and optimiser state sharded across torchrun's processes.

``--distributed fsdp`` (the ``Schedule``'s ``distributed``) under torchrun applies
``torch.distributed.fsdp.fully_shard`` to each transformer block (the members of the
model's outermost ``nn.ModuleList``s: GPT-2's ``transformer.h``, Llama's ``model.layers``,
the built-in gpt's ``blocks``), then to the whole model, so each rank holds 1/world of every
weight and all-gathers one block at a time. Its checkpoints are sharded too, written and read
with torch.distributed.checkpoint (every rank its own file; any number of ranks reads them
back); the final model is gathered whole on rank 0 and saved as an unsharded one is.

It runs on CUDA with NCCL and on the CPU with gloo (what the tests use). One process alone
(not under torchrun) is refused: there is nothing to shard across.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

from distill.errors import ConfigError
from distill.pipeline.runtime import Workers

__all__ = ["DISTRIBUTED", "check_team", "shard_model", "layer_blocks", "is_sharded", "shard_writer", "load_shards",
           "gathered_weights", "replicated_value"]

DISTRIBUTED = ("ddp", "fsdp")  # how several torchrun processes train together


def check_team(distributed: str, team: Workers) -> None:
    """Refuse ``--distributed fsdp`` in a process that is not one of several under torchrun (a ConfigError)."""
    if distributed == "fsdp" and not team.distributed:
        raise ConfigError("--distributed fsdp shards the model across torchrun's processes, and this is one process: "
                          "launch with torchrun --nproc-per-node N (N >= 2), or leave out --distributed")


def shard_model(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Shard ``module`` (already on ``device``) in place across the ``world`` ranks of the process group.

    Each block (``layer_blocks``) becomes its own FSDP unit, then the root holds the rest
    (embeddings, final norm, output layer, and weights tied between them). Make the optimiser
    after this: its parameters are the sharded ones (DTensors). Returns ``module``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in layer_blocks(module):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def layer_blocks(module: nn.Module) -> list[nn.Module]:
    """The members of ``module``'s outermost ``nn.ModuleList``s that hold parameters (a model's layers)."""
    found: list[nn.Module] = []
    lists: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and not any(name.startswith(f"{outer}.") for outer in lists):
            lists.append(name)
            found.extend(m for m in child if any(True for _ in m.parameters()))
    return found


def is_sharded(module: nn.Module) -> bool:
    """True for a module ``shard_model`` sharded."""
    if "torch.distributed.fsdp" not in sys.modules:  # nothing is sharded yet: spare every other run the import
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_writer(module: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[str], None]:
    """A function of a directory that writes this rank's shards of ``module`` and ``optimizer`` there.

    Every rank calls it with the same directory; it returns when every rank's shards and the
    ``.metadata`` that indexes them are written (a failure on any rank raises on all).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def write(directory: str) -> None:
        model_state, optimizer_state = get_state_dict(module, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)

    return write


def load_shards(directory: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the shards ``shard_writer`` wrote to ``directory`` into the sharded ``module`` and its ``optimizer``.

    Every rank calls it; the checkpoint may come from another number of ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)  # the layout to read into
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def gathered_weights(module: nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """A sharded module's whole state dict, on the CPU, on rank 0 (every rank must call it); None on the
    other ranks and for a module that is not sharded (its own ``state_dict()`` is whole)."""
    if not is_sharded(module):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if rank == 0 else None


def replicated_value(value: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor for a replicated DTensor (clip_grad_norm_'s total norm over sharded parameters)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
