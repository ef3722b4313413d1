"""Tables of examples, and the plain arrays an ExampleSet is built from.

Reads parquet and jsonl files, `datasets` save_to_disk directories, items and dicts of
columns into pyarrow tables, then turns a table into numpy arrays: float features, or flat
token ids with per-example lengths and position masks, and class labels. Which column is
which, and the task when none is given, follow the rules in ``distill.pipeline.data``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq
import torch

from distill.errors import ConfigError, first_line
from distill.pipeline.diskarrays import ArrayWriter
from distill.pipeline.documents import write_sequences
from distill.pipeline.lazytables import LazyTable, lazy_arrow_streams, lazy_parquet, row_batches
from distill.pipeline.chat import chat_documents, chat_rule, conversations_from_column, resolve_chat_template
from distill.pipeline.tasks import IGNORE_INDEX
from distill.pipeline.tokenize import flatten, load_tokenizer, require_tokenizer

if TYPE_CHECKING:  # data.py imports this module
    from distill.pipeline.data import DataConfig

__all__ = ["Arrays", "read_table", "read_saved_dataset", "table_from_python", "table_arrays", "sequence_arrays"]


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A table's examples as arrays; the fields are ExampleSet's arguments. The per-token arrays
    and the features are DiskArrays (``distill.pipeline.diskarrays``: ids int32 when they fit)
    when loading wrote them, numpy arrays otherwise."""

    task: str
    inputs: np.ndarray | None = None
    """(N, F) float32 features, or None for token ids."""
    input_ids: np.ndarray | None = None
    """(T,) int64: every example's token ids, end to end."""
    lengths: np.ndarray | None = None
    """(N,) int64 tokens per example."""
    labels: np.ndarray | None = None
    """(N,) int64 class labels, -1 = none; None when there are none."""
    position_mask: np.ndarray | None = None
    """(T,) bool, aligned with input_ids (causal-lm); None keeps every position."""
    num_classes: int | None = None
    vocab_size: int | None = None
    position_ids: np.ndarray | None = None
    """(T,) int64 position of each token in its document (packed causal-lm only)."""
    stats: dict | None = None
    """What the documents became (``distill.pipeline.documents.Sequences.stats``); for
    classification text also truncated_tokens."""


# --- reading ----------------------------------------------------------------------------


def _concat(tables: list[pa.Table], origin: str) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ConfigError(f"{origin}: files have different columns or types ({first_line(e)}); "
                          "make them agree") from None


def read_table(files: list[Path]) -> pa.Table | LazyTable:
    """Parquet or jsonl files (all of one suffix) -> one table, rows in file order: Parquet
    files of one schema as a LazyTable, read a batch of rows at a time."""
    if files[0].suffix == ".parquet":
        try:
            lazy = lazy_parquet(files)
        except (pa.ArrowInvalid, OSError):
            lazy = None  # _read_parquet names the file that is not Parquet
        if lazy is not None:
            return lazy
    read = _read_parquet if files[0].suffix == ".parquet" else _read_jsonl
    return _concat([read(f) for f in files], f"data {str(files[0].parent)!r}")


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"cannot read parquet file {str(path)!r} ({first_line(e)}); "
                          "check that it is parquet") from None


def _read_jsonl(path: Path) -> pa.Table:
    try:
        return pajson.read_json(path)
    except pa.ArrowInvalid:  # pyarrow infers types per block; plain json is slower but forgiving
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rows.extend([json.loads(line)] if line.strip() else [])
            except json.JSONDecodeError as e:
                raise ConfigError(f"{str(path)!r} line {number} is not JSON ({e.msg}); "
                                  "write one object per line") from None
        return _table_from_rows(rows, f"data {str(path)!r}")


def read_saved_dataset(path: Path) -> pa.Table | LazyTable:
    """A `datasets` save_to_disk Dataset: state.json lists Arrow IPC stream files, in order;
    read lazily when they share a schema."""
    state = json.loads((path / "state.json").read_text())
    lazy = lazy_arrow_streams([path / f["filename"] for f in state["_data_files"]]) if state["_data_files"] else None
    if lazy is not None:
        return lazy
    tables = [pa.ipc.open_stream(pa.memory_map(str(path / f["filename"]))).read_all() for f in state["_data_files"]]
    return _concat(tables, f"data {str(path)!r}") if tables else pa.table({})


def _table_from_rows(rows: list[dict], origin: str) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise ConfigError(f"{origin}: items cannot be read as one table ({first_line(e)}); "
                          "give every item the same keys and types") from None


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars -> what pyarrow takes (numpy arrays, python scalars)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
        return value.item()
    return value


