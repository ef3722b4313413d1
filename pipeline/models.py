"""Model specs: turn what the user passed into a module, its task, output size and fingerprint.

A model spec is one of, tried in this order:

    path/to/hf-dir            a local Hugging Face directory (has config.json): Auto classes,
                              remote code only with trust_remote_code
    path/to/model.pt          a TorchScript archive (what torch.jit.save writes)
    mlp | cnn | gpt[:k=v,..]  a built-in small architecture (pipeline/architectures.py)
    package.module:factory    a callable returning an nn.Module (runs the user's code, by design)

``weights`` (built-ins and factories) is a state dict in a .safetensors file, or in a torch
file read with ``torch.load(weights_only=True)``: no pickled code ever runs.

Output size of a factory or TorchScript model: its ``output_size``, ``num_classes`` or
``vocab_size`` attribute (the first that is a positive int), else the ``out_features`` of
its last registered ``nn.Linear``, else a ConfigError asking for an ``output_size``
attribute. ``LoadedModel.logits`` checks every result's shape against it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distill.errors import ConfigError, first_line
from distill.pipeline.architectures import BUILTINS, build_builtin, resolve_options
from distill.pipeline.config import setting
from distill.pipeline.context import module_context_length
from distill.pipeline.fingerprint import Fingerprint
from distill.pipeline.hf import hf_logits, hf_output_size, load_hf
from distill.pipeline.modelfiles import load_weights, read_state_dict
from distill.pipeline.runtime import module_device
from distill.pipeline.specs import resolve_callable, split_builtin
from distill.pipeline.tasks import TASKS

__all__ = ["BUILTINS", "ModelFlags", "ModelConfig", "LoadedModel", "load_model", "model_fingerprint",
           "build_builtin", "output_layer", "float32_output_layer", "PER_DOCUMENT", "CROSSES_DOCUMENTS",
           "packed_attention"]

# describe() keys that say where a model was read from, not what it is: left out of the fingerprint
_LOCATION_KEYS = ("spec", "weights")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelFlags:
    """How a model spec is loaded: the flags every stage that loads a model shares (keyword-only)."""

    weights: str | None = setting(None, "Weights for the model: .safetensors, or a state dict (loaded with "
                                        "weights_only=True, never unpickling code).")
    trust_remote_code: bool = setting(False, "Let a Hugging Face model run Python code from its directory.")
    task: str | None = setting(None, "The task.", choices=TASKS, default_help="inferred from the model")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model to load, as the user gave it."""

    spec: str
    """A Hugging Face directory, a TorchScript file, a built-in (``mlp:hidden=512``) or ``package.module:factory``."""
    weights: str | None = None
    """A state dict for a built-in or a factory: .safetensors, or a torch file (.pt/.bin/.pth) of tensors only."""
    task: str | None = None
    """``classification`` or ``causal-lm``; None takes it from the model (HF architectures, a ``task`` attribute)."""
    trust_remote_code: bool = False
    """Let transformers run Python code shipped inside a Hugging Face directory."""

    def __post_init__(self) -> None:
        if isinstance(self.spec, os.PathLike):
            object.__setattr__(self, "spec", os.fspath(self.spec))
        if isinstance(self.weights, os.PathLike):
            object.__setattr__(self, "weights", os.fspath(self.weights))
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ConfigError("model spec is empty; pass a Hugging Face directory, TorchScript file, "
                              f"built-in ({', '.join(BUILTINS)}) or package.module:factory")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ConfigError(f"weights {self.weights!r} is not a file path; pass --weights path/to/model.safetensors")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task {self.task!r} is not one of {', '.join(TASKS)}; pass --task {' or --task '.join(TASKS)}")
        if not isinstance(self.trust_remote_code, bool):
            raise ConfigError(f"trust_remote_code must be true or false, not {self.trust_remote_code!r}")


