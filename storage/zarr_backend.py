"""Zarr v3 backend: each shard is a zarr group, one single-chunk array per column.

Every shard has its own arrays and files, so writers of different shards never touch the
same file or chunk, and no write ever read-modify-writes another shard's data.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from distill.storage.backend import Backend

__all__ = ["ZarrBackend"]


def _compressor(dtype: np.dtype):
    if dtype.itemsize == 1:
        return ZstdCodec(level=5)
    # Byte-shuffle first: gaps and codes put their entropy in the low bytes, zeros above.
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=dtype.itemsize)


class ZarrBackend(Backend):
    name = "zarr"

    def serialize(self, columns: dict[str, np.ndarray]) -> dict[str, bytes]:
        files: dict = {}
        group = zarr.open_group(MemoryStore(files), mode="w", zarr_format=3)
        for name, data in columns.items():
            chunks = tuple(max(1, s) for s in data.shape)
            arr = group.create_array(
                name, shape=data.shape, chunks=chunks, dtype=data.dtype, compressors=[_compressor(data.dtype)],
                fill_value=0,
            )
            if data.size:
                arr[...] = data
        return {key: buf.to_bytes() for key, buf in files.items()}

    def deserialize(self, files: dict[str, bytes]) -> dict[str, np.ndarray]:
        prototype = default_buffer_prototype()
        store = MemoryStore({key: prototype.buffer.from_bytes(data) for key, data in files.items()})
        group = zarr.open_group(store, mode="r", zarr_format=3)
        names = sorted(key[: -len("/zarr.json")] for key in files if key.endswith("/zarr.json"))
        return {name: group[name][...] for name in names}
