"""The backend interface: a shard's named arrays <-> the bytes of its files.

Backends never touch a filesystem; the writer and reader do the I/O, the checksums and
the atomic commit, so both backends get the same guarantees from the same code.
"""

from __future__ import annotations

import abc

import numpy as np

__all__ = ["Backend", "get_backend", "BACKENDS"]

# Arrays with one value per position (the rest, but "offsets", have one per slot: (P, K)).
POSITION_COLUMNS = ("tail_logprob", "tempered_lse", "token_index")
ENTRY_COLUMNS = ("ids_delta", "ranks_delta", "logprobs", "logprob_codes", "counts")
TAIL_COLUMNS = ("tail_ids_delta", "tail_counts")  # one per tail draw slot: (P, M)
TABLE_COLUMNS = ("id_order",)  # one per distinct id of the shard: (D,), id coding "rank"


class Backend(abc.ABC):
    """Serialises one shard's arrays (names and shapes as in docs/FORMAT.md)."""

    name: str

    @abc.abstractmethod
    def serialize(self, columns: dict[str, np.ndarray]) -> dict[str, bytes]:
        """Files of one shard, as {path relative to the shard directory: bytes}."""

    @abc.abstractmethod
    def deserialize(self, files: dict[str, bytes], shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
        """The arrays back from the files that ``serialize`` wrote.

        ``shapes``: the shape each array must have (from the commit record); files that
        say otherwise raise ValueError before anything of that size is allocated.
        """

    @abc.abstractmethod
    def array_bytes(self, sizes: dict[str, int], open_file) -> dict[str, int]:
        """{array name: bytes on disk} of one shard, ``"metadata"`` for what belongs to no one array.

        sizes: the shard's files {path: bytes}; ``open_file(path)`` opens one (binary,
        seekable) where the sizes alone do not tell the arrays apart. The values sum to the
        files' bytes.
        """


def _zarr() -> Backend:
    from distill.storage.zarr_backend import ZarrBackend  # here: the backends import this module

    return ZarrBackend()


def _parquet() -> Backend:
    from distill.storage.parquet_backend import ParquetBackend  # here: pyarrow is slow to load

    return ParquetBackend()


_REGISTRY = {"zarr": _zarr, "parquet": _parquet}
BACKENDS = tuple(_REGISTRY)  # the names a StoreSpec's backend may take, default first


def get_backend(name: str) -> Backend:
    """A new instance of the backend called ``name`` (one of BACKENDS); others raise ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    return _REGISTRY[name]()