@dataclasses.dataclass
class LoadedModel:
    """A model ready to produce logits, with what the stages need to know about it."""

    module: nn.Module
    """In eval mode, on the device it was loaded for."""
    task: str
    output_size: int
    """Number of classes (classification) or vocabulary size (causal-lm): the logits' last dim."""
    fingerprint: str
    """``model_fingerprint(module, describe)``: changes when any weight or the architecture changes."""
    describe: dict
    """JSON-able: kind, spec, weights, task and the kind's own settings; enough to rebuild the model."""
    vocab_limit: int | None = None
    """Logits beyond the first ``vocab_limit`` are left out (``use_vocabulary``): a padded vocabulary's extra ids."""
    context_length: int | None = None
    """The most tokens one sequence may hold (``distill.pipeline.context``); None when the model does not say."""

    def use_vocabulary(self, size: int) -> None:
        """From now on ``logits`` gives the first ``size`` of a causal LM's ``output_size`` logits.

        A student whose embedding is padded (32,064 outputs for a teacher's 32,000 ids) is
        trained and scored over the teacher's ids: its extra logits take no part in any softmax.
        """
        if not 0 < size <= self.output_size or self.task != "causal-lm":
            raise ValueError(f"a {self.task} model of {self.output_size} outputs cannot be restricted to {size}")
        self.vocab_limit = size if size < self.output_size else None

    def logits(self, batch: dict) -> torch.Tensor:
        """Raw logits in the module's dtype: classification (B, C), causal-lm (B, L, V), where V is
        ``vocab_limit`` when set (the first V of the model's ``output_size``).

        ``batch`` holds float features ``inputs`` (B, F), or token ids ``input_ids`` (B, L)
        right-padded and their ``attention_mask`` (B, L), and for packed documents
        ``position_ids`` (B, L), which Hugging Face models and the built-in gpt read (see
        ``packed_attention``); other models get the token ids alone. Tensors are moved to the
        module's device; float features are cast to its dtype.
        """
        if self.describe.get("kind") == "hf":
            out = hf_logits(self.module, batch, self.task)
        elif self.describe.get("kind") == "builtin" and self.task == "causal-lm" and "position_ids" in batch:
            ids = _model_input(self.module, batch)
            out = self.module(ids, position_ids=batch["position_ids"].to(ids.device))
        else:
            out = self.module(_model_input(self.module, batch))
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, Mapping) and "logits" in out:
            out = out["logits"]
        _check_logits(out, batch, self.task, self.output_size, self.describe.get("spec"))
        return out if self.vocab_limit is None else out[..., : self.vocab_limit]


