"""Chat data: conversations rendered with a chat template, with positions on the assistant's tokens.

A conversation is a list of messages ``{"role": ..., "content": ...}`` whose role is one of
ROLES. It is rendered as text by a Jinja chat template (``--chat-template FILE``, else the
tokenizer's own), and the whole rendering is tokenised once, with no special tokens added
(the template writes BOS and the turn markers itself).

Which tokens are the assistant's needs no ``{% generation %}`` markers in the template: for
the assistant message i, the text rendered from messages[:i] with the generation prompt
ends where the turn's content starts, and the text rendered from messages[:i+1] ends after
its end-of-turn marker; both must be prefixes of the full rendering. A token is the
assistant's when its character span overlaps such a turn (as transformers' own
``return_assistant_tokens_mask`` decides).

Positions follow the Hugging Face labels convention: position t (the distribution that
predicts token t+1) is kept iff token t+1 is a target, a token of an assistant turn with
``train_on="assistant"`` or any token with ``train_on="all"``; a conversation's last token
predicts nothing and is never kept.

A chat set's stats carry ``chat_rule`` (--train-on and the template's hash); a store's
manifest keeps them, so that train-student names a different rule (``chat_rule_difference``)
instead of only "other data".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distill.errors import ConfigError, first_line
from distill.pipeline.tokenize import Tokenizer

__all__ = ["ROLES", "TRAIN_ON", "resolve_chat_template", "conversations_from_column", "tokenize_conversation",
           "chat_documents", "chat_rule", "chat_rule_difference"]

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "all")


def resolve_chat_template(tokenizer: Tokenizer, tokenizer_spec: str, template_file: str | None) -> str:
    """The Jinja template to render conversations with: ``template_file``'s text, else the tokenizer's own."""
    if template_file is not None:
        try:
            return Path(template_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --chat-template {template_file!r} ({first_line(e)}); "
                              "pass a UTF-8 Jinja template file") from None
    if not tokenizer.chat_template:
        raise ConfigError(f"tokenizer {tokenizer_spec!r} has no chat template to render the messages column: "
                          "pass --chat-template FILE (a Jinja chat template)")
    return tokenizer.chat_template


def conversations_from_column(values: Sequence[Any], name: str, origin: str, first_row: int = 0) -> list[list[dict]]:
    """A column's values (lists of {"role", "content", ...} dicts, or JSON strings of them) ->
    conversations, checked; keys whose value is None (absent from a row's struct) are dropped.
    ``first_row`` is the first value's row, for errors."""
    conversations = []
    for row, value in enumerate(values, first_row):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{origin}: row {row} of column {name!r} is not JSON ({e.msg}); "
                                  "write a list of {role, content} messages") from None
        if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise ConfigError(f"{origin}: row {row} of column {name!r} is a {type(value).__name__}, "
                              "not a list of {role, content} messages; fix the data")
        if not value:
            raise ConfigError(f"{origin}: row {row} of column {name!r} has no messages; drop empty conversations")
        messages = [{k: v for k, v in m.items() if v is not None} for m in value]
        for m in messages:
            if m.get("role") not in ROLES:
                raise ConfigError(f"{origin}: row {row} of column {name!r} has a message with role "
                                  f"{m.get('role')!r}; roles must be one of {', '.join(ROLES)}")
        conversations.append(messages)
    return conversations


def _render(tokenizer: Tokenizer, messages: list[dict], template: str, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.render_chat(messages, template, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's errors, and what a template raises with raise_exception
        raise ConfigError(f"{where}: the chat template fails ({type(e).__name__}: {first_line(e)}); "
                          "fix the data or pass another --chat-template FILE") from None


def _assistant_spans(tokenizer: Tokenizer, messages: list[dict], template: str, full: str,
                     where: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant turns in ``full``, end-of-turn text included."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], template, True, where)
        through = _render(tokenizer, messages[: i + 1], template, False, where)
        if not (through.startswith(start) and full.startswith(through)):
            raise ConfigError(f"{where}: the chat template renders a conversation's beginning differently from the "
                              f"whole (at message {i}), so its assistant tokens cannot be found; "
                              "pass --chat-template FILE with a template that renders turns in order, "
                              "or --train-on all")
        spans.append((len(start), len(through)))
    return spans


def tokenize_conversation(messages: list[dict], tokenizer: Tokenizer, template: str, train_on: str,
                          where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """One conversation -> (token ids (L,) int64, targets (L,) bool): which tokens are trained on."""
    full = _render(tokenizer, messages, template, False, where)
    ids, offsets = tokenizer.encode_with_offsets(full)
    if train_on == "all":
        return np.asarray(ids, np.int64), np.ones(len(ids), bool)
    starts, ends = np.asarray(offsets, np.int64).reshape(-1, 2).T  # (L,) each
    ends = np.maximum(ends, starts + 1)  # a token whose offsets were trimmed to nothing still sits at its start
    targets = np.zeros(len(ids), bool)
    for a, b in _assistant_spans(tokenizer, messages, template, full, where):
        targets |= (starts < b) & (ends > a)
    return np.asarray(ids, np.int64), targets


def chat_documents(conversations: list[list[dict]], tokenizer: Tokenizer, template: str, train_on: str,
                   origin: str, *, first_row: int = 0,
                   require_targets: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conversations -> documents: (flat ids (T,) int64, lengths (D,) int64, flat position mask (T,) bool).

    Position t is kept iff token t+1 of the same conversation is a target (module docstring).
    ``first_row`` numbers the rows in errors; ``require_targets`` False leaves the check that
    some position is kept to the caller (who converts the rows in batches).
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"unknown --train-on {train_on!r}: use {', '.join(TRAIN_ON)}")
    ids, masks = [], []
    for row, messages in enumerate(conversations, first_row):
        row_ids, targets = tokenize_conversation(messages, tokenizer, template, train_on, f"{origin} row {row}")
        if len(row_ids) < 2:
            raise ConfigError(f"{origin}: row {row} renders to {len(row_ids)} token(s); a conversation needs at "
                              "least 2 to predict anything: drop it")
        mask = np.zeros(len(row_ids), bool)
        mask[:-1] = targets[1:]  # (L,) position t predicts token t+1; the last token predicts nothing
        ids.append(row_ids)
        masks.append(mask)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    mask = np.concatenate(masks)
    if require_targets and not mask.any():
        raise ConfigError(f"{origin}: no conversation has an assistant turn to train on; "
                          "add assistant messages or pass --train-on all")
    return np.concatenate(ids), lengths, mask


def chat_rule(template: str, train_on: str) -> dict:
    """What decides a chat set's positions besides the conversations, as a store's manifest keeps it
    (``extra["data"]["chat"]``): {"train_on", "template_sha256" (the first 16 hex digits)}."""
    return {"train_on": train_on, "template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]}


def chat_rule_difference(stored: dict | None, current: dict | None) -> str | None:
    """Why a store's chat rule (``chat_rule``, None: not chat data) differs from the data's at hand,
    as a clause naming the fix; None when they agree."""
    if not stored or not current:
        return None
    if stored.get("train_on") != current.get("train_on"):
        return (f"with --train-on {stored.get('train_on')}, but this data is read with --train-on "
                f"{current.get('train_on')}: pass --train-on {stored.get('train_on')} as generate-labels had")
    if stored.get("template_sha256") != current.get("template_sha256"):
        return (f"with another chat template (sha256 {stored.get('template_sha256')}, this one "
                f"{current.get('template_sha256')}): pass the same --chat-template (or tokenizer) as generate-labels")
    return None