def _row(item: Any, i: int, origin: str) -> dict[str, Any]:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        item = {"inputs": item[0], "labels": item[1]}
    if not isinstance(item, Mapping):
        raise ConfigError(f"{origin}: item {i} is a {type(item).__name__}; "
                          "items must be dicts or (inputs, label) tuples")
    row = {}
    for key, value in item.items():
        value = _plain(value)
        # an item's scalar "labels" is a class label: the table column for those is "label"
        row["label" if key == "labels" and np.ndim(value) == 0 else key] = value
    return row


def table_from_python(value: Any, origin: str, limit: int | None = None) -> pa.Table:
    """What a user's function returns -> a table of at most ``limit`` rows (a dict of columns
    is converted whole). Items are dicts (of tensors, arrays or python values) or (inputs,
    label) tuples, from a sequence (a Dataset) or any iterable."""
    if isinstance(value, Mapping):
        return _table_from_columns(value, origin)
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        n = len(value) if limit is None else min(len(value), limit)
        items = (value[i] for i in range(n))
    elif hasattr(value, "__iter__"):
        items = itertools.islice(value, limit)
    else:
        raise ConfigError(f"{origin} returned a {type(value).__name__}: return a Dataset, a sequence of dicts "
                          "or (inputs, label) tuples, or a dict of columns")
    return _table_from_rows([_row(item, i, origin) for i, item in enumerate(items)], origin)


def _table_from_columns(columns: Mapping, origin: str) -> pa.Table:
    """A dict of equal-length columns; a 2-D array or tensor is one list per row."""
    arrays = {}
    for name, values in columns.items():
        values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
        if isinstance(values, np.ndarray) and values.ndim == 2:  # (N, F) features or (N, L) ids
            values = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        arrays[str(name)] = values
    try:
        return pa.table(arrays)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise ConfigError(f"{origin}: columns cannot be read as one table ({first_line(e)}); "
                          "give every column one value per row") from None


# --- table -> arrays ----------------------------------------------------------------------


def table_arrays(table: pa.Table, config: DataConfig, origin: str) -> Arrays:
    """Choose the input, label and mask columns of ``table``, infer the task unless
    ``config.task`` is given, and convert; ``origin`` names the data in errors."""
    names = table.column_names
    if table.num_rows == 0:
        raise ConfigError(f"{origin} has no rows: pass data with at least one example")
    if "messages" in names and not (config.ids_column or config.text_column or "input_ids" in names):
        return _chat_arrays(table, config, origin)
    kind, column = _input_column(names, config, origin)
    label_column = config.label_column or next(
        (c for c in ("label", "labels") if c in names and not _is_list_column(table, c)), None)
    if label_column not in names and label_column is not None:
        raise ConfigError(f"{origin} has no column {label_column!r} (columns: {', '.join(names)}); fix --label-column")
    has_masks = kind == "ids" and ("position_mask" in names or _is_list_column(table, "labels"))
    task = config.task or _infer_task(kind, label_column, has_masks, origin, names)
    if task == "causal-lm" and kind == "features":
        raise ConfigError(f"{origin}: causal-lm needs token ids or text, but column {column!r} holds float features")
    labels = None
    if task == "classification" and label_column is not None:
        labels = _labels(table.column(label_column), label_column, origin)
    num_classes = int(labels.max()) + 1 if labels is not None and labels.max() >= 0 else None
    if config.limit is not None:  # after the labels, so that num_classes counts every class
        table, labels = table.slice(0, config.limit), None if labels is None else labels[: config.limit]
    if kind == "features":
        return Arrays(task, inputs=_features_on_disk(table, column, origin), labels=labels, num_classes=num_classes)
    vocab_size = _vocab_size(kind, config)
    batches = (_token_ids(part.column(column), kind, column, task, config, origin, row, vocab_size)
               + (part,) for row, part in row_batches(table))
    if task == "causal-lm":
        documents = ((ids, lengths, _position_mask(part, lengths, origin) if has_masks else None)
                     for ids, lengths, _, part in batches)
        return sequence_arrays(documents, config, origin, vocab_size)
    ids_out, lengths, truncated = ArrayWriter(np.int32), [], 0
    for ids, part_lengths, part_truncated, _ in batches:  # classification: one row, one example
        ids_out.append(ids)
        lengths.append(part_lengths)
        truncated += part_truncated
    lengths = np.concatenate(lengths)
    stats = {"documents": len(lengths), "sequences": len(lengths), "tokens": int(lengths.sum()) + truncated,
             "truncated_tokens": truncated}
    return Arrays(task, input_ids=ids_out.finish(), lengths=lengths, labels=labels, num_classes=num_classes,
                  vocab_size=vocab_size, stats=stats)