def load_model(config: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Resolve ``config.spec``, load the weights, cast to ``dtype`` (None: float32), move to ``device``.

    The fingerprint is taken after the cast, on the weights that will produce the logits.
    """
    config = _saved_model(config)
    kind, target = _resolve(config.spec)
    if config.weights is not None and kind in ("hf", "torchscript"):
        raise ConfigError(f"--weights applies to built-ins and package.module:factory models; the "
                          f"{'Hugging Face directory' if kind == 'hf' else 'TorchScript file'} {config.spec!r} "
                          "carries its own weights: drop --weights")
    state = read_state_dict(config.weights) if config.weights is not None else None  # fail before building
    loader = {"hf": functools.partial(load_hf, device=torch.device(device)),
              "torchscript": functools.partial(_load_torchscript, device=torch.device(device)),
              "builtin": functools.partial(_load_builtin, initialise=state is None),  # every weight is loaded next
              "factory": _load_factory}[kind]
    module, task, describe = loader(target, config, dtype)
    spec = target if kind in ("hf", "torchscript") else config.spec  # an absolute path rebuilds from anywhere
    describe = {"kind": kind, "spec": spec, "task": task,
                "weights": os.path.abspath(config.weights) if config.weights else None, **describe}
    if state is not None:
        load_weights(module, state, config.weights)
    if dtype is not None and kind != "hf":  # transformers loads straight into the dtype
        module.to(dtype)
    output_size = hf_output_size(module, task) if kind == "hf" else _output_size(module, config.spec)
    fingerprint = model_fingerprint(module, describe)
    module.to(device)
    module.eval()
    return LoadedModel(module=module, task=task, output_size=output_size, fingerprint=fingerprint, describe=describe,
                       context_length=module_context_length(module, hf=kind == "hf"))


def _saved_model(config: ModelConfig) -> ModelConfig:
    """A run directory (or its ``model/``) written by train-student/train-teacher, as the spec it was saved from.

    ``model/`` holds a Hugging Face model (config.json), or ``model.json`` (how to rebuild
    a built-in or factory model) beside ``model.safetensors``, or (kind "torchscript",
    from `distill quantize`) beside the TorchScript archive it names.
    """
    path = config.spec
    if not os.path.isdir(path):
        return config
    if os.path.isfile(os.path.join(path, "model", "config.json")) or os.path.isfile(os.path.join(path, "model", "model.json")):
        path = os.path.join(path, "model")
    if os.path.isfile(os.path.join(path, "config.json")):
        return dataclasses.replace(config, spec=path)
    described = os.path.join(path, "model.json")
    if not os.path.isfile(described):
        return config
    with open(described) as f:
        saved = json.load(f)
    if config.weights is not None:
        raise ConfigError(f"{config.spec!r} is a trained model with its own weights: drop --weights")
    if saved.get("kind") == "builtin":
        options = ",".join(f"{k}={v}" for k, v in saved["options"].items())
        spec = f"{saved['name']}:{options}" if options else saved["name"]
    elif saved.get("kind") == "factory":
        spec = saved["factory"]
    elif saved.get("kind") == "torchscript":  # written by `distill quantize`: the archive beside model.json
        archive = os.path.join(path, os.path.basename(saved.get("file", "model.pt")))
        return dataclasses.replace(config, spec=archive, task=config.task or saved.get("task"))
    else:
        raise ConfigError(f"{described} describes a {saved.get('kind')!r} model, which cannot be rebuilt; retrain it")
    return dataclasses.replace(config, spec=spec, weights=os.path.join(path, "model.safetensors"),
                               task=config.task or saved.get("task"))


def model_fingerprint(module: nn.Module, describe: dict) -> str:
    """sha256 over ``describe`` less where it was read from, TorchScript code, and every tensor.

    Tensors are every parameter and buffer, by name in sorted order, with dtype, shape and
    bytes: identical weights give identical fingerprints whatever path they came from.
    """
    identity = {k: v for k, v in describe.items() if k not in _LOCATION_KEYS}
    if isinstance(identity.get("options"), dict):  # a seed only picks weights, and the weights are hashed
        identity["options"] = {k: v for k, v in identity["options"].items() if k != "seed"}
    fp = Fingerprint("model").text("describe", json.dumps(identity, sort_keys=True, default=str))
    if isinstance(module, torch.jit.ScriptModule):
        for name, sub in module.named_modules():
            try:
                fp.text(f"code:{name}", sub.code)
            except (AttributeError, RuntimeError):  # a container without a forward of its own
                pass
    tensors = dict(module.state_dict(keep_vars=True))
    for name, buffer in module.named_buffers():
        tensors.setdefault(name, buffer)  # non-persistent buffers too: they shape the outputs
    for name in sorted(tensors):
        fp.tensor(name, tensors[name])
    return fp.hexdigest()


def output_layer(model: LoadedModel) -> nn.Linear | None:
    """The layer that makes the logits: a Hugging Face model's output embeddings; otherwise the last
    ``nn.Linear`` that outputs ``output_size`` values. None when there is none to find (TorchScript)."""
    if isinstance(model.module, torch.jit.ScriptModule):
        return None
    if model.describe.get("kind") == "hf":
        head = model.module.get_output_embeddings()
        return head if isinstance(head, nn.Linear) else None
    heads = [m for m in model.module.modules() if isinstance(m, nn.Linear) and m.out_features == model.output_size]
    return heads[-1] if heads else None


def float32_output_layer(model: LoadedModel) -> bool:
    """Make ``model``'s output layer compute in float32, under any autocast and from weights of any dtype.

    A teacher's logits are what the store's exact log-probabilities come from: under bfloat16
    autocast they would be rounded to bfloat16 (steps of 0.125 for logits of 16 to 32), an
    error larger than the value encoding's, and ties would decide which id takes the k-th
    place. The layer gets float32 copies of its weights, once (a weight tied to the input
    embedding is untied: the embedding keeps its dtype; for inference only), and its input is
    upcast per call. Returns False when the layer cannot be found (a TorchScript model): its
    logits are then whatever the model computes.
    """
    head = output_layer(model)
    if head is None:
        return False
    for name, param in list(head.named_parameters(recurse=False)):
        if param.dtype != torch.float32:
            setattr(head, name, nn.Parameter(param.detach().float(), requires_grad=False))
    head.forward = types.MethodType(_float32_linear, head)
    return True


PER_DOCUMENT, CROSSES_DOCUMENTS = "per-document", "crosses documents"


@torch.no_grad()
def packed_attention(model: LoadedModel) -> str:
    """Whether ``model``'s attention stays within each of the documents packed into a sequence.

    PER_DOCUMENT for the built-in gpt (by construction) and for a Hugging Face causal LM
    when a probe shows it: two documents A and B of equal length, run as [A | B] and
    [B | A] with position ids restarting at each, give B the same logits in both only when
    B neither attends to A nor sees A's positions. CROSSES_DOCUMENTS otherwise (factories,
    TorchScript, Hugging Face models that ignore packed position ids): those models see
    each whole packed sequence.
    """
    kind = model.describe.get("kind")
    if model.task != "causal-lm" or kind not in ("builtin", "hf"):
        return CROSSES_DOCUMENTS
    if kind == "builtin":
        return PER_DOCUMENT
    n = 4
    a, b = torch.arange(1, n + 1) % model.output_size, torch.arange(n + 1, 2 * n + 1) % model.output_size
    ids = torch.stack([torch.cat([a, b]), torch.cat([b, a])])  # (2, 2n)
    positions = torch.arange(n).repeat(2).expand(2, -1)  # (2, 2n)
    logits = model.logits({"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions}).float()
    first, second = logits[0, n:], logits[1, :n]  # B's logits after A, and alone at the start
    scale = 1.0 + float(second.abs().max())
    return PER_DOCUMENT if float((first - second).abs().max()) <= 1e-3 * scale else CROSSES_DOCUMENTS


def _float32_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return nn.functional.linear(x.float(), self.weight, self.bias)


# --- resolving a spec: the one place that decides what a string means ---------------------------


def _resolve(spec: str) -> tuple[str, Any]:
    if os.path.isfile(os.path.join(spec, "config.json")):
        return "hf", os.path.abspath(spec)
    if os.path.isfile(spec) and _is_torchscript(spec):
        return "torchscript", os.path.abspath(spec)
    builtin = split_builtin(spec, dict.fromkeys(BUILTINS))
    if builtin is not None:
        return "builtin", builtin
    if os.path.isdir(spec):
        raise ConfigError(f"model spec {spec!r} is a directory without config.json; point it at a Hugging Face "
                          "model directory (what save_pretrained writes)")
    if os.path.isfile(spec):
        raise ConfigError(f"model spec {spec!r} is a file but not a TorchScript archive; save a TorchScript model "
                          "with torch.jit.save, or pass a state dict as --weights with a built-in or package.module:factory")
    if ":" in spec and os.sep not in spec:
        return "factory", resolve_callable(spec, "model")
    if os.sep in spec or spec.endswith((".pt", ".ts", ".jit", ".pth")):
        raise ConfigError(f"model spec {spec!r}: no such file or directory; check the path")
    raise ConfigError(f"model spec {spec!r} is not a Hugging Face directory, TorchScript file, built-in "
                      f"({', '.join(BUILTINS)}) or package.module:factory; check the spelling or the path")


def _is_torchscript(path: str) -> bool:
    """A zip whose one top folder has code/ and constants.pkl, as torch.jit.save writes (torch.save does not)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        parts = [name.split("/") for name in archive.namelist()]
    return any(len(p) > 2 and p[1] == "code" for p in parts) and any(p[1:] == ["constants.pkl"] for p in parts)


