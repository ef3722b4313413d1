"""Open readers read a store: DuckDB and Polars, with the query and code of docs/FORMAT.md, against distill's reader.

The SQL and the Polars code are taken from FORMAT.md's section "Reading a shard with DuckDB
(SQL) or Polars" (only the shard, k, levels and temperature are filled in), so the document
cannot drift from what runs. Parquet shards are read from their files; zarr shards through
the Arrow tables the same section builds from zarr-python's arrays.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from distill.storage import StoreSpec, ValueEncoding, create_store, open_store, sampled_labels, topk_labels
from distill.storage.synthetic import zipf_logits

FORMAT_MD = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"
DATA = Path(__file__).resolve().parent / "data"
SECTION = "## Reading a shard with DuckDB (SQL) or Polars"
LENGTHS = [3, 0, 2, 0, 0, 0, 4, 1]  # ragged; the second shard of 3 holds no positions
PER_SHARD = 3
TEMPERATURES = (0.5, 1.0, 2.0)
T, J = 2.0, 1  # the temperature read, and its column among the stored ones (0.5, 2.0)


def doc_blocks() -> dict[str, str]:
    """The section's fenced blocks: setup and query (sql), polars_setup, polars, zarr (python)."""
    text = FORMAT_MD.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"```(\w+)\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)
    assert [lang for lang, _ in blocks] == ["sql", "sql", "python", "python", "python"]
    return dict(zip(["setup", "query", "polars_setup", "polars", "zarr"], [code for _, code in blocks]))


def sub_once(pattern: str, repl: str, text: str) -> str:
    out, n = re.subn(pattern, repl, text)
    assert n == 1, f"FORMAT.md changed: {pattern!r} matched {n} times"
    return out


def duckdb_setup(setup: str, shard: Path | None, k: int, levels, rank: bool) -> str:
    """The document's setup for one shard; ``shard`` None: the zarr route's Arrow tables."""
    setup = sub_once(r"SET VARIABLE k = [^;]+;", f"SET VARIABLE k = {k};", setup)
    levels = "NULL" if levels is None else levels
    setup = sub_once(r"SET VARIABLE levels = [^;]+;", f"SET VARIABLE levels = {levels};", setup)
    setup = sub_once(r"SET VARIABLE temperature = [^;]+;", f"SET VARIABLE temperature = {T};", setup)
    setup = sub_once(r"tempered_lse_0 AS lse", f"tempered_lse_{J} AS lse", setup)
    if rank:  # the commented lines instead of the empty table
        setup = sub_once(r" *SELECT 0::BIGINT AS rank, 0::BIGINT AS id LIMIT 0;\n", "", setup)
        setup = re.sub(r"^-- ", "  ", setup, flags=re.M)
    if shard is None:
        return re.sub(r"read_parquet\('[^']*/(\w+)\.parquet', file_row_number = true\)", r"\1_file", setup)
    return setup.replace("labels.store/shards/000000", shard.as_posix())


def polars_settings(code: str, shard: Path, k: int, levels) -> str:
    settings = f"shard, k, levels, T, j = {str(shard)!r}, {k}, {levels}, {T}, {J}"
    return sub_once(r"(?m)^shard, k, levels, T, j = .*$", settings, code)


def zarr_columns(shard: Path) -> dict[str, np.ndarray]:
    """As FORMAT.md's zarr reading does it."""
    group = zarr.open_group(str(shard), mode="r", zarr_format=3)
    return {name: arr[...] for name, arr in group.arrays()}


def open_read(root: Path, index: int) -> tuple[list[tuple], pl.DataFrame]:
    """One shard through DuckDB (rows of the query) and Polars (the code's ``table``), as FORMAT.md says."""
    blocks = doc_blocks()
    man = json.loads((root / "manifest.json").read_text())
    shard = root / "shards" / f"{index:06d}"
    k, enc, rank = man["k"], man["value_encoding"], man.get("id_coding", "delta") == "rank"
    levels = enc.get("levels") if enc["name"] == "sqrt" else None
    if man["backend"] == "parquet":
        con = duckdb.connect()
        con.execute(duckdb_setup(blocks["setup"], shard, k, levels, rank))
        ns: dict = {}
        exec(polars_settings(blocks["polars_setup"], shard, k, levels), ns)
    else:
        ns = {"np": np, "man": man, "col": zarr_columns(shard)}
        exec(blocks["zarr"], ns)
        con = ns["con"]
        con.execute(duckdb_setup(blocks["setup"], None, k, levels, rank))
        ns.update(k=k, levels=levels, T=T, j=J)
    rows = con.execute(blocks["query"]).fetchall()
    exec(blocks["polars"], ns)
    return rows, ns["table"]


def write(root: Path, method: str, backend: str, encoding, id_coding: str = "delta", vocab: int = 200, k: int = 8) -> None:
    g = torch.Generator().manual_seed(11)
    logits = zipf_logits(sum(LENGTHS), vocab, g)
    stored = tuple(t for t in TEMPERATURES if t != 1.0)
    if method == "topk":
        labels = topk_labels(logits, k, stored, lengths=LENGTHS)
    else:
        labels = sampled_labels(logits, k, stored, lengths=LENGTHS, generator=g)
    spec = StoreSpec(method, k=k, vocab_size=vocab, num_examples=len(LENGTHS), examples_per_shard=PER_SHARD,
                     temperatures=TEMPERATURES, value_encoding=encoding, backend=backend, id_coding=id_coding)
    writer = create_store(str(root), spec)
    for i in range(spec.num_shards):
        writer.write_shard(i, labels.examples(*spec.shard_range(i)))
    writer.finalize()


def probs(logprobs: torch.Tensor) -> np.ndarray:
    return logprobs.double().exp().numpy()  # -inf (padding, empty tail) -> 0


