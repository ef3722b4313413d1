"""Bigger students on one device: gradient checkpointing and LoRA adapters (peft) for Hugging Face models.

``StudentFlags`` are the settings; ``check_student_flags`` refuses what cannot work before a
run directory is written (a model that is not a Hugging Face directory, peft not installed);
``prepare_student`` turns them on for the loaded module; at the end ``save_adapter`` writes
the adapter alone (``RUN/adapter/``, what peft's ``PeftModel.from_pretrained`` reads) and
``merged`` folds it into the base weights, so ``RUN/model/`` is a plain Hugging Face model that
every tool loads without peft.

Checkpoints hold the wrapped module's whole state dict (base and adapter weights), so a LoRA
run resumes like any other.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings

import torch
from torch import nn

from distill.errors import ConfigError, first_line, write_error
from distill.pipeline.config import setting
from distill.pipeline.hf import quiet_hf

__all__ = ["StudentFlags", "is_hf_spec", "check_student_flags", "prepare_student", "is_adapted", "save_adapter",
           "merged", "ADAPTER_DIR"]

ADAPTER_DIR = "adapter"  # RUN/adapter/: the LoRA adapter alone, beside RUN/model/ (merged)
_PEFT_TASKS = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudentFlags:
    """How a Hugging Face model is prepared for training (keyword-only): memory and adapters."""

    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass instead of keeping "
                                                  "them (Hugging Face models; less memory, ~30% more compute).")
    lora_r: int | None = setting(None, "Train a LoRA adapter of this rank instead of the whole model (Hugging Face "
                                       "models; needs pip install 'distill[lora]').", minimum=0, default_help="off")
    lora_alpha: float = setting(16.0, "LoRA scaling numerator: the update is (alpha / r) * B @ A.")
    lora_dropout: float = setting(0.0, "Dropout on the LoRA branch's input.", minimum=0)
    lora_targets: tuple[str, ...] = setting((), "Module names LoRA adapts; repeat or comma-separate; all-linear: "
                                                "every linear layer but the output.",
                                            default_help="peft's choice for the architecture, else all-linear")

    @property
    def lora(self) -> bool:
        return bool(self.lora_r)


def is_hf_spec(spec: str) -> bool:
    """Whether the model spec ``spec`` is a Hugging Face directory (or a run directory whose model/ is one)."""
    return any(os.path.isfile(os.path.join(spec, *parts, "config.json")) for parts in ((), ("model",)))


def check_student_flags(flags: StudentFlags, spec: str, distributed: str = "ddp") -> None:
    """Refuse, in one line, flags that cannot apply to the model spec ``spec`` trained with ``distributed``
    (ddp or fsdp); called before anything is written."""
    wanted = [f for f, on in (("--gradient-checkpointing", flags.gradient_checkpointing),
                              (f"--lora-r {flags.lora_r}", flags.lora)) if on]
    if wanted and not is_hf_spec(spec):
        raise ConfigError(f"{' and '.join(wanted)} {'apply' if len(wanted) > 1 else 'applies'} to Hugging Face "
                          f"models, and {spec!r} is not a Hugging Face directory: drop the flag, or pass a directory "
                          "with config.json")
    if flags.lora:
        if distributed != "ddp":  # the merge at the end needs the whole adapter and base on one rank
            raise ConfigError(f"--lora-r trains with ddp, not --distributed {distributed}: the adapter's gradients are "
                              "small; leave out --distributed")
        if not flags.lora_alpha > 0 or flags.lora_dropout >= 1:
            raise ConfigError("--lora-alpha must be > 0 and --lora-dropout in [0, 1)")
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("--lora-r needs the peft package, which is not installed: pip install 'distill[lora]'") \
                from None


def prepare_student(module: nn.Module, task: str, flags: StudentFlags, seed: int) -> nn.Module:
    """``module`` (a transformers model) with gradient checkpointing on and/or wrapped in a LoRA ``PeftModel``.

    Only the adapter's parameters (and a classifier's new head) require gradients after
    wrapping; the adapter's random init is drawn from ``seed`` (the global RNG is left alone),
    so a run is repeatable. Returns the module to train (``module`` itself when neither is on).
    """
    if flags.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) and gives the same gradients as without; transformers 5
        # renamed the switch (the old name warns)
        enable = getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable
        try:
            enable({"use_reentrant": False})
        except ValueError as e:
            raise ConfigError(f"--gradient-checkpointing: {first_line(e)}; drop the flag for this model") from None
    if not flags.lora:
        return module
    import peft

    targets = _targets(flags.lora_targets, module)
    config = peft.LoraConfig(r=flags.lora_r, lora_alpha=flags.lora_alpha, lora_dropout=flags.lora_dropout,
                             target_modules=targets, task_type=_PEFT_TASKS[task])
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore", UserWarning)  # peft's notes: it sets fan_in_fan_out per layer (Conv1D)
        warnings.simplefilter("ignore", FutureWarning)  # peft calls transformers' deprecated is_gradient_checkpointing
        try:
            return peft.get_peft_model(module, config)
        except ValueError as e:
            raise ConfigError(f"cannot add LoRA to the student ({first_line(e).rstrip('.')}): pass --lora-targets with module "
                              "names it has (e.g. all-linear)") from None


def _targets(given: tuple[str, ...] | str, module: nn.Module) -> list[str] | str:
    """The module names to adapt: the flags' (comma lists split), else peft's for the model type, else all-linear."""
    values = [given] if isinstance(given, str) else given  # a TOML file may give one string
    names = [n.strip() for value in values for n in value.split(",") if n.strip()]
    if names:
        return "all-linear" if names == ["all-linear"] else names
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    model_type = getattr(getattr(module, "config", None), "model_type", None)
    return list(known.get(model_type) or ()) or "all-linear"


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` is a peft ``PeftModel`` (a LoRA student)."""
    peft = sys.modules.get("peft")  # not imported: no module can be a PeftModel (and a plain run skips the import)
    return peft is not None and isinstance(module, peft.PeftModel)


def save_adapter(module: nn.Module, directory: str) -> None:
    """Write the adapter of the ``PeftModel`` ``module`` to ``directory``: adapter_config.json and
    adapter_model.safetensors, what ``PeftModel.from_pretrained(base, directory)`` reads."""
    try:
        with quiet_hf():
            module.save_pretrained(directory)
    except OSError as e:
        raise write_error(e, f"the adapter in {directory}") from None


def merged(module: nn.Module) -> nn.Module:
    """The base transformers model with the adapter folded into its weights (``module`` is consumed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return module.merge_and_unload()
