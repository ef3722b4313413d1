"""Tokenizers that travel with models: saved into a run's ``model/``, and looked for beside a model.

train-teacher and train-student save the tokenizer they read text with into ``RUN/model/``
(``save_tokenizer``), so the run directory works as ``--teacher`` without ``--tokenizer``
(``distill.pipeline.tokenize.tokenizer_beside`` looks in ``RUN/model/``) and its model
loads with ``AutoTokenizer.from_pretrained``. The ``bytes`` tokenizer is saved as the
equivalent Hugging Face tokenizer (``byte_level_tokenizer``): any UTF-8 text encodes to
exactly its bytes, ids 0..255, as ``ByteTokenizer`` does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from distill.errors import ConfigError, first_line, write_error
from distill.pipeline.hf import quiet_hf
from distill.pipeline.tokenize import TokenizerNeeded, tokenizer_places

__all__ = ["byte_level_tokenizer", "save_tokenizer", "looked_for_tokenizer"]


def byte_level_tokenizer():
    """A ``transformers`` fast tokenizer equal to ``ByteTokenizer``: ids 0..255 are UTF-8 bytes, no special tokens.

    A BPE without merges over GPT-2's byte-to-unicode alphabet, each character's id its
    byte's value; the ByteLevel pre-tokenizer (no regex split, no prefix space) turns text
    into those characters and the ByteLevel decoder turns them back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tokenizer(spec: str | None, directory: str) -> bool:
    """Save the tokenizer ``spec`` (``bytes`` or a local Hugging Face directory) into ``directory`` with
    ``save_pretrained``; returns False (nothing written) when ``spec`` is None.

    A directory that already holds it (``spec`` is ``directory``) is left as it is. A full
    disk or a read-only directory is a one-line WriteError.
    """
    if spec is None:
        return False
    if spec != "bytes" and os.path.isdir(spec) and os.path.isdir(directory) and os.path.samefile(spec, directory):
        return True
    if spec == "bytes":
        tokenizer = byte_level_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            with quiet_hf():
                tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(spec), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"tokenizer {spec!r} cannot be loaded ({first_line(e)}); "
                              "pass a directory written by save_pretrained, or 'bytes'") from None
    try:
        with quiet_hf():
            tokenizer.save_pretrained(directory)
    except OSError as e:
        raise write_error(e, f"the tokenizer in {directory}") from None
    return True


@contextlib.contextmanager
def looked_for_tokenizer(**models: str | None) -> Iterator[None]:
    """Inside, text data that needs a tokenizer when none was given says where one was looked for: beside
    each of ``models`` (role -> model spec, e.g. ``teacher="runs/t"``; None: no such model)."""
    try:
        yield
    except TokenizerNeeded as e:
        places = []
        for who, spec in models.items():
            if spec is None:
                continue
            where = tokenizer_places(spec)
            places.append(f"beside the {who} in {' or '.join(where)}" if where
                          else f"beside the {who} {spec!r} (not a directory)")
        looked = f"none was found {'; '.join(places)}" if places else "no model to take one from"
        raise ConfigError(f"{e.what} must be tokenised, but no --tokenizer was given and {looked}: "
                          "pass --tokenizer DIR or bytes") from None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})  # unprintable bytes, shifted past Latin-1
    return chars
