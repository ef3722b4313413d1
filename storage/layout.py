"""Where a store's files live, and reading and writing its manifest and commit records.

    manifest.json                    the Manifest (spec, tool version, shard table once finalized)
    shards/<index:06d>/...           a shard's data files, as its backend names them
    shards/<index:06d>.commit.json   the shard's commit record: it exists once the shard is complete
    shards/<index:06d>.lock          held (flock) by the process writing the shard

The reader and the writer both go through this module, so the layout is written once.
"""

from __future__ import annotations

import zlib

from distill.errors import CorruptStoreError, StoreError
from distill.storage.fs import StoreFS
from distill.storage.manifest import Manifest, ShardRecord, StoreSpec, dumps_checked, loads_checked

__all__ = ["MANIFEST", "SHARDS", "REDO", "shard_dir", "commit_name", "commit_index", "commit_path", "lock_path",
           "commit_names", "load_manifest", "write_manifest", "read_commit_record", "read_commit_records",
           "write_commit_record", "remove_commit_record", "write_shard_files", "read_shard_files"]

MANIFEST = "manifest.json"
SHARDS = "shards"
COMMIT_SUFFIX = ".commit.json"
REDO = "rerun generate-labels with --repair to redo it"


def shard_dir(index: int) -> str:
    """The directory of shard ``index``'s data files, relative to the store root."""
    return f"{SHARDS}/{index:06d}"


def commit_name(index: int) -> str:
    """The file name (under ``shards/``) of shard ``index``'s commit record; ``commit_index`` inverts it."""
    return f"{index:06d}{COMMIT_SUFFIX}"


def commit_index(name: str) -> int:
    """The shard a commit record's file name stands for, or -1 when the name holds no index."""
    stem = name.split(".")[0]
    return int(stem) if stem.isdigit() else -1


def commit_path(index: int) -> str:
    return _in_shards(commit_name(index))


def lock_path(index: int) -> str:
    return f"{SHARDS}/{index:06d}.lock"


def commit_names(sfs: StoreFS) -> list[str]:
    """File names of the commit records under ``shards/``, valid or not, sorted."""
    return [name for name in sfs.listdir(SHARDS) if name.endswith(COMMIT_SUFFIX)]


def load_manifest(sfs: StoreFS) -> Manifest:
    """The store's manifest; a missing one raises StoreError, a damaged one CorruptStoreError."""
    try:
        data = sfs.read(MANIFEST)
    except FileNotFoundError:
        raise StoreError(f"{sfs.url} has no manifest.json: it is not a distill store (or was never created)") from None
    return Manifest.from_bytes(data)


def write_manifest(sfs: StoreFS, manifest: Manifest) -> None:
    """Replace manifest.json atomically (equal manifests give equal bytes, so racing workers agree)."""
    sfs.write(MANIFEST, manifest.to_bytes())


def read_commit_record(sfs: StoreFS, spec: StoreSpec, name: str) -> ShardRecord:
    """The record in ``shards/<name>``, checked against the shard plan; damage raises CorruptStoreError.

    A missing file raises FileNotFoundError.
    """
    index = commit_index(name)
    what = f"commit record of shard {index}" if index >= 0 else f"commit record {name}"
    record = ShardRecord.from_json(loads_checked(sfs.read(_in_shards(name)), what, index, fix=REDO), index)
    if record.index != index or not 0 <= index < spec.num_shards:
        raise CorruptStoreError(f"commit record {name} names shard {record.index}; remove it and rerun", index)
    if (record.example_start, record.example_stop) != spec.shard_range(index):
        raise CorruptStoreError(f"commit record of shard {index} holds examples {record.example_start}.."
                                f"{record.example_stop}, not the shard's {spec.shard_range(index)}; {REDO}", index)
    return record


def read_commit_records(sfs: StoreFS, spec: StoreSpec, damaged: dict | None = None) -> dict[int, ShardRecord]:
    """Valid commit records found under ``shards/``, {index: record}; damaged ones raise CorruptStoreError.

    With a ``damaged`` dict, damaged records are collected there ({index: message}) instead.
    """
    records = {}
    for name in commit_names(sfs):
        try:
            record = read_commit_record(sfs, spec, name)
        except CorruptStoreError as e:
            if damaged is None:
                raise
            damaged[e.shard] = str(e)
            continue
        except FileNotFoundError:  # removed by a writer redoing the shard while we listed
            continue
        records[record.index] = record
    return records


def write_commit_record(sfs: StoreFS, record: ShardRecord) -> None:
    """Mark shard ``record.index`` complete: write its commit record atomically (its files must be durable)."""
    sfs.write(commit_path(record.index), dumps_checked(record.to_json()))


def remove_commit_record(sfs: StoreFS, name: str) -> None:
    """Remove the commit record called ``name`` (its shard is pending again); missing is fine."""
    sfs.remove(_in_shards(name))


def _in_shards(name: str) -> str:
    return f"{SHARDS}/{name}"


def write_shard_files(sfs: StoreFS, index: int, files: dict[str, bytes]) -> dict[str, dict]:
    """Write shard ``index``'s files durably; returns their table for the commit record ({rel: {bytes, crc32}}).

    The files are written in place, not atomically: nothing reads them until the commit
    record, written after this returns, vouches for them.
    """
    table = {}
    for rel, data in sorted(files.items()):
        sfs.write(f"{shard_dir(index)}/{rel}", data, atomic=False)
        table[rel] = {"bytes": len(data), "crc32": _crc32(data)}
    sfs.sync_dirs([f"{shard_dir(index)}/{rel}" for rel in files])
    return table


def _crc32(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def read_shard_files(sfs: StoreFS, record: ShardRecord) -> dict[str, bytes]:
    """Exactly the files ``record`` lists, {relative path: bytes}, each checked against its size and CRC-32."""
    index, files = record.index, {}
    for rel, meta in record.files.items():
        try:
            data = sfs.read(f"{shard_dir(index)}/{rel}")
        except FileNotFoundError:
            raise CorruptStoreError(f"shard {index} is missing its file {rel}; regenerate the shard "
                                    f"({REDO})", index) from None
        if len(data) != meta["bytes"] or _crc32(data) != meta["crc32"]:
            raise CorruptStoreError(f"shard {index} is damaged: {rel} fails its checksum; regenerate the shard "
                                    f"({REDO})", index)
        files[rel] = data
    return files