def _features_on_disk(table: pa.Table, column: str, origin: str):
    """A features column -> (N, F) float32 DiskArray, converted a batch of rows at a time."""
    out = None
    for _, part in row_batches(table):
        features = _features(part.column(column), column, origin)
        if out is not None and features.shape[1:] != out.row_shape:
            raise ConfigError(f"{origin}: float features {column!r} have {out.row_shape[0]} to {features.shape[1]} "
                              "values per row; every row needs the same number, at least 1")
        out = out or ArrayWriter(np.float32, features.shape[1:])
        out.append(features)
    return out.finish()


def sequence_arrays(documents, config: DataConfig, origin: str, vocab_size: int | None) -> Arrays:
    """Causal-LM documents -> Arrays of sequences, cut or packed as the data flags say.

    Every causal-lm source (text files, text and ids columns, chat) ends here: ``documents``
    yields batches (ids (T_b,) int64 documents end to end, lengths (D_b,), mask (T_b,) bool
    positions each keeps, or None: all); see ``distill.pipeline.documents.write_sequences``.
    The arrays are DiskArrays, written a batch at a time.
    """
    eos_id = _eos_id(config, origin) if config.pack else None  # DataConfig checked stride and pack
    out = write_sequences(documents, config.seq_len, stride=config.stride, pack=config.pack, eos_id=eos_id,
                          limit=config.limit)
    return Arrays("causal-lm", input_ids=out.input_ids, lengths=out.lengths, position_mask=out.position_mask,
                  position_ids=out.position_ids, stats=out.stats, vocab_size=vocab_size)


def _eos_id(config: DataConfig, origin: str) -> int:
    """The end-of-text id that separates packed documents: the tokenizer's eos token."""
    if config.tokenizer is None:
        raise ConfigError(f"--pack separates the documents of {origin} with the tokenizer's end-of-text id: "
                          "pass --tokenizer DIR")
    eos_id = load_tokenizer(config.tokenizer).eos_id
    if eos_id is None:
        raise ConfigError(f"--pack needs an end-of-text token, and tokenizer {config.tokenizer!r} has none: "
                          "set its eos_token and save it again, or drop --pack")
    return int(eos_id)


def _chat_arrays(table: pa.Table, config: DataConfig, origin: str) -> Arrays:
    """A ``messages`` column of conversations -> causal-lm sequences with position masks (pipeline/chat.py)."""
    if config.task == "classification":
        raise ConfigError(f"{origin}: column 'messages' is chat data, which is causal-lm: pass --task causal-lm, "
                          "or --text-column/--ids-column for another input")
    table = table if config.limit is None else table.slice(0, config.limit)
    tokenizer = require_tokenizer(config.tokenizer, f"{origin} column 'messages'")
    template = resolve_chat_template(tokenizer, config.tokenizer, config.chat_template)
    documents = (chat_documents(conversations_from_column(part.column("messages").to_pylist(), "messages", origin,
                                                          first_row=row),
                                tokenizer, template, config.train_on, origin, first_row=row, require_targets=False)
                 for row, part in row_batches(table))
    arrays = sequence_arrays(documents, config, origin, tokenizer.vocab_size)
    if not arrays.stats["positions"]:
        raise ConfigError(f"{origin}: no conversation has an assistant turn to train on; "
                          "add assistant messages or pass --train-on all")
    # the manifest keeps the stats: train-student names a different rule rather than "other data"
    return dataclasses.replace(arrays, stats={**arrays.stats, "chat": chat_rule(template, config.train_on)})


def _vocab_size(kind: str, config: DataConfig) -> int | None:
    """The tokenizer's vocabulary (text needs one, which ``_token_ids`` asks for); ids are checked against it."""
    return load_tokenizer(config.tokenizer).vocab_size if config.tokenizer else None


