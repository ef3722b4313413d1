"""Tables read a batch of rows at a time: Parquet files and `datasets` Arrow files, never whole.

A ``LazyTable`` offers what ``distill.pipeline.tables.table_arrays`` reads of a
``pyarrow.Table`` (``column_names``, ``schema``, ``num_rows``, ``column``, ``slice``) and
``batches(rows)``, which decodes one batch of rows at a time, so that loading holds one
batch, not the file. Parquet is decoded per batch (``ParquetFile.iter_batches``); `datasets`
Arrow stream files are read through an ordinary file, not memory-mapped: pages of a map the
process has read stay in its resident set until the map is closed, and that would grow with
the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["LazyTable", "lazy_parquet", "lazy_arrow_streams", "row_batches", "ROWS_PER_BATCH"]

ROWS_PER_BATCH = 1024
"""Rows converted at a time: what loading holds besides the table is about one batch's tokens."""


class LazyTable:
    """Rows ``start`` .. ``stop`` of the record batches that ``sources`` yield in order: one
    callable per file, ``source(rows, columns)`` -> RecordBatches of ``schema`` (or of its
    ``columns`` when not None) of at most ``rows`` rows."""

    def __init__(self, sources: list[Callable[[int, list[str] | None], Iterator[pa.RecordBatch]]], schema: pa.Schema, total: int,
                 start: int = 0, stop: int | None = None):
        self._sources, self.schema, self._total = sources, schema, total
        self._start, self._stop = start, total if stop is None else min(stop, total)

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    @property
    def num_rows(self) -> int:
        return max(0, self._stop - self._start)

    def slice(self, offset: int = 0, length: int | None = None) -> "LazyTable":
        start = self._start + offset
        stop = self._stop if length is None else min(self._stop, start + length)
        return LazyTable(self._sources, self.schema, self._total, start, stop)

    def column(self, name: str) -> pa.ChunkedArray:
        """One column whole (for small ones: class labels)."""
        chunks = [part.column(name) for _, part in self.batches(1 << 16, columns=[name])]
        return pa.chunked_array([c for chunked in chunks for c in chunked.chunks], self.schema.field(name).type)

    def batches(self, rows: int, columns: list[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
        """(first row, table of at most ``rows`` rows) over the rows, in order."""
        seen = 0  # rows of the sources before the current batch
        for source in self._sources:
            for batch in source(rows, columns):
                n = batch.num_rows
                lo, hi = max(self._start - seen, 0), min(self._stop - seen, n)
                if lo < hi:
                    yield seen + lo - self._start, pa.Table.from_batches([batch.slice(lo, hi - lo)])
                seen += n
                if seen >= self._stop:
                    return


def lazy_parquet(files: list[Path]) -> LazyTable | None:
    """Parquet files of one schema as a LazyTable; None when their schemas differ (read them whole).
    Raises what ``pq.ParquetFile`` raises for a file that is not Parquet."""
    opened = [pq.ParquetFile(f) for f in files]
    schema = opened[0].schema_arrow
    if any(not f.schema_arrow.equals(schema) for f in opened[1:]):
        return None

    def source(path: Path) -> Callable[[int, list[str] | None], Iterator[pa.RecordBatch]]:
        # buffered reads: else a row group's whole column chunk is read into memory first
        return lambda rows, columns: pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False).iter_batches(
            batch_size=rows, columns=columns)

    return LazyTable([source(f) for f in files], schema, sum(f.metadata.num_rows for f in opened))


def lazy_arrow_streams(files: list[Path]) -> LazyTable | None:
    """Arrow IPC stream files (a `datasets` save_to_disk Dataset's) of one schema as a LazyTable;
    None when their schemas differ. Counting the rows maps the files but reads only their headers."""
    schemas, total = [], 0
    for f in files:
        with pa.memory_map(str(f)) as m:
            reader = pa.ipc.open_stream(m)
            schemas.append(reader.schema)
            total += sum(b.num_rows for b in reader)  # zero-copy batches: the data pages are never read
    if any(not s.equals(schemas[0]) for s in schemas[1:]):
        return None

    def source(path: Path) -> Callable[[int, list[str] | None], Iterator[pa.RecordBatch]]:
        def read(rows: int, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
            with pa.OSFile(str(path)) as f:
                for batch in pa.ipc.open_stream(f):
                    batch = batch if columns is None else batch.select(columns)
                    for start in range(0, batch.num_rows, rows):
                        yield batch.slice(start, rows)
        return read

    return LazyTable([source(f) for f in files], schemas[0], total)


def row_batches(table: pa.Table | LazyTable) -> Iterator[tuple[int, pa.Table]]:
    """(first row, table of at most ROWS_PER_BATCH rows) over ``table``: slices of a pa.Table,
    or a LazyTable's batches, each read when reached."""
    if isinstance(table, LazyTable):
        yield from table.batches(ROWS_PER_BATCH)
        return
    for row in range(0, table.num_rows, ROWS_PER_BATCH):
        yield row, table.slice(row, ROWS_PER_BATCH)