def _task(config_task: str | None, module_task: Any, spec: str) -> str:
    if module_task is not None and module_task not in TASKS:
        module_task = None
    if config_task and module_task and config_task != module_task:
        raise ConfigError(f"model {spec!r} does {module_task}, not {config_task}; drop --task or pass --task {module_task}")
    task = config_task or module_task
    if task is None:
        raise ConfigError(f"cannot tell the task of model {spec!r}; pass --task {' or --task '.join(TASKS)}")
    return task


# --- the four kinds: each returns (module on the CPU, task, describe entries of its own) ----------


def _load_builtin(target: tuple[str, dict], config: ModelConfig, dtype: torch.dtype | None, initialise: bool = True):
    name, options = target
    options = resolve_options(name, options)
    module = build_builtin(name, initialise=initialise, **options)
    return module, _task(config.task, module.task, config.spec), {"name": name, "options": options}


def _load_factory(factory: Any, config: ModelConfig, dtype: torch.dtype | None):
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise ConfigError(f"model factory {config.spec!r} must be callable with no arguments; wrap it in one that is") from None
    except ValueError:
        pass  # no signature to inspect (a builtin); just call it
    module = factory()
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model factory {config.spec!r} returned a {type(module).__name__}, not a torch.nn.Module")
    task = _task(config.task, getattr(module, "task", None), config.spec)
    return module, task, {"factory": config.spec}


