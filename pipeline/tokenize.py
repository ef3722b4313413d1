"""Tokenizers for text data, and text files read as documents.

A tokenizer spec is ``"bytes"`` (UTF-8 bytes as ids 0..255, nothing to download) or a
local Hugging Face tokenizer directory, loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from distill.errors import ConfigError, first_line

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "require_tokenizer", "TokenizerNeeded",
           "tokenizer_places", "tokenizer_beside", "flatten",
           "tokenize_text_files", "text_file_documents"]


class Tokenizer:
    """What data loading needs from a tokenizer: ``encode``, ``encode_batch`` and ``vocab_size``;
    for chat data also ``chat_template``, ``render_chat`` and ``encode_with_offsets``."""

    vocab_size: int
    eos_id: int | None = None
    """The end-of-text token's id, which separates packed documents; None when there is none."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], *, special_tokens: bool = False,
                     max_length: int | None = None) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_length`` tokens when given."""
        raise NotImplementedError

    chat_template: str | None = None
    """The tokenizer's own Jinja chat template; None when it has none."""

    def template_tokens(self) -> dict[str, str]:
        """The special tokens a chat template sees as variables (``bos_token``, ``eos_token``, ...)."""
        return {}

    def render_chat(self, messages: list[dict], template: str, *, add_generation_prompt: bool = False) -> str:
        """``messages`` ({"role", "content", ...} dicts; may be empty) rendered as text by the Jinja
        chat ``template``, as transformers' ``apply_chat_template(tokenize=False)`` renders them."""
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt, **self.template_tokens())
        return rendered[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no special tokens added, as in ``encode``) and each token's
        character span ``(start, end)`` in ``text``."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as token ids: vocabulary 256, no special tokens."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts, *, special_tokens=False, max_length=None):
        return [list(t.encode("utf-8")[:max_length]) for t in texts]

    def encode_with_offsets(self, text):
        pieces = [(c.encode("utf-8"), i) for i, c in enumerate(text)]  # every byte of a character spans it
        return [b for piece, _ in pieces for b in piece], [(i, i + 1) for piece, i in pieces for _ in piece]


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer loaded from a local directory."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"tokenizer {str(path)!r} cannot be loaded ({first_line(e)}); "
                              "pass a directory written by save_pretrained, or 'bytes'") from None
        # len() counts added special tokens, which tokenizer.vocab_size leaves out
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        template = getattr(self._tok, "chat_template", None)
        self.chat_template = template.get("default") if isinstance(template, dict) else template

    def template_tokens(self):
        return {k: v for k, v in self._tok.special_tokens_map.items() if isinstance(v, str)}

    def encode_with_offsets(self, text):
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError("chat data needs a fast tokenizer (one with a tokenizer.json), for token offsets: "
                              "save the tokenizer with AutoTokenizer.from_pretrained(..., use_fast=True)")
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode(self, text: str) -> list[int]:
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: no "sequence too long" warning
            return backend.encode(text, add_special_tokens=False).ids
        return self._tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode_batch(self, texts, *, special_tokens=False, max_length=None):
        return self._tok(list(texts), add_special_tokens=special_tokens, truncation=max_length is not None,
                         max_length=max_length, verbose=False)["input_ids"]


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"`` or a local Hugging Face tokenizer directory -> a Tokenizer (cached per spec)."""
    if spec == "bytes":
        return ByteTokenizer()
    if not Path(spec).expanduser().is_dir():
        raise ConfigError(f"tokenizer {spec!r} is not a directory or 'bytes'; nothing is downloaded: "
                          "save one with save_pretrained(DIR) and pass --tokenizer DIR")
    return HFTokenizer(Path(spec).expanduser())


class TokenizerNeeded(ConfigError):
    """Text data and no tokenizer; ``what`` names the data (``looked_for_tokenizer`` adds where one was looked for)."""

    def __init__(self, what: str):
        super().__init__(f"{what} must be tokenised: pass --tokenizer DIR (or bytes)")
        self.what = what


def require_tokenizer(spec: str | None, what: str) -> Tokenizer:
    """``load_tokenizer(spec)``; a TokenizerNeeded (a ConfigError) naming ``what`` needs one when ``spec`` is None."""
    if spec is None:
        raise TokenizerNeeded(what)
    return load_tokenizer(spec)


def tokenizer_places(model_spec: str | None) -> list[str]:
    """Where ``tokenizer_beside`` looks: a directory ``model_spec`` and its ``model/`` (a run directory's); else none."""
    if not model_spec or not os.path.isdir(model_spec):
        return []
    return [model_spec, os.path.join(model_spec, "model")]


def tokenizer_beside(model_spec: str | None) -> str | None:
    """The first of ``tokenizer_places(model_spec)`` that holds a Hugging Face tokenizer, else None.

    A Hugging Face teacher or student brings its own tokenizer, and a run directory the one
    it was trained with (saved into ``RUN/model/``): stages use it for text data when no
    --tokenizer is given.
    """
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    return next((place for place in tokenizer_places(model_spec)
                 if any(os.path.exists(os.path.join(place, n)) for n in names)), None)


def flatten(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (flat ids (T,) int64, lengths (N,) int64)."""
    lengths = np.fromiter(map(len, sequences), np.int64, count=len(sequences))
    flat = np.fromiter(itertools.chain.from_iterable(sequences), np.int64, count=int(lengths.sum()))
    return flat, lengths


def tokenize_text_files(files: Sequence[Path], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Each UTF-8 file tokenised whole, without special tokens: one document per file.

    Returns (flat ids (T,) int64, lengths (D,) int64), one length per file, in file order;
    ``distill.pipeline.documents`` cuts them into sequences.
    """
    documents = list(text_file_documents(files, tokenizer))
    return np.concatenate([ids for ids, _, _ in documents]), np.concatenate([n for _, n, _ in documents])


def text_file_documents(files: Sequence[Path], tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray, None]]:
    """``tokenize_text_files`` a file at a time: yields (ids (T_f,) int64, lengths (1,) int64, None)
    per file, the batches ``distill.pipeline.documents.write_sequences`` takes; memory holds one file."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"text file {str(path)!r} is not UTF-8 ({e.reason} at byte {e.start}); "
                              "convert it, or pass a parquet/jsonl file") from None
        ids = np.asarray(tokenizer.encode(text), np.int64)
        yield ids, np.asarray([len(ids)], np.int64), None
