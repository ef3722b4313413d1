"""Datasets a teacher labels and a student trains on, loaded from the spec a user passes.

``load_data(DataConfig)`` resolves ``DataConfig.spec`` here and nowhere else:

    mnist1d[:key=value,...]   MNIST-1D generated offline, splits "train" and "test"; options
                              are keys of mnist1d's get_dataset_args (num_samples, seed, ...)
    FILE.parquet, FILE.jsonl  one table, which is the "train" split
    DIR                       a `datasets` save_to_disk directory: a DatasetDict (one split
                              per subdirectory) or a Dataset ("train", or the split it was
                              saved as); else DIR/{split}.parquet, .jsonl or .txt, or
                              DIR/{split}/; else, for split "train", all of DIR's *.parquet
                              files, or else its *.jsonl files, or else its *.txt files,
                              sorted by name; an error if any of those is named as another
                              split (test, validation, valid, val, dev, eval), as reading
                              them all would mix splits
    FILE (other extension)    UTF-8 text, for causal-lm
    package.module:function   called as function(split=split); returns a Dataset or a
                              sequence of dicts (keys as in items below) or of
                              (inputs, label) tuples, or a dict of columns like a table

Tables (parquet, jsonl, `datasets`, dicts of columns) give the inputs from the first of:
--ids-column (lists of token ids), --text-column (strings; for classification tokenised
with special tokens and truncated to seq_len, the tokens cut off counted in ``stats``), a
column ``input_ids``, a column ``text``, or a column ``inputs`` of equal-length number
lists (float features). Token ids from a column are used as given. Hard labels for classification come from
--label-column, default ``label``, else a ``labels`` column of integers (not of lists); a
missing or negative label means none (-1).

Chat data: with neither column flag and no ``input_ids`` column, a column ``messages``
(each row a list of {"role", "content"} messages, or that list as a JSON string) is
causal-lm data: each conversation is rendered with --chat-template FILE or the tokenizer's
chat template, and positions are kept where the next token is the assistant's
(--train-on assistant) or any (--train-on all); see ``distill.pipeline.chat``.

Causal-LM documents (a text file, a row's text tokenised whole without special tokens, a
row's ids, a conversation) become sequences by ``distill.pipeline.documents``: windows of
seq_len tokens (overlapping by --stride; each document's last, shorter window kept), never
crossing documents; or with --pack, documents joined by the tokenizer's end-of-text id and
cut every seq_len tokens, items then carrying "position_ids" (L,) that restart at each
document. A row or file of at most seq_len tokens is one sequence, as it is.

Causal-LM positions: the teacher's distribution at token t (predicting token t+1) is
stored for every non-padding token t, including the last one. A table whose tokens come
from an ids column can narrow that per example: with a ``position_mask`` column (lists of
bools aligned with input_ids), or else with a ``labels`` column in the Hugging Face
convention (aligned with input_ids, -100 = not a target), which keeps position t iff
t+1 < L and labels[t+1] != -100. Such a set has ``has_position_mask`` True and each of
its items carries ``position_mask`` (L,) bool.

Items: float features {"inputs": (F,) float32, "labels": () int64, -1 = none}; token ids
{"input_ids": (L,) int64} plus "labels" () for classification, or "position_mask" (L,).

Memory: the data is not held in memory. Tables are read (Parquet and `datasets` files a
batch of rows at a time), tokenised and cut into sequences a batch of rows (or a text
file) at a time, and the per-token arrays (ids as int32 when they fit, masks, position
ids) and float features are written to unnamed temporary files under ``$TMPDIR`` (see
``distill.pipeline.diskarrays``: 4 to 9 bytes a token; point TMPDIR at a disk with room
when /tmp is small or tmpfs). What stays in memory grows per sequence (offsets, labels),
not per token. JSONL files, dicts of columns and items from a function are read whole into
an Arrow table first, as before; mnist1d stays in memory.

A set's fingerprint covers exactly what the teacher sees, in order: the task, the inputs
(or the token ids and every sequence's length), the position masks and position ids; never
hard labels.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from distill.errors import ConfigError
from distill.pipeline.chat import TRAIN_ON
from distill.pipeline.config import check_settings, setting
from distill.pipeline.context import DEFAULT_SEQ_LEN, SEQ_LEN_HELP
from distill.pipeline.examples import ExampleSet
from distill.pipeline.specs import resolve_callable, split_builtin
from distill.pipeline.tasks import TASKS
from distill.pipeline.tables import read_saved_dataset, read_table, sequence_arrays, table_arrays, table_from_python
from distill.pipeline.tokenize import load_tokenizer, require_tokenizer, text_file_documents

__all__ = ["DataFlags", "DataConfig", "ExampleSet", "load_data", "load_tokenizer", "only_split", "choose_split"]

_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataFlags:
    """How a data spec is read: the data flags every stage config shares (keyword-only).

    Stage configs inherit these fields, so `--split`, `--tokenizer`, `--seq-len`,
    `--text-column`, `--ids-column`, `--label-column` and `--limit` mean the same everywhere.
    """

    split: str = setting("train", "Data split: train or test for mnist1d; a single file is the train split.")
    tokenizer: str | None = setting(None, "Tokenizer for text data: a local Hugging Face directory or `bytes`.",
                                    default_help="the model's own, when it is a Hugging Face directory")
    seq_len: int | None = setting(None, "Tokens per sequence: causal-LM documents are cut (or packed) into windows "
                                        "of this many; classification text is truncated to it.", minimum=2,
                                  default_help=SEQ_LEN_HELP)
    text_column: str | None = setting(None, "Column of text to tokenise.", default_help="text, when present")
    ids_column: str | None = setting(None, "Column of token id lists.", default_help="input_ids, when present")
    label_column: str | None = setting(None, "Column of integer class labels.",
                                       default_help="label, else labels, when present")
    limit: int | None = setting(None, "Use only the first N examples.", minimum=1)
    stride: int = setting(0, "Causal LM: tokens each window of a long document repeats from the window before, as "
                             "context (its positions are stored once).", minimum=0)
    pack: bool = setting(False, "Causal LM: pack short documents into each sequence, each followed by the "
                                "tokenizer's end-of-text token.")
    chat_template: str | None = setting(None, "Jinja chat template file for a messages column (chat data).",
                                        default_help="the tokenizer's own")
    train_on: str = setting("assistant", "Chat data: the tokens whose prediction is kept as a position.",
                            choices=TRAIN_ON)

    def data_config(self, spec: str, *, task: str | None = None, **changes) -> "DataConfig":
        """A DataConfig for ``spec`` with these flags (``changes`` override them, e.g. split=)."""
        flags = {f.name: getattr(self, f.name) for f in dataclasses.fields(DataFlags)}
        return DataConfig(spec, task=task, **{**flags, **changes})


@dataclasses.dataclass(frozen=True)
class DataConfig(DataFlags):
    """Which examples to load and how to turn them into model inputs (plus the DataFlags)."""

    spec: str
    """mnist1d[:options], a parquet/jsonl/text file or directory, a `datasets` save_to_disk
    directory, or package.module:function (see the module docstring)."""
    task: str | None = None
    """"classification" or "causal-lm"; None infers it from the data."""

    def __post_init__(self):
        if not self.spec:
            raise ConfigError("data spec is empty: pass a file, directory, mnist1d or package.module:function")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"task {self.task!r} is unknown: pass --task classification|causal-lm")
        if not self.split:
            raise ConfigError("split is empty: pass --split NAME, e.g. --split train")
        for name in ("seq_len", "limit"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer, got {getattr(self, name)!r}")
        if self.seq_len is None:  # the stages resolve it from the model (resolve_seq_len); without one, the old default
            object.__setattr__(self, "seq_len", DEFAULT_SEQ_LEN)
        check_settings(self)
        if not _is_int(self.stride) or self.stride >= self.seq_len:
            raise ConfigError(f"--stride {self.stride} must be an integer less than --seq-len {self.seq_len}, so each "
                              f"window adds new tokens: e.g. --stride {self.seq_len // 4}")
        if self.pack and self.stride:
            raise ConfigError("--pack cuts the packed documents without overlap: drop --stride or --pack")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def load_data(config: DataConfig) -> ExampleSet:
    """Resolve ``config.spec`` (grammar in the module docstring) and load ``config.split``."""
    spec = config.spec
    builtin = split_builtin(spec, _BUILTINS)
    path = Path(spec).expanduser()
    if builtin is not None:
        data = _BUILTINS[builtin[0]](config, builtin[1])
    elif path.exists():
        data = _load_path(path, config.split, config)
    elif _CALLABLE.fullmatch(spec):
        data = _load_callable(config)
    else:
        raise ConfigError(f"data spec {spec!r} is not a file, directory, built-in (mnist1d) or package.module:function: "
                          "check the path, or the spelling of the built-in or the module")
    if config.task is not None and data.task != config.task:
        raise ConfigError(f"data {spec!r} is {data.task} data, not {config.task}: pass --task {data.task}")
    if data.task == "classification" and (config.pack or config.stride):
        raise ConfigError(f"--pack and --stride cut causal-lm documents, and data {spec!r} is classification data "
                          "(one example per row): drop them")
    return data if config.limit is None else data.head(config.limit)


def only_split(spec: str) -> str | None:
    """The name of the one split the data ``spec`` has, or None when it has several (mnist1d) or cannot say.

    One split: a single file, a `datasets` Dataset and a function without a ``split``
    parameter ("train"), a DatasetDict of one split (its name), a directory whose files and
    subdirectories name at most one split ("train" when none does: all of its files).
    """
    path = Path(spec).expanduser()
    if split_builtin(spec, _BUILTINS) is not None:
        return None
    if path.is_file() or (path / "state.json").is_file():
        return "train"
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return splits[0] if len(splits) == 1 else None
    if path.is_dir():
        entries = [p.stem if p.is_file() else p.name for p in path.iterdir() if not p.name.startswith(".")
                   and (p.is_dir() or p.suffix in _SUFFIXES)]
        named = sorted({e for e in entries if e.lower() in _OTHER_SPLITS | {"train"}})
        return None if len(named) > 1 or not entries else (named[0] if named else "train")
    if _CALLABLE.fullmatch(spec):
        try:
            params = inspect.signature(resolve_callable(spec, "data")).parameters.values()
        except (TypeError, ValueError):
            return None
        return None if any(p.name == "split" or p.kind is p.VAR_KEYWORD for p in params) else "train"
    return None


def choose_split(spec: str, split: str, default: str = "test", flag: str = "--split") -> str:
    """``split``, unless it is ``default`` and the data has one split of another name: then that one, with a note.

    So a single held-out file (the "train" split) is what `evaluate` and `--eval-every` read
    without ``--split train``; a split asked for by another name is never swapped.
    """
    only = only_split(spec) if split == default else None
    if only is None or only == split:
        return split
    print(f"distill: note: data {spec!r} has one split, {only!r}, and no {split!r}: reading {only!r} "
          f"({flag} NAME chooses another)", file=sys.stderr, flush=True)
    return only


# --- built-in: mnist1d -----------------------------------------------------------------


def _mnist1d_defaults() -> dict[str, Any]:
    import mnist1d.data

    # url and padding (a list) cannot be given as key=value, nor do they matter offline
    return {k: v for k, v in mnist1d.data.get_dataset_args(as_dict=True).items() if isinstance(v, (int, float))}


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(options: tuple[tuple[str, Any], ...]) -> dict[str, np.ndarray]:
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    for key, value in options:
        setattr(args, key, value)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:  # make_dataset seeds numpy's and python's global generators
        data = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {k: np.asarray(data[k], np.float32 if k.startswith("x") else np.int64)
              for k in ("x", "y", "x_test", "y_test")}
    for a in arrays.values():
        a.setflags(write=False)  # shared by every load with these options
    return arrays


def _load_mnist1d(config: DataConfig, options: dict[str, Any]) -> ExampleSet:
    defaults = _mnist1d_defaults()
    for key, value in options.items():
        if key not in defaults:
            raise ConfigError(f"mnist1d option {key!r} is unknown; valid options: {', '.join(sorted(defaults))}")
        default = defaults[key]
        ok = (isinstance(value, bool) if isinstance(default, bool) else _is_int(value) if isinstance(default, int)
              else isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"mnist1d option {key}={value!r} must be a {type(default).__name__}, "
                              f"like the default {default!r}")
    settings = {**defaults, **options}
    if settings["num_samples"] < 10 or not 0 < settings["train_split"] < 1:
        raise ConfigError("mnist1d needs num_samples >= 10 and 0 < train_split < 1: e.g. mnist1d:num_samples=2000")
    if config.task == "causal-lm":
        raise ConfigError("mnist1d is classification data: pass --task classification or leave --task out")
    names = {"train": ("x", "y"), "test": ("x_test", "y_test")}
    if config.split not in names:
        raise ConfigError(f"mnist1d has splits 'train' and 'test', not {config.split!r}: pass --split train|test")
    arrays = _mnist1d_arrays(tuple(sorted(options.items())))
    x, y = (arrays[k] for k in names[config.split])
    return ExampleSet("classification", inputs=x, labels=y, num_classes=10)


_BUILTINS = {"mnist1d": _load_mnist1d}


# --- files and directories --------------------------------------------------------------


_SUFFIXES = (".parquet", ".jsonl", ".txt")
# file stems that name a split other than "train", so never part of an implicit "train"
_OTHER_SPLITS = frozenset({"test", "validation", "valid", "val", "dev", "eval"})


def _load_path(path: Path, split: str, config: DataConfig) -> ExampleSet:
    if path.is_file():
        if split != "train":
            raise ConfigError(f"data {str(path)!r} is one file, which is the 'train' split; for --split {split}, "
                              f"pass a directory holding {split}.parquet, {split}.jsonl, {split}.txt or {split}/")
        return _load_files([path], config)
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise ConfigError(f"`datasets` DatasetDict {str(path)!r} has no split {split!r}: "
                              f"pass --split with one of {', '.join(splits)}")
        return _from_table(read_saved_dataset(path / split), config, f"data {str(path)!r} split {split!r}")
    if (path / "state.json").is_file():
        saved_as = json.loads((path / "state.json").read_text()).get("_split")
        if split not in ("train", saved_as):
            raise ConfigError(f"`datasets` Dataset {str(path)!r} is one split{f' ({saved_as!r})' if saved_as else ''}: "
                              "pass --split train, or save a DatasetDict holding the splits")
        return _from_table(read_saved_dataset(path), config, f"data {str(path)!r}")
    for entry in (path / f"{split}.parquet", path / f"{split}.jsonl", path / f"{split}.txt", path / split):
        if entry.exists():
            return _load_path(entry, "train", config)
    return _load_directory(path, split, config)


def _load_directory(path: Path, split: str, config: DataConfig) -> ExampleSet:
    """A directory with no entry for ``split``: for "train", all of its files of the first
    suffix in _SUFFIXES that it has, unless some of them are named as other splits."""
    if split != "train":
        found = sorted({p.stem for p in path.iterdir() if p.is_dir() or p.suffix in _SUFFIXES})
        raise ConfigError(f"data directory {str(path)!r} has no split {split!r} (found: {', '.join(found) or 'none'}); "
                          f"pass --split with one of them, or add {split}.parquet")
    for suffix in _SUFFIXES:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == suffix)
        other_splits = [p.name for p in files if p.stem.lower() in _OTHER_SPLITS]
        if other_splits:
            raise ConfigError(f"data directory {str(path)!r} has no train split, and reading all its {suffix} files "
                              f"as 'train' would mix in other splits ({', '.join(other_splits)}): "
                              "pass --split NAME, or point --data at the file")
        if files:
            return _load_files(files, config)
    raise ConfigError(f"data directory {str(path)!r} holds no .parquet, .jsonl or .txt files nor a `datasets` "
                      "save_to_disk dataset: pass a file or another directory")


def _load_files(files: list[Path], config: DataConfig) -> ExampleSet:
    """Parquet or jsonl files as one table; any other files as text."""
    if files[0].suffix not in (".parquet", ".jsonl"):
        return _from_text_files(files, config)
    origin = f"data {str(files[0] if len(files) == 1 else files[0].parent)!r}"
    return _from_table(read_table(files), config, origin)


def _from_table(table: pa.Table, config: DataConfig, origin: str) -> ExampleSet:
    return ExampleSet(**vars(table_arrays(table, config, origin)))


def _from_text_files(files: list[Path], config: DataConfig) -> ExampleSet:
    origin = f"text data {str(files[0] if len(files) == 1 else files[0].parent)!r}"
    if config.task == "classification":
        raise ConfigError(f"{origin} is causal-lm data: for classification pass a parquet/jsonl table "
                          "with a label column")
    tokenizer = require_tokenizer(config.tokenizer, origin)
    arrays = sequence_arrays(text_file_documents(files, tokenizer), config, origin, tokenizer.vocab_size)
    if not arrays.stats["tokens"]:
        raise ConfigError(f"{origin} has no tokens: nothing to label")
    return ExampleSet(**vars(arrays))


# --- package.module:function --------------------------------------------------------------


def _load_callable(config: DataConfig) -> ExampleSet:
    fn = resolve_callable(config.spec, "data")
    origin = f"data {config.spec!r}"
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = None
    if params is None or any(p.name == "split" or p.kind is p.VAR_KEYWORD for p in params):
        result = fn(split=config.split)
    elif config.split == "train":
        result = fn()
    else:
        raise ConfigError(f"{origin} takes no split argument, so it has only the 'train' split; "
                          "give it a split parameter")
    if isinstance(result, ExampleSet):
        return result
    return _from_table(table_from_python(result, origin, limit=config.limit), config, origin)
