"""`distill import-labels`: a store from top-k labels made elsewhere (vLLM ``prompt_logprobs``, top-k datasets).

Reads top to bottom: load the data the labels belong to (as train-student will read it),
open the source table, check every row against its example once without writing anything
(position counts, ids, log-probabilities, a mass of at most 1), describe the store, then
turn the rows into labels (``SoftLabels.from_topk``) a batch at a time and write them shard
by shard with the store writer, which seals the store last.

The source has one row per example of the data, in order: a column of per-position lists
of top-k ids and one of their log-probabilities under the teacher's full softmax at T=1
(for classification a row may hold one flat list: one position). The tail is what those
log-probabilities leave of 1. The top-k alone gives no tempered normalisers, so the store
holds temperature 1 only, unless the source has a column of them (``--tempered-lse-column``
with ``--temperature``); its manifest says which (``extra["imported"]``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from distill.errors import ConfigError
from distill.pipeline.config import check_settings, setting
from distill.pipeline.context import DEFAULT_SEQ_LEN
from distill.pipeline.data import DataFlags, ExampleSet, load_data
from distill.pipeline.fingerprint import Fingerprint
from distill.pipeline.lazytables import LazyTable
from distill.pipeline.progress import Progress
from distill.pipeline.tables import read_saved_dataset, read_table
from distill.pipeline.tasks import TASKS
from distill.storage import BACKENDS, VALUE_ENCODINGS, SoftLabels, StoreSpec, StoreWriter, create_store, open_store

__all__ = ["ImportConfig", "import_labels", "IMPORTED_NOTE", "IMPORTED_WITH_NORMALISERS"]

ROWS = 1024  # source rows converted at a time
TARGET_SHARD_POSITIONS = 65536  # about this many positions per shard, as generate-labels writes
IMPORTED_NOTE = "the tail is 1 minus the top-k mass; no tempered normalisers, so temperature 1 only"
IMPORTED_WITH_NORMALISERS = "the tail is 1 minus the top-k mass; tempered normalisers from the source's column {}"


@dataclasses.dataclass(frozen=True)
class ImportConfig(DataFlags):
    """Settings of `distill import-labels` (each field's help is its flag's)."""

    data: str | None = setting(None, "The data the labels belong to, as train-student will read it (token ids, one "
                                     "row per example): a parquet/jsonl file or directory, or a saved `datasets` "
                                     "dataset.")
    source: str | None = setting(None, "The top-k labels: a parquet/jsonl file or directory or a saved `datasets` "
                                       "dataset, one row per example of --data, in order.", default_help="--data")
    out: str = setting("", "The store to write: a directory path or fsspec URL.")
    topk_ids_column: str = setting("topk_ids", "Source column of per-position lists of top-k ids.")
    topk_logprobs_column: str = setting("topk_logprobs", "Source column of their log-probabilities under the "
                                                         "teacher's full-vocabulary softmax (T=1).")
    temperatures: tuple[float, ...] = setting((), "A temperature whose normaliser the source holds in "
                                                  "--tempered-lse-column; repeat for several, in the column's order.",
                                              flag="--temperature", default_help="none: temperature 1 only")
    tempered_lse_column: str = setting("tempered_lse", "Source column of per-position lists of the teacher's "
                                                       "logsumexp(log-probabilities / T) over the whole vocabulary, "
                                                       "one per --temperature.")
    k: int | None = setting(None, "Ids kept per position: its k most probable (the rest joins the tail).", minimum=1,
                            default_help="the fewest any position has")
    vocab_size: int | None = setting(None, "The teacher's output size.", minimum=1,
                                     default_help="the tokenizer's vocabulary, or the data's classes")
    task: str | None = setting(None, "The task.", choices=TASKS,
                               default_help="causal-lm for per-position lists of lists, classification for one list")
    teacher_name: str = setting("", "Who made the labels (a model name, for the manifest's provenance).")
    mass_tolerance: float = setting(1e-3, "How far past 1 a position's probabilities may sum (rounding) before its "
                                          "row is refused.", minimum=0)
    backend: str = setting("zarr", "Store backend.", choices=BACKENDS)
    value_encoding: str = setting("sqrt", "How log-probs are stored: sqrt (1 byte) or lossless.",
                                  choices=VALUE_ENCODINGS)
    examples_per_shard: int | None = setting(None, "Shard size.", minimum=1, default_help="about 65,536 positions")
    overwrite: bool = setting(False, "Replace a store made with other settings.")
    progress: bool = setting(True, "No progress bar or log lines.")

    def __post_init__(self):
        check_settings(self)
        if not self.out:
            raise ConfigError("missing --out: pass the path of the store to write")
        if not self.data:
            raise ConfigError("missing --data: pass the data the labels belong to (token ids, one row per example)")
        if not self.topk_ids_column or not self.topk_logprobs_column:
            raise ConfigError("--topk-ids-column and --topk-logprobs-column must name columns of the source")
        temps = tuple(float(t) for t in self.temperatures)
        if any(not (t > 0 and math.isfinite(t)) or t == 1.0 for t in temps) or len(set(temps)) < len(temps):
            raise ConfigError(f"--temperature must be distinct, finite, > 0 and not 1 (which needs no normaliser), "
                              f"got {list(temps)}: e.g. --temperature 2")
        object.__setattr__(self, "temperatures", temps)


def import_labels(config: ImportConfig) -> dict:
    """Write the store at ``config.out`` from the source's top-k labels; returns examples, positions and the
    store's summary. Bad input raises a one-line ConfigError before anything is written."""
    source_spec = config.source or config.data
    source = _open_source(source_spec, config.split)
    if config.limit is not None:
        source = source.slice(0, config.limit)
    _check_columns(source, config, source_spec)
    task = config.task or _task_of(source.schema.field(config.topk_ids_column).type)
    data = load_data(config.data_config(config.data, task=task))
    if len(data) == 0:
        raise ConfigError(f"data {config.data!r} (split {config.split!r}) has no examples: check --data and --split")
    if source.num_rows != len(data):
        raise ConfigError(f"the source {source_spec!r} has {source.num_rows:,} rows but data {config.data!r} has "
                          f"{len(data):,} examples: give one row of labels per example, in the data's order")
    vocab_size = config.vocab_size or data.vocab_size or (data.num_classes if data.task == "classification" else None)
    if vocab_size is None:
        raise ConfigError("the teacher's output size is not known: pass --vocab-size (or --tokenizer for token data)")
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if config.progress else (lambda line: None)
    scan = _scan(source, data, config, vocab_size, source_spec)
    k = config.k or scan.fewest
    if k > scan.fewest:
        raise ConfigError(f"--k {k} is more than the {scan.fewest} ids position {scan.fewest_at[1]} of row "
                          f"{scan.fewest_at[0]} has: pass --k {scan.fewest} or less")
    spec = _store_spec(config, data, k, vocab_size, scan, source_spec)
    writer = create_store(config.out, spec, overwrite=config.overwrite)
    pending = set(writer.pending_shards())
    say(f"import-labels: {len(data):,} examples, {scan.positions:,} positions, k={k}, in {spec.num_shards:,} "
        f"shard(s), {len(pending):,} to write")
    progress = Progress(len(data), label="import-labels: ", enabled=config.progress)
    try:
        _write(writer, pending, _labels(source, data, config, k), progress)
    finally:
        progress.close()
        writer.release()
    writer.finalize()
    say(f"import-labels: store {config.out} complete")
    return {"examples": len(data), "positions": scan.positions, "shards_written": len(pending),
            "store": open_store(config.out).summary()}