def _load_torchscript(path: str, config: ModelConfig, dtype: torch.dtype | None, device: torch.device | None = None):
    """A TorchScript archive, loaded onto ``device``: its tensor constants too, which ``.to(device)`` would not move."""
    try:
        with warnings.catch_warnings():  # torch marks TorchScript deprecated; it is still a format users bring
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(path, map_location=device or "cpu")
    except Exception as e:  # torch raises RuntimeError and others for damaged archives
        raise ConfigError(f"cannot load TorchScript file {config.spec!r} ({first_line(e)}); re-export it with torch.jit.save") from None
    return module, _task(config.task, getattr(module, "task", None), config.spec), {}


# --- weights, inputs, outputs ---------------------------------------------------------------------


def _output_size(module: nn.Module, spec: str) -> int:
    for attr in ("output_size", "num_classes", "vocab_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) or getattr(m, "original_name", None) == "Linear"]
    if linears:  # a quantized Linear (TorchScript) has out_features but no weight tensor
        weight = getattr(linears[-1], "weight", None)
        size = getattr(linears[-1], "out_features", None) or (weight.shape[0] if isinstance(weight, torch.Tensor) else None)
        if isinstance(size, int) and size > 0:
            return size
    raise ConfigError(f"cannot tell the output size of model {spec!r}; give the module an output_size attribute "
                      "(the number of classes, or the vocabulary size)")


def _model_input(module: nn.Module, batch: dict) -> torch.Tensor:
    """The one tensor a built-in, factory or TorchScript module takes: features or token ids."""
    if "inputs" in batch:
        floating = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        return batch["inputs"].to(module_device(module), dtype=floating)
    if "input_ids" in batch:
        return batch["input_ids"].to(module_device(module))
    raise ConfigError(f"a batch holds neither 'inputs' nor 'input_ids' (it has {sorted(batch)}); check the data spec")


def _check_logits(out: Any, batch: dict, task: str, output_size: int, spec: Any) -> None:
    x = batch["inputs"] if "inputs" in batch else batch["input_ids"]
    expected = (x.shape[0], output_size) if task == "classification" else (*x.shape[:2], output_size)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {spec!r} returned logits of shape {got}, expected {expected} for {task}; "
                          "check --task, and the module's output_size attribute")


