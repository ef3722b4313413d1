"""A model's files: weights in and out, a trained model saved whole, and its size on disk.

Weights load without running pickled code: safetensors, or ``torch.load(weights_only=True)``.
A trained model is saved to ``RUN/model/``: a Hugging Face model with ``save_pretrained``
(transformers loads it as it is), any other as ``model.safetensors`` plus ``model.json``,
which says how to rebuild it (``distill.pipeline.models`` reads it back). ``distill quantize``
writes ``model.json`` beside a TorchScript archive instead.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from distill.errors import ConfigError, first_line, listed, write_error
from distill.pipeline.files import read_json, write_json
from distill.pipeline.hf import WEIGHT_SUFFIXES, quiet_hf

if TYPE_CHECKING:  # models.py imports this module
    from distill.pipeline.models import LoadedModel

__all__ = ["read_state_dict", "load_weights", "save_weights", "save_model", "model_bytes", "weight_files_bytes",
           "DevicePin", "pinned_device", "looks_like_safetensors"]


# --- weights in and out ---------------------------------------------------------------------------


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``path``, without running any pickled code."""
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path!r} does not exist; check --weights")
    if path.endswith(".safetensors") or looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # SafetensorError, or OSError
            raise ConfigError(f"cannot read safetensors weights {path!r} ({first_line(e)}); re-save the state dict") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), first_line(e))
        raise ConfigError(f"weights file {path!r} holds pickled Python objects, and distill refuses to unpickle code "
                          f"({reason[:160]}); convert it to safetensors: only if you trust the file, opt in yourself with "
                          "safetensors.torch.save_file(torch.load(path, weights_only=False), 'weights.safetensors') "
                          "and pass that file") from None
    except Exception as e:  # a damaged or foreign file: RuntimeError, KeyError, EOFError, ...
        raise ConfigError(f"cannot read weights file {path!r} ({first_line(e)}); save model.state_dict() "
                          "with safetensors or torch.save") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, Mapping) else []
        raise ConfigError(f"weights file {path!r} holds a {type(state).__name__}{f' with keys {keys}' if keys else ''}, "
                          "not a state dict of tensors; save model.state_dict() itself")
    return dict(state)


def looks_like_safetensors(path: str) -> bool:
    """True when ``path`` starts like a safetensors file, whatever its name."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # 8-byte header length, then the JSON header


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Copy ``state`` into ``module``; every weight must be there once (tied weights: under one name)."""
    expected = module.state_dict().keys()
    tied: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), set()).add(name)
    aliases = {name: names for names in tied.values() for name in names}
    missing = [k for k in expected if k not in state and not (aliases.get(k, set()) & state.keys())]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {listed(missing)}"] if missing else []) + ([f"unexpected {listed(unexpected)}"] if unexpected else [])
        raise ConfigError(f"weights file {path!r} does not fit the model ({'; '.join(parts)}); "
                          "check the model spec and its options match the weights")
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first_line(e))
        raise ConfigError(f"weights file {path!r} does not fit the model ({detail}); "
                          "check the model spec and its options match the weights") from None


