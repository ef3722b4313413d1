"""Parquet backend: each shard is three Parquet files (four with tail draws), one row per example, position or slot.

    examples.parquet   offsets         (E+1 rows)
    positions.parquet  tail_logprob, tempered_lse_<j>, token_index   (P rows)
    entries.parquet    ids_delta, logprobs | logprob_codes, counts   (P*K rows, position-major)
    tail.parquet       tail_ids_delta, tail_counts                   (P*M rows, position-major; tail draws only)
    ids.parquet        id_order                                      (D rows; id coding "rank" only)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.storage.backend import ENTRY_COLUMNS, TABLE_COLUMNS, TAIL_COLUMNS, Backend

__all__ = ["ParquetBackend"]


def _table_bytes(columns: dict[str, np.ndarray]) -> bytes:
    # float16 as float32 (same values): DuckDB refuses Float16 with BYTE_STREAM_SPLIT; this costs 0.1% of an LM store.
    columns = {name: data.astype(np.float32) if data.dtype == np.float16 else data for name, data in columns.items()}
    table = pa.table({name: pa.array(data) for name, data in columns.items()})
    multibyte = [n for n, d in columns.items() if d.dtype.itemsize > 1]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table, sink, compression="zstd", compression_level=5, use_dictionary=False,
        use_byte_stream_split=multibyte, write_statistics=False, store_schema=False,
    )
    return sink.getvalue().to_pybytes()


def _table_columns(data: bytes, rows: int | None = None) -> dict[str, np.ndarray]:
    """The columns of one file; a file of other than ``rows`` rows raises ValueError before it is read."""
    source = pa.BufferReader(data)
    if rows is not None and pq.ParquetFile(source).metadata.num_rows != rows:
        raise ValueError(f"a file holds another number of rows than the commit record implies ({rows})")
    table = pq.read_table(source)
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    if any(c.dtype.kind not in "iuf" for c in columns.values()):
        raise ValueError("a column is not numeric")
    return columns


class ParquetBackend(Backend):
    name = "parquet"

    def serialize(self, columns: dict[str, np.ndarray]) -> dict[str, bytes]:
        positions, entries, tail, table = {}, {}, {}, {}
        for name, data in columns.items():
            if name in TABLE_COLUMNS:
                table[name] = data
            elif name in ENTRY_COLUMNS:
                entries[name] = data.reshape(-1)
            elif name in TAIL_COLUMNS:
                tail[name] = data.reshape(-1)
            elif name == "tempered_lse":
                positions.update({f"tempered_lse_{j}": data[:, j] for j in range(data.shape[1])})
            elif name != "offsets":
                positions[name] = data
        files = {
            "examples.parquet": _table_bytes({"offsets": columns["offsets"]}),
            "positions.parquet": _table_bytes(positions),
            "entries.parquet": _table_bytes(entries),
        }
        if tail:
            files["tail.parquet"] = _table_bytes(tail)
        if table:
            files["ids.parquet"] = _table_bytes(table)
        return files

    def deserialize(self, files: dict[str, bytes], shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
        rows = {"examples": None, "positions": None, "entries": None, "tail": None}
        if shapes:
            rows = {"examples": shapes["offsets"][0], "positions": shapes["tail_logprob"][0],
                    "entries": int(np.prod(shapes["ids_delta"])), "tail": int(np.prod(shapes["tail_ids_delta"]))}
        columns = _table_columns(files["examples.parquet"], rows["examples"])
        positions = _table_columns(files["positions.parquet"], rows["positions"])
        lse = [positions.pop(f"tempered_lse_{j}") for j in range(len(positions)) if f"tempered_lse_{j}" in positions]
        if lse:
            columns["tempered_lse"] = np.stack(lse, axis=1)
        columns.update(positions)
        columns.update(_table_columns(files["entries.parquet"], rows["entries"]))  # flat; the decoder reshapes to (P, K)
        if "tail.parquet" in files:
            columns.update(_table_columns(files["tail.parquet"], rows["tail"]))  # flat: (P, M) once reshaped
        if "ids.parquet" in files:
            columns.update(_table_columns(files["ids.parquet"]))  # (D,): its length is the shard's own
        return columns

    def array_bytes(self, sizes: dict[str, int], open_file) -> dict[str, int]:
        out: dict[str, int] = {}
        for rel, size in sizes.items():  # each column chunk's compressed size, from the file's footer alone
            with open_file(rel) as f:
                meta = pq.ParquetFile(f).metadata
                for g in range(meta.num_row_groups):
                    for c in range(meta.num_columns):
                        chunk = meta.row_group(g).column(c)
                        name = chunk.path_in_schema
                        name = "tempered_lse" if name.startswith("tempered_lse_") else name  # one array, as in zarr
                        out[name] = out.get(name, 0) + chunk.total_compressed_size
                        size -= chunk.total_compressed_size
            out["metadata"] = out.get("metadata", 0) + size  # magic bytes and footer
        return out
