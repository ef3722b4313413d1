"""Zarr v3 backend: each shard is a zarr group, one single-chunk array per column.

Every shard has its own arrays and files, so writers of different shards never touch the
same file or chunk, and no write ever read-modify-writes another shard's data.
"""

from __future__ import annotations

import functools
import json
import math

import numcodecs
import numpy as np

from distill.storage.backend import Backend

__all__ = ["ZarrBackend"]

DTYPES = ("uint8", "uint16", "uint32", "int32", "int64", "float16", "float32")  # what the codecs write


def _compressor(name: str, dtype: np.dtype) -> dict:
    """The zarr v3 compressor codec of a column, as its metadata JSON."""
    if dtype.itemsize == 1:  # codes and counts: zstd's entropy stage on bytes is what they need
        return {"name": "zstd", "configuration": {"level": 1, "checksum": False}}
    # gaps: low bits near-uniform, high bits mostly zero; bit planes split them. Floats: byte planes.
    shuffle = "bitshuffle" if name in ("ids_delta", "ranks_delta") else "shuffle"
    return {"name": "blosc", "configuration": {"typesize": dtype.itemsize, "cname": "zstd", "clevel": 5,
                                               "shuffle": shuffle, "blocksize": 0}}


def _encode_chunk(data: np.ndarray, codec: dict) -> bytes:
    array = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))  # the bytes codec: little-endian, C order
    config = codec["configuration"]
    if codec["name"] == "zstd":
        return numcodecs.Zstd(level=config["level"]).encode(array)
    shuffle = {"shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[config["shuffle"]]
    return numcodecs.Blosc(cname=config["cname"], clevel=config["clevel"], shuffle=shuffle).encode(array)  # typesize from dtype


def _array_metadata(data: np.ndarray, codec: dict) -> bytes:
    bytes_codec = {"name": "bytes"} if data.dtype.itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}
    meta = {
        "shape": list(data.shape),
        "data_type": data.dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, n) for n in data.shape]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [bytes_codec, codec],
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }
    return json.dumps(meta, indent=2).encode()


def _chunk_key(name: str, ndim: int) -> str:
    return f"{name}/c/" + "/".join("0" for _ in range(ndim))  # the single chunk, default key encoding


class ZarrBackend(Backend):
    name = "zarr"

    def serialize(self, columns: dict[str, np.ndarray]) -> dict[str, bytes]:
        # Written directly (the layout zarr itself writes for these arrays, checked by the
        # plain-zarr tests): zarr's async write path costs more than the compression.
        files = {"zarr.json": json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}, indent=2).encode()}
        for name, data in columns.items():
            codec = _compressor(name, data.dtype)
            files[f"{name}/zarr.json"] = _array_metadata(data, codec)
            if data.size:
                files[_chunk_key(name, data.ndim)] = _encode_chunk(data, codec)
        return files

    def deserialize(self, files: dict[str, bytes], shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
        names = sorted(key[: -len("/zarr.json")] for key in files if key.endswith("/zarr.json"))
        return {name: _decode_single_chunk(name, files, (shapes or {}).get(name)) for name in names}

    def array_bytes(self, sizes: dict[str, int], open_file=None) -> dict[str, int]:
        out: dict[str, int] = {}
        for rel, size in sizes.items():  # "<name>/c/0..." is the array's chunk; every zarr.json is metadata
            name = "metadata" if rel.endswith("zarr.json") else rel.split("/")[0]
            out[name] = out.get(name, 0) + size
        return out


def _decode_single_chunk(name: str, files: dict[str, bytes], expected: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode an array as ``serialize`` writes it, without zarr's async machinery (3x faster).

    Anything else (another chunking, codec or byte order, or a shape other than
    ``expected``) raises ValueError; the reader reports it as a shard that cannot be decoded.
    """
    shape, problem, dtype, grid, codec = _layout(name, files[f"{name}/zarr.json"])
    if expected is not None and shape != tuple(expected):
        raise ValueError(f"array {name} has shape {list(shape)[:4]}, the commit record implies {list(expected)}")
    if problem:
        raise ValueError(problem)
    key = _chunk_key(name, len(shape))
    if key not in files:  # zarr itself writes no chunk that is all fill value
        return np.zeros(shape, dtype)
    out = np.zeros(math.prod(grid), dtype)  # a frame that claims to be larger is refused, not allocated
    chunk = np.frombuffer(_DECODERS[codec].decode(files[key], out=out), dtype).reshape(grid)
    return chunk[tuple(slice(0, n) for n in shape)]


# frames describe themselves (typesize, shuffle, level): one decoder of each kind serves every array
_DECODERS = {"blosc": numcodecs.Blosc(), "zstd": numcodecs.Zstd()}


@functools.lru_cache(maxsize=1024)
def _layout(name: str, raw: bytes) -> tuple[tuple[int, ...], str | None, np.dtype | None, tuple[int, ...], str]:
    """(shape, what is wrong with the layout or None, dtype, chunk shape, codec name) of an array's zarr.json.

    Cached by the metadata's bytes: every shard of a store repeats the same few, and parsing and
    checking them took as long as decoding a small shard's chunks.
    """
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError(f"array {name}: zarr.json is not an object")
    shape = tuple(meta.get("shape", ()))
    codecs = meta.get("codecs", [])
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    if (
        not all(type(n) is int and n >= 0 for n in shape)
        or meta.get("zarr_format") != 3 or len(codecs) != 2 or codecs[0].get("name") != "bytes"
        or codecs[0].get("configuration", {}).get("endian", "little") != "little"
        or grid != [max(1, n) for n in shape] or meta.get("fill_value") != 0
        or meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator") != "/"
        or codecs[1].get("name") not in ("blosc", "zstd")
    ):
        return shape, f"array {name} is not laid out as distill writes it", None, (), ""
    if meta.get("data_type") not in DTYPES:
        return shape, f"array {name} has data type {str(meta.get('data_type'))[:20]!r}, not one distill writes", None, (), ""
    return shape, None, np.dtype(meta["data_type"]).newbyteorder("<"), tuple(grid), codecs[1]["name"]
