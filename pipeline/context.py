"""How long a sequence may be: a model's context length, and the --seq-len the stages resolve from it.

A model's context length is the most tokens one sequence may hold (its position embedding
table's size): a Hugging Face config's ``max_position_embeddings``, ``n_positions``,
``n_ctx`` or ``max_sequence_length`` (of the text config), or a module's
``context_length``, ``max_seq_len``, ``max_len`` or ``max_position_embeddings`` attribute
(the built-in gpt has ``max_len``); None when the model says none of these.

--seq-len left out is the shortest context length of the models that read the data,
capped at MAX_DEFAULT_SEQ_LEN (DEFAULT_SEQ_LEN when no model says one); given, it must fit
every one of them. The stages resolve it before they write anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from distill.errors import ConfigError

if TYPE_CHECKING:  # models.py imports this module
    from distill.pipeline.data import ExampleSet
    from distill.pipeline.models import LoadedModel

__all__ = ["DEFAULT_SEQ_LEN", "MAX_DEFAULT_SEQ_LEN", "SEQ_LEN_HELP", "module_context_length", "resolve_seq_len",
           "stored_seq_len", "check_fits_context"]

DEFAULT_SEQ_LEN = 256  # when no model says its context length (and what --seq-len defaulted to before)
MAX_DEFAULT_SEQ_LEN = 2048  # a long-context model's default: longer sequences cost memory quadratically
SEQ_LEN_HELP = f"the model's context length, at most {MAX_DEFAULT_SEQ_LEN} ({DEFAULT_SEQ_LEN} when unknown)"
HF_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
MODULE_CONTEXT_ATTRIBUTES = ("context_length", "max_seq_len", "max_len", "max_position_embeddings")


def module_context_length(module: nn.Module, hf: bool) -> int | None:
    """The context length of ``module`` (a transformers model when ``hf``), or None when it says none."""
    if hf:
        config = getattr(module, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return next(filter(None, (_positive_int(getattr(text, key, None)) for key in HF_CONTEXT_KEYS)), None)
    for attr in MODULE_CONTEXT_ATTRIBUTES:
        try:
            value = _positive_int(getattr(module, attr, None))
        except RuntimeError:  # a TorchScript attribute of a type Python cannot read
            value = None
        if value is not None:
            return value
    return None


def resolve_seq_len(seq_len: int | None, **models: LoadedModel | None) -> int:
    """--seq-len for data that ``models`` (role -> model, e.g. ``teacher=``) read.

    None: the shortest of their context lengths, at most MAX_DEFAULT_SEQ_LEN
    (DEFAULT_SEQ_LEN when none says one). A given length longer than a model's context is
    a one-line ConfigError naming both numbers.
    """
    contexts = [(m.context_length, who) for who, m in models.items() if m is not None and m.context_length]
    if not contexts:
        return DEFAULT_SEQ_LEN if seq_len is None else seq_len
    context, who = min(contexts)
    if seq_len is None:
        return min(context, MAX_DEFAULT_SEQ_LEN)
    if seq_len > context:
        raise ConfigError(f"--seq-len {seq_len} is longer than the {who}'s context length ({context} tokens): "
                          f"pass --seq-len {context} or less")
    return seq_len


def stored_seq_len(seq_len: int | None, extra: dict, url: str, student: LoadedModel, who: str = "student") -> int:
    """--seq-len for data read beside the store at ``url``: as given, else what the store was made with (its ``extra``).

    The data must be cut as it was for the teacher, or its fingerprint differs. A
    ``student`` (``who`` names it) whose context is shorter than the store's longest
    sequence is a one-line ConfigError. A store from before seq_len was recorded gives
    what --seq-len defaulted to then: DEFAULT_SEQ_LEN.
    """
    if seq_len is not None:
        return resolve_seq_len(seq_len, **{who: student})
    stored = extra.get("seq_len")
    longest = extra.get("longest_sequence")
    context = student.context_length
    if context is not None and isinstance(longest, int) and longest > context:
        raise ConfigError(f"the store {url} holds sequences of up to {longest} tokens (made with --seq-len {stored}) "
                          f"but the {who}'s context length is {context} tokens: regenerate the labels with "
                          f"--seq-len {context}, or use a {who} with a longer context")
    return stored if isinstance(stored, int) and stored >= 2 else DEFAULT_SEQ_LEN


def check_fits_context(data: ExampleSet, what: str, **models: LoadedModel | None) -> None:
    """Refuse token data whose longest sequence is longer than a model's context (one line; ``what`` names the data)."""
    lengths = data.lengths
    if lengths is None or len(lengths) == 0:
        return
    longest = int(lengths.max())
    for who, model in models.items():
        context = None if model is None else model.context_length
        if context is not None and longest > context:
            raise ConfigError(f"{what} has a sequence of {longest} tokens but the {who}'s context length is {context} "
                              f"tokens: cut the sequences to at most {context} tokens (--seq-len {context} for text)")


def _positive_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