def assert_matches_distill(root: Path) -> None:
    reader = open_store(str(root))
    for index in reader.complete_shards():
        ref = reader.read_shard(index)
        rows, table = open_read(root, index)
        P = ref.num_positions
        assert [r[0] for r in rows] == list(range(P)) and table["pos"].to_list() == list(range(P))
        lp_T, tail_T = ref.tempered(T)
        want = {"ids": ref.topk_ids.numpy(), "probs": probs(ref.topk_logprobs), "tail": probs(ref.tail_logprob),
                "probs_T": probs(lp_T), "tail_T": probs(tail_T)}
        duck = {name: np.array([r[c] for r in rows]) for c, name in enumerate(want, start=1)}  # the query's columns
        polars = {name: np.array(table[name].to_list()) for name in want}
        for got in (duck, polars):
            if P == 0:
                assert all(len(v) == 0 for v in got.values())
                continue
            assert np.array_equal(got["ids"], want["ids"])
            for name in ("probs", "tail", "probs_T", "tail_T"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
            np.testing.assert_allclose(got["probs_T"].sum(1) + got["tail_T"], 1.0, atol=1e-9)


STORES = [  # (method, encoding, id coding): every option of the writer at least once
    ("topk", "sqrt", "delta"),
    ("topk", ValueEncoding("sqrt", 15), "rank"),  # --value-bits 4
    ("topk", "lossless", "rank"),
    ("sample", "sqrt", "rank"),
    ("sample", "lossless", "delta"),
]


@pytest.mark.parametrize("method,encoding,id_coding", STORES, ids=["topk-sqrt", "topk-bits4-rank", "topk-lossless-rank",
                                                                   "sample-sqrt-rank", "sample-lossless"])
@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_duckdb_and_polars_read_as_format_md_says(tmp_path, backend, method, encoding, id_coding):
    root = tmp_path / "labels.store"
    write(root, method, backend, encoding, id_coding)
    assert_matches_distill(root)


@pytest.mark.parametrize("encoding", ["sqrt", "lossless"])
@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_open_readers_keep_an_empty_tail_empty(tmp_path, backend, encoding):
    """k = V (every class kept): the tail is 0 at every temperature in DuckDB and Polars too."""
    root = tmp_path / "labels.store"
    write(root, "topk", backend, encoding, vocab=10, k=10)
    assert_matches_distill(root)
    rows, table = open_read(root, 0)
    assert [r[5] for r in rows] == [0.0] * len(rows) and table["tail_T"].to_list() == [0.0] * len(rows)


def test_every_parquet_file_of_every_option_reads_in_duckdb_polars_and_pyarrow(tmp_path):
    """All columns of all files, tail draws and uint16 codes included; float16 values sit in float32 columns."""
    g = torch.Generator().manual_seed(3)
    logits = zipf_logits(sum(LENGTHS), 300, g)
    labels = topk_labels(logits, 4, (2.0,), lengths=LENGTHS, tail_samples=5, generator=g)
    root = tmp_path / "labels.store"
    spec = StoreSpec("topk", k=4, vocab_size=300, num_examples=len(LENGTHS), examples_per_shard=PER_SHARD,
                     temperatures=(1.0, 2.0), value_encoding=ValueEncoding("sqrt", 65535), backend="parquet",
                     tail_samples=5, id_coding="rank")
    writer = create_store(str(root), spec)
    for i in range(spec.num_shards):
        writer.write_shard(i, labels.examples(*spec.shard_range(i)))
    writer.finalize()
    files = sorted(root.glob("shards/*/*.parquet"))
    assert {f.stem for f in files} == {"examples", "positions", "entries", "tail", "ids"}
    for f in files:
        arrow = pq.read_table(f)
        duck = duckdb.sql(f"SELECT * FROM read_parquet('{f.as_posix()}')").fetchnumpy()
        frame = pl.read_parquet(f)
        for name in arrow.column_names:
            assert np.array_equal(duck[name], arrow.column(name).to_numpy()), (f, name)
            assert np.array_equal(frame[name].to_numpy(), arrow.column(name).to_numpy()), (f, name)
        if f.name == "positions.parquet":
            for name in arrow.column_names:
                values = arrow.column(name).to_numpy()
                assert values.dtype == np.float32 and np.array_equal(values.astype(np.float16).astype(np.float32), values)


def test_a_store_written_with_float16_byte_stream_split_still_reads():
    """tests/storage/data/parquet-float16-bss.store: written by the Parquet writer before issue 18 (Float16 + BSS)."""
    root = DATA / "parquet-float16-bss.store"
    schema = pq.read_schema(root / "shards" / "000000" / "positions.parquet")
    assert str(schema.field("tail_logprob").type) == "halffloat"
    encodings = pq.ParquetFile(root / "shards" / "000000" / "positions.parquet").metadata.row_group(0).column(0).encodings
    assert "BYTE_STREAM_SPLIT" in encodings
    expected = json.loads((DATA / "parquet-float16-bss.expected.json").read_text())
    reader = open_store(str(root))  # read only: nothing is written to the repository
    assert reader.complete_shards() == list(range(len(expected)))
    for index, want in enumerate(expected):
        got = reader.read_shard(index)
        lp_T, tail_T = got.tempered(2.0)
        assert got.offsets.tolist() == want["offsets"] and got.topk_ids.tolist() == want["ids"]
        for name, value in [("logprobs", got.topk_logprobs), ("tail_logprob", got.tail_logprob),
                            ("tempered_lse", got.tempered_lse), ("logprobs_T2", lp_T), ("tail_logprob_T2", tail_T)]:
            assert np.array_equal(value.numpy(), np.array(want[name], dtype=np.float32).reshape(value.shape)), name
