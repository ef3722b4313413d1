"""Tokenizers for text data, and the rule that cuts text files into sequences.

A tokenizer spec is ``"bytes"`` (UTF-8 bytes as ids 0..255, nothing to download) or a
local Hugging Face tokenizer directory, loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from distill.errors import ConfigError, first_line

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "require_tokenizer", "tokenizer_beside", "flatten",
           "cut_lengths", "tokenize_text_files"]


class Tokenizer:
    """What data loading needs from a tokenizer: ``encode``, ``encode_batch`` and ``vocab_size``."""

    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], *, special_tokens: bool = False,
                     max_length: int | None = None) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_length`` tokens when given."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as token ids: vocabulary 256, no special tokens."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts, *, special_tokens=False, max_length=None):
        return [list(t.encode("utf-8")[:max_length]) for t in texts]


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


def require_tokenizer(spec: str | None, what: str) -> Tokenizer:
    """``load_tokenizer(spec)``; a ConfigError naming ``what`` needs one when ``spec`` is None."""
    if spec is None:
        raise ConfigError(f"{what} must be tokenised: pass --tokenizer DIR (or bytes)")
    return load_tokenizer(spec)


def tokenizer_beside(model_spec: str | None) -> str | None:
    """``model_spec`` itself when it is a directory holding a Hugging Face tokenizer, else None.

    A Hugging Face teacher or student brings its own tokenizer: stages use it for text data
    when no --tokenizer is given.
    """
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if model_spec and os.path.isdir(model_spec) and any(os.path.exists(os.path.join(model_spec, n)) for n in names):
        return model_spec
    return None


def flatten(sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id lists -> (flat ids (T,) int64, lengths (N,) int64)."""
    lengths = np.fromiter(map(len, sequences), np.int64, count=len(sequences))
    flat = np.fromiter(itertools.chain.from_iterable(sequences), np.int64, count=int(lengths.sum()))
    return flat, lengths


def cut_lengths(num_tokens: int, seq_len: int) -> np.ndarray:
    """Lengths of consecutive sequences cut from ``num_tokens`` tokens.

    Every sequence has exactly ``seq_len`` tokens except the last, which is kept only when
    it has at least 2 tokens (one position to predict needs a next token to be useful).
    """
    full, rest = divmod(num_tokens, seq_len)
    return np.array([seq_len] * full + ([rest] if rest >= 2 else []), np.int64)


def tokenize_text_files(files: Sequence[Path], tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each UTF-8 file tokenised whole, then cut by ``cut_lengths``; sequences never cross files.

    Returns (flat ids (T,) int64, lengths (N,) int64) in file order.
    """
    ids, lengths = [], []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"text file {str(path)!r} is not UTF-8 ({e.reason} at byte {e.start}); "
                              "convert it, or pass a parquet/jsonl file") from None
        file_ids = np.asarray(tokenizer.encode(text), np.int64)
        file_lengths = cut_lengths(len(file_ids), seq_len)
        ids.append(file_ids[: int(file_lengths.sum())])
        lengths.append(file_lengths)
    return np.concatenate(ids), np.concatenate(lengths)