def _write(writer: StoreWriter, pending: set[int], batches, progress: Progress) -> None:
    """Cut the (first row, labels) ``batches``, in row order, into shards and commit the ``pending`` ones."""
    shard, index = None, 0
    for row, labels in batches:
        progress.update(labels.num_examples, labels.num_positions)
        while labels.num_examples:
            stop = writer.spec.shard_range(index)[1]
            take = min(labels.num_examples, stop - row)
            if index in pending:
                shard = writer.shard(index) if shard is None else shard
                shard.append(labels.examples(0, take))
            labels, row = labels.examples(take, labels.num_examples), row + take
            if row == stop:  # the shard's last example: write it whole, then the next shard
                if shard is not None:
                    shard.commit()
                shard, index = None, index + 1


# --- the source ----------------------------------------------------------------------------------

def _open_source(spec: str, split: str) -> pa.Table | LazyTable:
    """The source table at ``spec``: a parquet or jsonl file, a directory of them (or of {split}.*), or a saved
    `datasets` Dataset or DatasetDict (its ``split``)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"the source {spec!r} does not exist: pass --source, a parquet/jsonl file or directory or a "
                          "saved `datasets` dataset holding the top-k columns")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise ConfigError(f"`datasets` DatasetDict {spec!r} has no split {split!r}: pass --split with one of "
                              f"{', '.join(splits)}")
        return read_saved_dataset(path / split)
    if (path / "state.json").is_file():
        return read_saved_dataset(path)
    if path.is_dir():
        named = [path / f"{split}{suffix}" for suffix in (".parquet", ".jsonl")]
        files = [p for p in named if p.is_file()][:1] or sorted(path.glob("*.parquet")) or sorted(path.glob("*.jsonl"))
    else:
        files = [path] if path.suffix in (".parquet", ".jsonl") else []
    if not files:
        raise ConfigError(f"the source {spec!r} is not a .parquet or .jsonl file, nor a directory of them, nor a saved "
                          "`datasets` dataset: pass one with --source")
    return read_table(files)


def _columns(config: ImportConfig) -> list[str]:
    """The source columns read: ids, log-probabilities and, with --temperature, the tempered normalisers."""
    return [config.topk_ids_column, config.topk_logprobs_column] + ([config.tempered_lse_column] if config.temperatures
                                                                     else [])


def _check_columns(source, config: ImportConfig, spec: str) -> None:
    names = source.column_names
    flags = ("--topk-ids-column", "--topk-logprobs-column", "--tempered-lse-column (or drop --temperature)")
    for flag, name in zip(flags, _columns(config)):
        if name not in names:
            raise ConfigError(f"the source {spec!r} has no column {name!r} (columns: {', '.join(names)}); fix {flag}")


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _task_of(ids_type: pa.DataType) -> str:
    """causal-lm for per-position lists of lists of ids, classification for one list per row."""
    return "causal-lm" if _is_list(ids_type) and _is_list(ids_type.value_type) else "classification"


def _batches(source, columns: list[str]):
    """(first row, pa.Table of at most ROWS rows of ``columns``) over the source, in order."""
    if isinstance(source, LazyTable):
        yield from source.batches(ROWS, columns=columns)
        return
    for row in range(0, source.num_rows, ROWS):
        yield row, source.select(columns).slice(row, ROWS)


@dataclasses.dataclass
class _Rows:
    """One batch of source rows, flat: ``values`` (N,) in position order, ``per_position`` (P,) entries each,
    ``per_row`` (R,) positions each."""

    values: np.ndarray
    per_position: np.ndarray
    per_row: np.ndarray


def _flat(column: pa.ChunkedArray, name: str, first_row: int, spec: str) -> _Rows:
    """A column of per-position lists (list of lists; a flat list is one position) as flat arrays."""
    array = column.combine_chunks()
    if not _is_list(array.type):
        raise ConfigError(f"the source {spec!r} column {name!r} holds {array.type}, not lists: give each row a list "
                          "of per-position lists")
    nested = _is_list(array.type.value_type)
    per_row = pc.list_value_length(array) if nested else pa.array(np.ones(len(array), np.int64))
    inner = array.flatten() if nested else array
    per_position = pc.list_value_length(inner)
    if array.null_count or inner.null_count or per_position.null_count or inner.flatten().null_count:
        row = first_row + int(np.argmax(np.asarray(pc.is_null(array))) if array.null_count else 0)
        raise ConfigError(f"the source {spec!r} column {name!r} has a missing value (near row {row}): fill every "
                          "position, or mark the positions you lack with a position_mask column in the data")
    return _Rows(inner.flatten().to_numpy(zero_copy_only=False), per_position.to_numpy().astype(np.int64),
                 np.asarray(per_row).astype(np.int64))


def _read(part: pa.Table, row: int, config: ImportConfig, spec: str) -> tuple[_Rows, np.ndarray, np.ndarray]:
    """(the ids' flat rows, the log-probabilities (N,) float64, the tempered normalisers (P, nT) float64) of a
    batch, checked to have one shape."""
    ids = _flat(part.column(config.topk_ids_column), config.topk_ids_column, row, spec)
    logprobs = _flat(part.column(config.topk_logprobs_column), config.topk_logprobs_column, row, spec)
    for name in ("per_row", "per_position"):
        differ = getattr(ids, name) != getattr(logprobs, name)
        if differ.any():
            at = int(np.argmax(differ))
            where = f"row {row + at}" if name == "per_row" else f"row {row + _row_of(ids.per_row, at)}"
            raise ConfigError(f"the source {spec!r} {where} has not as many log-probabilities as ids: give "
                              f"{config.topk_logprobs_column!r} the shape of {config.topk_ids_column!r}")
    if not np.issubdtype(ids.values.dtype, np.integer):
        raise ConfigError(f"the source {spec!r} column {config.topk_ids_column!r} holds {ids.values.dtype}, not "
                          "integer ids: fix --topk-ids-column")
    temps = len(config.temperatures)
    lse = np.zeros((len(ids.per_position), temps))
    if temps:
        name = config.tempered_lse_column
        lse_rows = _flat(part.column(name), name, row, spec)
        differ = (lse_rows.per_row != ids.per_row).any() or (lse_rows.per_position != temps).any()
        if differ or not np.isfinite(lse_rows.values.astype(np.float64)).all():
            raise ConfigError(f"the source {spec!r} column {name!r} must hold, for every position, {temps} finite "
                              f"normaliser(s), one per --temperature (rows {row} to {row + part.num_rows - 1})")
        lse = lse_rows.values.astype(np.float64).reshape(-1, temps)
    return ids, logprobs.values.astype(np.float64), lse


def _row_of(per_row: np.ndarray, position: int) -> int:
    """The row (relative) that holds relative ``position``."""
    return int(np.searchsorted(np.cumsum(per_row), position, side="right"))


def _example_positions(data: ExampleSet, start: int, stop: int) -> tuple[np.ndarray, torch.Tensor | None]:
    """(positions of examples start:stop (E,), their token index (P,) int32 or None), as generate-labels counts them."""
    if data.task == "classification":
        return np.ones(stop - start, np.int64), None
    batch = data.gather(torch.arange(start, stop))
    mask = batch["position_mask"]  # (B, L)
    token_index = (batch["position_index"] % mask.shape[1]).to(torch.int32) if data.has_position_mask else None
    return mask.sum(1).numpy(), token_index


# --- checking every row first, then converting -------------------------------------------------------

@dataclasses.dataclass
class _Scan:
    positions: int = 0
    fewest: int = 1 << 62
    fewest_at: tuple[int, int] = (0, 0)  # (row, position within the row)
    fingerprint: str = ""


def _scan(source, data: ExampleSet, config: ImportConfig, vocab_size: int, spec: str) -> _Scan:
    """Check every row against its example (one line for the first bad one); count positions and the fewest ids."""
    scan, fp = _Scan(), Fingerprint("imported-topk-labels")
    for row, part in _batches(source, _columns(config)):
        ids, lp, lse = _read(part, row, config, spec)
        want, _ = _example_positions(data, row, row + part.num_rows)
        if (ids.per_row != want).any():
            at = int(np.argmax(ids.per_row != want))
            counted = "one per token its position_mask keeps" if data.has_position_mask else "one per token, the last too"
            raise ConfigError(f"row {row + at} of the source has labels for {ids.per_row[at]} positions but example "
                              f"{row + at} of the data has {want[at]} ({counted}): give one list per position, or a "
                              "position_mask column in the data that leaves out the positions you lack")
        _check_values(ids, lp, lse, config, row, vocab_size, spec)
        if len(ids.per_position) and int(ids.per_position.min()) < scan.fewest:
            at = int(np.argmin(ids.per_position))
            row_at = _row_of(ids.per_row, at)
            scan.fewest = int(ids.per_position[at])
            scan.fewest_at = (row + row_at, at - int(ids.per_row[:row_at].sum()))
        scan.positions += len(ids.per_position)
        fp.tensor("ids", ids.values.astype(np.int64)).tensor("logprobs", lp).tensor("sizes", ids.per_position)
    scan.fingerprint = fp.hexdigest()
    if scan.positions == 0:
        raise ConfigError(f"the source {spec!r} has no positions: nothing to import")
    return scan


def _check_values(ids: _Rows, lp: np.ndarray, lse: np.ndarray, config: ImportConfig, row: int, vocab_size: int,
                  spec: str) -> None:
    """Refuse a position with no ids, an id outside the vocabulary or repeated, a non-finite log-probability, or
    probabilities that sum past 1 + --mass-tolerance (at T=1 or a --temperature); the error names the row."""
    sizes = ids.per_position
    if not len(sizes):
        return
    position = np.repeat(np.arange(len(sizes)), sizes)  # (N,) position of each entry
    problems = [
        (sizes == 0, "a position with no ids: give every position at least one id"),
        (np.bincount(position[(ids.values < 0) | (ids.values >= vocab_size)], minlength=len(sizes)) > 0,
         f"an id outside the vocabulary [0, {vocab_size}): pass the teacher's --vocab-size, or fix the ids"),
        (np.bincount(position[~np.isfinite(lp)], minlength=len(sizes)) > 0,
         "a log-probability that is not finite: give finite log-probabilities"),
    ]
    order = np.lexsort((ids.values, position))
    repeated = (np.diff(ids.values[order]) == 0) & (np.diff(position[order]) == 0)
    problems.append((np.bincount(position[order][1:][repeated], minlength=len(sizes)) > 0,
                     "an id twice in one position: give distinct ids"))
    for bad, what in problems:
        if bad.any():
            raise ConfigError(f"row {row + _row_of(ids.per_row, int(np.argmax(bad)))} of the source {spec!r} has {what}")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for col, t in enumerate((1.0, *config.temperatures)):
        scaled = lp / t
        top = np.maximum.reduceat(scaled, starts)  # (P,)
        mass = top + np.log(np.add.reduceat(np.exp(scaled - top[position]), starts))  # (P,) log of the top-k mass
        if col:
            mass -= lse[:, col - 1]
        over = mass > math.log1p(config.mass_tolerance)
        if over.any():
            at = int(np.argmax(over))
            fix = ("give log-probabilities under the teacher's full-vocabulary softmax (not renormalised over the top "
                   "k), or raise --mass-tolerance" if not col else f"check the {config.tempered_lse_column!r} column")
            raise ConfigError(f"row {row + _row_of(ids.per_row, at)} of the source {spec!r} has top-k probabilities "
                              f"that sum to {math.exp(mass[at]):.6g} at T={t:g}, more than 1: {fix}")


def _labels(source, data: ExampleSet, config: ImportConfig, k: int):
    """(first row, SoftLabels of the batch) over the source: each position's k most probable ids."""
    order = sorted(range(len(config.temperatures)), key=lambda i: config.temperatures[i])  # the store sorts them
    for row, part in _batches(source, _columns(config)):
        ids, lp, lse = _read(part, row, config, "")
        sizes = ids.per_position
        slot = np.arange(len(lp)) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # (N,) entry's slot in its position
        position = np.repeat(np.arange(len(sizes)), sizes)
        width = int(sizes.max(initial=k))
        values = torch.full((len(sizes), width), float("-inf"), dtype=torch.float64)  # (P, widest)
        values[position, slot] = torch.from_numpy(lp)
        all_ids = torch.zeros(len(sizes), width, dtype=torch.int64)
        all_ids[position, slot] = torch.from_numpy(ids.values.astype(np.int64))
        kept, at = values.topk(k, dim=1)  # (P, k): every position has at least k entries
        offsets = np.concatenate([[0], np.cumsum(ids.per_row)])
        labels = SoftLabels.from_topk(all_ids.gather(1, at), kept, offsets=offsets, tolerance=config.mass_tolerance)
        labels.token_index = _example_positions(data, row, row + part.num_rows)[1]
        labels.tempered_lse = torch.from_numpy(lse[:, order]).float()  # (P, nT)
        labels.temperatures = tuple(config.temperatures[i] for i in order)
        yield row, labels


def _store_spec(config: ImportConfig, data: ExampleSet, k: int, vocab_size: int, scan: _Scan,
                source_spec: str) -> StoreSpec:
    """The store's spec: the source's content as the teacher's fingerprint, the data's as the dataset's."""
    imported = {"source": os.path.basename(os.path.normpath(source_spec)), "teacher": config.teacher_name,
                "columns": _columns(config), "note": IMPORTED_WITH_NORMALISERS.format(config.tempered_lse_column)
                if config.temperatures else IMPORTED_NOTE}
    extra: dict = {"imported": imported}
    if data.stats:
        extra["data"] = dict(data.stats)
    if data.lengths is not None:  # train-student cuts the data as this did
        extra.update(seq_len=config.seq_len or DEFAULT_SEQ_LEN, longest_sequence=int(data.lengths.max()))
    per_example = scan.positions / len(data)
    shard = config.examples_per_shard or 1 << max(0, int(math.log2(max(1.0, TARGET_SHARD_POSITIONS / per_example))))
    return StoreSpec(method="topk", k=k, vocab_size=vocab_size, num_examples=len(data), examples_per_shard=shard,
                     temperatures=(1.0, *config.temperatures), value_encoding=config.value_encoding, backend=config.backend,
                     teacher_fingerprint=scan.fingerprint, dataset_fingerprint=data.fingerprint(),
                     has_token_index=data.has_position_mask, task=data.task, extra=extra)
