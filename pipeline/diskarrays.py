"""Arrays kept in anonymous temporary files, so that a dataset's memory does not grow with it.

Loading writes token ids, position masks, position ids and features here in bounded batches
(``ArrayWriter``); an ``ExampleSet`` then reads each item's slice back (``DiskArray``). The
files are made with ``tempfile.TemporaryFile``: on Linux they have no name at all (or are
unlinked at once), so the operating system removes them when the last process holding them
ends, however it ends. They live under ``$TMPDIR`` (default ``/tmp``): point TMPDIR at a disk
with room for 4 to 9 bytes a token when ``/tmp`` is small or in memory (tmpfs).

Slices are read with ``os.pread``, not through a memory map: pages of a map a process has
read count towards its resident set until the kernel needs them back, while the page cache
behind ``pread`` does not, so a training run that reads every example once still holds only
the batch it is reading. ``pread`` takes no file position, so DataLoader workers forked from
the process share the descriptor safely.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterator

import numpy as np

__all__ = ["DiskArray", "ArrayWriter", "as_numpy", "CHUNK_BYTES"]

CHUNK_BYTES = 1 << 20
"""Bytes read or converted at a time when a whole array is walked (fingerprint, casts)."""


class DiskArray:
    """A read-only array of ``shape`` (rows, ...) and ``dtype`` in a temporary file.

    ``a[i]`` and ``a[start:stop]`` (rows; step 1) return new numpy arrays read from the file;
    ``len(a)`` is the number of rows. ``chunks()`` walks it in bounded pieces.
    """

    def __init__(self, file, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0):
        self._file, self.dtype, self.shape, self._offset = file, np.dtype(dtype), tuple(shape), offset
        self._row = int(np.prod(self.shape[1:], dtype=np.int64))  # items per row

    @property
    def fileno(self) -> int:
        """The descriptor of the file behind the array (tests check that it is one)."""
        return self._file.fileno()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("DiskArray slices take no step")
            stop = max(start, stop)
            return self._read(start, stop).reshape((stop - start, *self.shape[1:]))
        i = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"row {key} out of range for {len(self)} rows")
        return self._read(i, i + 1).reshape(self.shape[1:])

    def _read(self, start: int, stop: int) -> np.ndarray:
        size = self.dtype.itemsize * self._row
        want = (stop - start) * size
        buf = bytearray(want)
        view, done = memoryview(buf), 0
        while done < want:  # pread may return less than asked
            got = os.preadv(self.fileno, [view[done:]], self._offset + start * size + done)
            if got <= 0:
                raise OSError(f"temporary data file ended early ({done} of {want} bytes)")
            done += got
        return np.frombuffer(buf, self.dtype)

    def head(self, rows: int) -> "DiskArray":
        """The first ``rows`` rows, sharing the file."""
        return DiskArray(self._file, self.dtype, (min(rows, len(self)), *self.shape[1:]), self._offset)

    def chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """Consecutive row blocks of at most ``max_bytes`` (at least one row), in order."""
        step = max(1, max_bytes // max(1, self.dtype.itemsize * self._row))
        for start in range(0, len(self), step):
            yield self[start:start + step]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[:]
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"DiskArray(shape={self.shape}, dtype={self.dtype})"

    def __reduce__(self):
        # forked workers (Linux) share the file and never pickle it; a spawned process (macOS,
        # Windows) cannot open a file without a name, so it gets the values, in a file of its own
        return _from_array, (np.asarray(self),)


def _from_array(a: np.ndarray) -> DiskArray:
    writer = ArrayWriter(a.dtype, a.shape[1:])
    writer.append(a)
    return writer.finish()


class ArrayWriter:
    """Appends row blocks of one dtype to a new temporary file; ``finish()`` -> a DiskArray.

    ``dtype`` is what the file holds: appended blocks are cast to it, and a block whose values
    the cast would change raises ValueError (``check`` False skips that test, for casts that
    cannot lose anything, like bool).
    """

    def __init__(self, dtype: np.dtype, row_shape: tuple[int, ...] = (), check: bool = True):
        self.dtype, self.row_shape, self._check = np.dtype(dtype), tuple(row_shape), check
        self._file = tempfile.TemporaryFile(prefix="distill-data-")
        self._rows = 0

    def append(self, block) -> None:
        """Rows (n, *row_shape), any dtype whose values fit ``dtype``."""
        block = np.asarray(block)
        out = np.ascontiguousarray(block, self.dtype)
        if self._check and out.dtype != block.dtype and len(block) and not np.array_equal(out, block):
            if not (self.dtype.kind in "iu" and block.dtype.kind in "iu"):
                raise ValueError(f"values do not fit {self.dtype}")
            self._widen(np.promote_types(self.dtype, block.dtype))
            out = np.ascontiguousarray(block, self.dtype)
        self._file.write(memoryview(out.reshape(-1).view(np.uint8)))
        self._rows += len(block)

    def _widen(self, dtype: np.dtype) -> None:
        """Rewrite what was written as ``dtype``: integers wider than the file's (rare: ids past 2**31)."""
        old = self.finish()
        self.dtype, self._file = np.dtype(dtype), tempfile.TemporaryFile(prefix="distill-data-")
        for block in old.chunks():
            self._file.write(memoryview(np.ascontiguousarray(block, self.dtype).reshape(-1).view(np.uint8)))

    def finish(self) -> DiskArray:
        self._file.flush()
        return DiskArray(self._file, self.dtype, (self._rows, *self.row_shape))


def as_numpy(a, dtype=None) -> np.ndarray:
    """A DiskArray, numpy array or tensor as a numpy array (read whole: for small arrays)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a) if dtype is None else np.asarray(a, dtype)
