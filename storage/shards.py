"""One shard's labels <-> the bytes of its files, given only the store's manifest.

The writer and the reader go through these functions, so a program that reads or writes a
shard's files itself (another filesystem, a message queue, a test) gets the store's own
bytes and labels without passing k, the value encoding or the temperatures by hand:

    files = encode_shard(labels, manifest)        # {"zarr.json": b"...", "ids_delta/c/0/0": b"...", ...}
    labels = decode_shard(files, manifest, shard=3)

``files`` are exactly what ``shards/<index:06d>/`` of a store holds (paths relative to it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from distill.errors import StoreError
from distill.storage.backend import get_backend
from distill.storage.codecs import decode_labels, encode_labels
from distill.storage.labels import SoftLabels
from distill.storage.manifest import Manifest, ShardRecord, StoreSpec

__all__ = ["encode_shard", "decode_shard", "check_labels", "shard_shapes", "array_bytes"]


def _spec(manifest: Manifest | StoreSpec) -> StoreSpec:
    if isinstance(manifest, Manifest):
        return manifest.spec
    if isinstance(manifest, StoreSpec):
        return manifest
    raise TypeError(f"expected a Manifest or StoreSpec (e.g. open_store(url).manifest), got {type(manifest).__name__}")


def encode_shard(labels: SoftLabels, manifest: Manifest | StoreSpec, where: str = "labels") -> dict[str, bytes]:
    """The files of a shard holding ``labels``, as the store ``manifest`` describes them.

    labels: P positions of any number of examples, shaped as the store wants (k slots,
        its stored temperatures, counts / token_index / tail draws exactly when it has them;
        labels that differ raise StoreError naming the difference, its message starting with ``where``).
    Returns {path relative to the shard's directory: bytes}, in the store's backend and
    encodings: the bytes ``StoreWriter.write_shard`` writes for the same labels.
    """
    spec = _spec(manifest)
    check_labels(labels, spec, where)
    columns = encode_labels(labels, spec.vocab_size, spec.value_encoding, spec.id_coding)
    return get_backend(spec.backend).serialize(columns)


def decode_shard(files: dict[str, bytes], manifest: Manifest | StoreSpec, shard: int = 0,
                 record: ShardRecord | None = None) -> SoftLabels:
    """The labels that ``files`` (as ``encode_shard`` returns them) hold.

    shard: the shard's index, which sets ``example_start`` (from the store's shard plan).
    record: its commit record (default: the manifest's entry for it, once finalized); where
        known, every array must have the shape it implies, checked before anything of that
        size is allocated. Files not as the backend writes them raise ValueError (or the
        backend's own error). Returns torch tensors, ids ascending within a position.
    """
    spec = _spec(manifest)
    if not 0 <= shard < spec.num_shards:
        raise StoreError(f"shard {shard} does not exist: the store has shards 0..{spec.num_shards - 1}")
    if record is None and isinstance(manifest, Manifest):
        record = next((r for r in manifest.shards if r.index == shard), None)
    shapes = None if record is None else shard_shapes(spec, record)
    columns = get_backend(spec.backend).deserialize(files, shapes)
    return decode_labels(columns, spec.k, spec.value_encoding, spec.stored_temperatures, spec.shard_range(shard)[0],
                         spec.tail_samples)


def check_labels(labels: SoftLabels, spec: StoreSpec, where: str = "labels") -> None:
    """Raise StoreError (its message starting with ``where``) unless ``labels`` fit a store of ``spec``."""
    if labels.num_positions and labels.k != spec.k:
        raise StoreError(f"{where}: labels have {labels.k} slots per position, the store {spec.k}")
    if int(labels.offsets[-1]) != labels.num_positions or bool((labels.offsets[1:] < labels.offsets[:-1]).any()):
        raise StoreError(f"{where}: offsets do not describe {labels.num_positions} positions")
    if labels.num_positions:
        ids = labels.topk_ids
        if int(ids.min()) < 0 or int(ids.max()) >= spec.vocab_size:
            raise StoreError(f"{where}: ids outside the vocabulary [0, {spec.vocab_size})")
    if tuple(labels.temperatures) != spec.stored_temperatures:
        raise StoreError(f"{where}: labels carry normalisers for {labels.temperatures}, the store wants {spec.stored_temperatures}")
    if (labels.counts is None) != (spec.method != "sample"):
        raise StoreError(f"{where}: draw counts are required for method 'sample' and only for it")
    if (labels.token_index is None) == spec.has_token_index:
        raise StoreError(f"{where}: token_index is {'required' if spec.has_token_index else 'not expected'} by this store")
    if labels.tail_samples != spec.tail_samples or (labels.tail_ids is None) != (labels.tail_counts is None):
        raise StoreError(f"{where}: labels have {labels.tail_samples} tail draws per position, the store "
                         f"{spec.tail_samples}")
    if spec.tail_samples and labels.num_positions:
        counted = labels.tail_ids[labels.tail_counts > 0]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= spec.vocab_size):
            raise StoreError(f"{where}: tail draws outside the vocabulary [0, {spec.vocab_size})")


def shard_shapes(spec: StoreSpec, record: ShardRecord) -> dict[str, tuple[int, ...]]:
    """The shape every array of the shard must have, from its record (bounds what decoding allocates)."""
    p, k, m = record.positions, spec.k, spec.tail_samples
    shapes = {"offsets": (record.example_stop - record.example_start + 1,), "ids_delta": (p, k), "ranks_delta": (p, k),
              "tail_logprob": (p,), "logprobs": (p, k), "logprob_codes": (p, k), "counts": (p, k), "token_index": (p,),
              "tail_ids_delta": (p, m), "tail_counts": (p, m)}
    if spec.stored_temperatures:
        shapes["tempered_lse"] = (p, len(spec.stored_temperatures))
    return shapes


def array_bytes(spec: StoreSpec, record: ShardRecord, open_file: Callable[[str], BinaryIO]) -> dict[str, int]:
    """Bytes on disk of each array (docs/FORMAT.md's names) in one shard, plus ``"metadata"`` for the rest.

    ``open_file(path)`` opens one of the shard's files (binary, seekable) for a backend
    whose files hold several arrays (Parquet: only its footer is read). The values sum to
    ``record.payload_bytes``.
    """
    return get_backend(spec.backend).array_bytes({rel: meta["bytes"] for rel, meta in record.files.items()}, open_file)