def save_weights(module: nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``module``'s state dict as safetensors, storing tied weights once (loads back with ``weights=``).

    ``state``: the weights to write instead of the module's own, under its names (an FSDP
    module's, gathered whole, where tied weights are copies); tied weights are stored once
    all the same, under the name safetensors' ``save_model`` keeps (the first in sorted order).
    """
    from safetensors.torch import save_file, save_model

    if state is None:
        save_model(module, os.fspath(path))
        return
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    dropped = {name: min(names) for names in groups.values() for name in names if name != min(names)}
    save_file({k: v.contiguous() for k, v in state.items() if k not in dropped}, os.fspath(path),
              metadata=dropped or None)


# --- a trained model --------------------------------------------------------------------------------


def save_model(model: LoadedModel, directory: str, state: dict[str, torch.Tensor] | None = None,
               also: Callable[[str], Any] | None = None) -> None:
    """Save ``model`` into ``directory`` (replaced whole: written beside it, then renamed into place).

    ``state``: the weights to save instead of the module's own (an FSDP-sharded module's, gathered whole).
    ``also(path)`` writes more files into the directory before it takes its final name (the
    tokenizer), so a model directory is never found without them.

    A full disk or a read-only directory is a one-line WriteError, and no half-written
    directory is left under the final name.
    """
    try:
        _save_model_files(model, directory, state, also)
    except OSError as e:
        raise write_error(e, f"the model in {directory}") from None
    finally:
        shutil.rmtree(directory + ".tmp", ignore_errors=True)  # gone once renamed; a failure's leftovers


def _save_model_files(model: LoadedModel, directory: str, state: dict[str, torch.Tensor] | None,
                      also: Callable[[str], Any] | None) -> None:
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if model.describe.get("kind") == "hf":
        if state is not None:  # gathered copies: leave out the tied ones, as transformers does with shared tensors
            kept = dict(model.module.named_parameters())
            state = {k: v for k, v in state.items() if k in kept or k not in _parameter_names(model.module)}
        with quiet_hf():
            model.module.save_pretrained(tmp, state_dict=state)
    else:
        save_weights(model.module, os.path.join(tmp, "model.safetensors"), state)
        write_json(os.path.join(tmp, "model.json"), model.describe)
    if also is not None:
        also(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _parameter_names(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters(remove_duplicate=False)}


def model_bytes(model: LoadedModel) -> tuple[int, str]:
    """Bytes of the model's saved weights on disk, and where they were counted.

    A Hugging Face directory: its weight files; a TorchScript file or a weights file (a run
    directory's model.safetensors): that file; otherwise (a built-in or factory with no file)
    the bytes its state dict would take in float32 (other dtypes at their own size), tied tensors once.
    """
    kind, spec, weights = model.describe.get("kind"), model.describe.get("spec"), model.describe.get("weights")
    counted = weight_files_bytes(spec) if kind == "hf" else None
    if counted is not None:
        return counted[0], f"files: {', '.join(counted[1])}"
    for path in (weights, spec if kind == "torchscript" else None):
        if path and os.path.isfile(path):
            return os.path.getsize(path), f"file: {os.path.basename(path)}"
    seen, size = set(), 0
    for tensor in model.module.state_dict().values():
        if not isinstance(tensor, torch.Tensor) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        size += tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())
    return size, "float32 state dict (no file)"


def weight_files_bytes(directory: str) -> tuple[int, list[str]] | None:
    """Total bytes of the weight files (WEIGHT_SUFFIXES) in ``directory`` and their names; None when it has none."""
    if not os.path.isdir(directory):
        return None
    files = sorted(f for f in os.listdir(directory) if f.endswith(WEIGHT_SUFFIXES))
    return (sum(os.path.getsize(os.path.join(directory, f)) for f in files), files) if files else None


class DevicePin(NamedTuple):
    """The one device a quantized archive runs on, why, and how to get one for another device."""

    device: str
    """Where it runs: "cpu" or "cuda:N"."""
    why: str
    """Why, as a clause: "it was traced on the CPU, ..."."""
    fix: str
    """How to run it elsewhere: "re-quantize it with --device cuda to run on a GPU"."""


def pinned_device(spec: str) -> DevicePin | None:
    """Where ``spec`` (a quantize output directory, its model/, or its model.pt) can run; None: anywhere.

    dynamic-int8 runs on the CPU (its kernels are there); a traced archive on the device its
    trace names (model.json's ``traced_on``; files written before that key hold CPU traces);
    a scripted archive, or any other model, anywhere.
    """
    if os.path.isfile(spec):
        saved = _json_object(os.path.join(os.path.dirname(spec), "model.json"))
        named = os.path.join(os.path.dirname(spec), os.path.basename(str(saved.get("file", ""))))
        if not (os.path.isfile(named) and os.path.samefile(named, spec)):
            return None
    else:
        saved = _json_object(os.path.join(spec, "model", "model.json")) or _json_object(os.path.join(spec, "model.json"))
    if saved.get("kind") != "torchscript":
        return None
    if saved.get("method") == "dynamic-int8":
        return DevicePin("cpu", "it is dynamic-int8, whose kernels run on the CPU only",
                         "quantize it with --method weight-only-int8 to run on a GPU")
    traced_on = saved.get("traced_on", "cpu" if saved.get("export") == "trace" else None)
    if traced_on is None:
        return None
    try:
        parsed = torch.device(traced_on)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{spec}: its model.json says traced_on {traced_on!r}, which is no device; "
                          "re-quantize the model") from None
    device = "cuda:0" if str(parsed) == "cuda" else str(parsed)  # a trace names an indexed device
    where = "the CPU" if device == "cpu" else device
    other = "--device cuda to run on a GPU" if device == "cpu" else "--device cpu (or another cuda:N) to run elsewhere"
    return DevicePin(device, f"it was traced on {where}, and a trace fixes its device in the code",
                     f"re-quantize it with {other}")


def _json_object(path: str) -> dict:
    obj = read_json(path)
    return obj if isinstance(obj, dict) else {}
