"""Hugging Face models: loading a local directory, its task and output size, and its logits.

Only local directories are read (``local_files_only``); code shipped inside a directory runs
only with ``trust_remote_code``. Load errors are one-line ConfigErrors, and transformers'
progress bars are kept out of batch-job logs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distill.errors import ConfigError, first_line, listed
from distill.pipeline.runtime import module_device
from distill.pipeline.tasks import TASKS

if TYPE_CHECKING:  # models.py imports this module
    from distill.pipeline.models import ModelConfig

__all__ = ["WEIGHT_SUFFIXES", "load_hf", "quiet_hf", "hf_call", "hf_task", "hf_output_size", "stable_config", "hf_logits"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # a directory's weight files
# config keys that vary with the path, the library version or the load dtype, not the model
VOLATILE_KEYS = ("transformers_version", "dtype", "torch_dtype")
TASK_SUFFIXES = {"ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForSequenceClassification": "classification"}


def load_hf(path: str, config: ModelConfig, dtype: torch.dtype | None,
            device: torch.device | None = None) -> tuple[nn.Module, str, dict]:
    """The model in the Hugging Face directory ``path``: (module, task, describe entries).

    A directory with a config but no weight files gives a fresh model of that architecture,
    initialised with seed 0 (a student to train). Weights load in ``dtype`` (None: float32)
    straight onto a CUDA ``device`` (where transformers can without accelerate: 5.x, or with
    accelerate installed), so no rank holds a host copy of the whole model; else on the CPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {"local_files_only": True, "trust_remote_code": config.trust_remote_code}
    hf_config = hf_call(AutoConfig.from_pretrained, config.spec, path, **kwargs)
    task = config.task or hf_task(hf_config, config.spec)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(path)):
        # a config without weights: a fresh model of that architecture (a student to train), seeded
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = auto.from_config(hf_config, trust_remote_code=config.trust_remote_code)
        if dtype is not None:
            module.to(dtype)
        describe = {"trust_remote_code": config.trust_remote_code, "config": stable_config(module.config.to_dict()),
                    "initialised": "from config, seed 0"}
        return module, task, describe
    if device is not None and device.type == "cuda" and _direct_to_device():
        kwargs["device_map"] = {"": str(device)}
    module, info = hf_call(auto.from_pretrained, config.spec, path, config=hf_config, dtype=dtype or torch.float32,
                            output_loading_info=True, **kwargs)
    absent = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    if absent:
        raise ConfigError(f"Hugging Face directory {config.spec!r} has no {task} weights for {listed(absent)} "
                          f"(it holds {', '.join(hf_config.architectures or ['an unnamed architecture'])}); "
                          "check --task, or point at a checkpoint trained for the task")
    describe = {"trust_remote_code": config.trust_remote_code, "config": stable_config(module.config.to_dict())}
    return module, task, describe


def _direct_to_device() -> bool:
    """Whether from_pretrained can put the weights on one device as it reads them (device_map)."""
    import importlib.util

    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5 or importlib.util.find_spec("accelerate") is not None


@contextlib.contextmanager
def quiet_hf():
    """No transformers progress bars ("Loading weights", "Writing model shards") inside: noise in
    batch-job logs. The setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def hf_call(fn, spec: str, path: str, **kwargs):
    """``fn(path, **kwargs)`` quietly; transformers' load errors become one-line ConfigErrors."""
    try:
        with quiet_hf():
            return fn(path, **kwargs)
    except (OSError, ValueError) as e:
        message = str(e)
        if "trust_remote_code" in message:
            raise ConfigError(f"Hugging Face directory {spec!r} needs Python code shipped inside it to load; "
                              "pass --trust-remote-code if you trust that directory's code") from None
        raise ConfigError(f"cannot load Hugging Face model {spec!r}: {first_line(e)}") from None


def hf_task(hf_config: Any, spec: str) -> str:
    """The task of an architecture named in ``hf_config.architectures`` (``...ForCausalLM`` and so on)."""
    for arch in hf_config.architectures or ():
        for suffix, task in TASK_SUFFIXES.items():
            if arch.endswith(suffix):
                return task
    raise ConfigError(f"cannot tell the task of Hugging Face model {spec!r} from its architectures "
                      f"{hf_config.architectures}; pass --task {' or --task '.join(TASKS)}")


def hf_output_size(module: nn.Module, task: str) -> int:
    """The logits' last dimension: labels of a classifier, the output layer's width of a causal LM."""
    if task == "classification":
        return int(module.config.num_labels)
    head = module.get_output_embeddings()
    if isinstance(head, nn.Linear):
        return int(head.out_features)  # may exceed config.vocab_size when the vocabulary is padded
    return int(module.config.get_text_config().vocab_size)


def stable_config(d: dict) -> dict:
    """The config without what varies with the load path, library version or load dtype."""
    return {k: stable_config(v) if isinstance(v, dict) else v
            for k, v in d.items() if not str(k).startswith("_") and k not in VOLATILE_KEYS}


def _takes_position_ids(module: nn.Module) -> bool:
    base = getattr(module, "get_base_model", None)  # a peft (LoRA) wrapper passes them on to the model it wraps
    return _forward_takes_position_ids(type(base() if callable(base) else module))


@functools.lru_cache(maxsize=64)
def _forward_takes_position_ids(cls: type) -> bool:
    """Per class, once: this is asked on every packed batch, and inspect.signature is not free."""
    try:
        return "position_ids" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def hf_logits(module: nn.Module, batch: dict, task: str) -> torch.Tensor:
    """Logits of a transformers model (or its DDP wrapper) on token ids (B, L) and their attention mask (B, L).

    A packed causal-LM batch also holds ``position_ids`` (B, L): they go to the model with no
    attention mask, from which transformers' ``create_causal_mask`` keeps attention within
    each document (where position ids do not step by 1), in the models that build their
    masks with it. Right padding needs no mask in a causal model: no real token attends to it.
    A model whose forward takes no position ids sees each packed sequence whole.
    """
    if "input_ids" not in batch:
        raise ConfigError("Hugging Face models read token ids, but the data gives float features; "
                          "use a tokenized dataset or a built-in/factory model for features")
    inner = getattr(module, "module", module)  # under DistributedDataParallel: the model it wraps
    device = module_device(inner)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    pad = getattr(inner.config, "pad_token_id", None)
    if pad is not None:
        # The data pads with 0; classifiers that pool the last token find it by the model's own pad id.
        ids = ids.masked_fill(mask == 0, pad)
    kwargs = {"use_cache": False} if task == "causal-lm" else {}
    if task == "causal-lm" and "position_ids" in batch and _takes_position_ids(inner):
        kwargs["position_ids"], mask = batch["position_ids"].to(device), None
    try:
        return module(input_ids=ids, attention_mask=mask, **kwargs).logits
    except ValueError as e:
        if "padding token" in str(e):
            raise ConfigError("this Hugging Face classifier has no pad_token_id and cannot find where each "
                              "sequence ends; set pad_token_id in its config.json") from None
        raise