def _token_ids(column: pa.ChunkedArray, kind: str, name: str, task: str, config: DataConfig,
               origin: str, first_row: int, vocab_size: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows from ``first_row`` of a text or ids column -> (flat ids (T,) int64, lengths (N,), tokens truncated).

    Causal-LM text is tokenised whole (documents_to_sequences cuts it); classification text
    is truncated to seq_len, and the tokens cut off are counted.
    """
    truncated = 0
    if kind == "text":
        tokenizer = require_tokenizer(config.tokenizer, f"{origin} column {name!r}")
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or column.null_count:
            raise ConfigError(f"{origin}: column {name!r} must hold strings with no nulls; fix --text-column")
        texts, classify = column.to_pylist(), task == "classification"
        encoded = tokenizer.encode_batch(texts, special_tokens=classify, max_length=config.seq_len if classify else None)
        ids, lengths = flatten(encoded)
        if classify:  # only a text that filled seq_len may have been cut
            full = [i for i, n in enumerate(lengths) if n == config.seq_len]
            whole = tokenizer.encode_batch([texts[i] for i in full], special_tokens=True) if full else []
            truncated = sum(len(w) for w in whole) - config.seq_len * len(full)
    else:
        ids, lengths = _ragged(column, name, origin, pa.types.is_integer)
        ids = ids.astype(np.int64, copy=False)
        if len(ids) and (ids.min() < 0 or vocab_size is not None and ids.max() >= vocab_size):
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise ConfigError(f"{origin}: column {name!r} holds token id {bad}, outside the vocabulary "
                              f"(size {vocab_size}); check --tokenizer and --ids-column")
    if (lengths == 0).any():
        raise ConfigError(f"{origin}: row {first_row + int(np.argmax(lengths == 0))} has no tokens; drop empty rows")
    return ids, lengths, truncated


def _input_column(names: list[str], config: DataConfig, origin: str) -> tuple[str, str]:
    candidates = [("ids", config.ids_column, "--ids-column"), ("text", config.text_column, "--text-column"),
                  ("ids", "input_ids", None), ("text", "text", None), ("features", "inputs", None)]
    for kind, name, flag in candidates:
        if name is not None and name in names:
            return kind, name
        if name is not None and flag is not None:
            raise ConfigError(f"{origin} has no column {name!r} (columns: {', '.join(names)}); fix {flag}")
    raise ConfigError(f"{origin} has none of the columns input_ids, text or inputs (columns: {', '.join(names)}); "
                      "pass --ids-column or --text-column")


def _infer_task(kind: str, label_column: str | None, has_masks: bool, origin: str, names: list[str]) -> str:
    if label_column is not None or kind == "features":
        return "classification"
    if has_masks:
        return "causal-lm"
    raise ConfigError(f"cannot tell the task of {origin} from its columns ({', '.join(names)}): "
                      "pass --task classification|causal-lm")


def _is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_list_column(table: pa.Table, name: str) -> bool:
    return name in table.column_names and _is_list_type(table.schema.field(name).type)


def _ragged(column: pa.ChunkedArray, name: str, origin: str, value_ok) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (flat values (T,), lengths (N,) int64)."""
    t = column.type
    if not _is_list_type(t) or not value_ok(t.value_type) or column.null_count:
        raise ConfigError(f"{origin}: column {name!r} holds {t}{' with nulls' if column.null_count else ''}; "
                          "it must hold a list of numbers in every row")
    flat = pc.list_flatten(column)
    if flat.null_count:
        raise ConfigError(f"{origin}: column {name!r} has null values inside its lists; fill or drop them")
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
    return flat.to_numpy(), lengths


def _features(column: pa.ChunkedArray, name: str, origin: str) -> np.ndarray:
    """Equal-length number lists -> (N, F) float32."""
    numeric = lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)
    flat, lengths = _ragged(column, name, origin, numeric)
    if lengths.min() != lengths.max() or lengths[0] == 0:
        raise ConfigError(f"{origin}: float features {name!r} have {lengths.min()} to {lengths.max()} values per row; "
                          "every row needs the same number, at least 1")
    return flat.astype(np.float32).reshape(len(lengths), int(lengths[0]))


def _labels(column: pa.ChunkedArray, name: str, origin: str) -> np.ndarray:
    """Class labels (N,) int64; missing or negative -> -1."""
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise ConfigError(f"{origin}: label column {name!r} holds {column.type}, not integer class ids; "
                          "map labels to 0..C-1 or fix --label-column")
    try:
        labels = np.array(pc.cast(pc.fill_null(column, -1), pa.int64()).to_numpy(), np.int64)
    except pa.ArrowInvalid:
        raise ConfigError(f"{origin}: label column {name!r} holds non-integer values; "
                          "labels must be class ids") from None
    labels[labels < 0] = -1
    return labels


def _position_mask(table: pa.Table, lengths: np.ndarray, origin: str) -> np.ndarray:
    """Flat (T,) bool: a position_mask column, else Hugging Face labels (keep t iff labels[t+1] != IGNORE_INDEX)."""
    name = "position_mask" if "position_mask" in table.column_names else "labels"
    ok = pa.types.is_integer if name == "labels" else (lambda t: pa.types.is_boolean(t) or pa.types.is_integer(t))
    values, value_lengths = _ragged(table.column(name), name, origin, ok)
    if not np.array_equal(value_lengths, lengths):
        row = int(np.argmax(value_lengths != lengths))
        raise ConfigError(f"{origin}: row {row} has {value_lengths[row]} {name} for {lengths[row]} tokens; "
                          "they must align with input_ids")
    if name == "position_mask":
        return values.astype(bool)
    mask = np.zeros(len(values), bool)
    mask[:-1] = values[1:] != IGNORE_INDEX
    mask[np.cumsum(lengths) - 1] = False  # the last token of each example has no next-token target
    return mask
