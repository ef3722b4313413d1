"""How many syncs a shard costs on a local disk, and that they all come before its commit record.

Each fsync costs a journal commit or a device cache flush (~3 ms on a virtual disk), so a
small shard's write time is its number of syncs: these counts catch a regression.
"""

import ctypes
import errno
import os

import pytest
from storehelp import K, V, make_labels, write_store

from distill.errors import WriteError
from distill.storage import StoreSpec, create_store, open_store
from distill.storage import fs as store_fs

N, PER_SHARD = 10, 5  # two shards


def _record(monkeypatch, syncfs_result=0, grouped=True):
    """Patch os.fsync and syncfs to log ("fsync" | "syncfs", path of the fd) and run the real fsync.

    ``grouped``: syncfs is there and covers tmp_path's filesystem; else there is none.
    """
    events, real_fsync = [], os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def syncfs(fd):
        events.append(("syncfs", os.readlink(f"/proc/self/fd/{fd}")))
        ctypes.set_errno(errno.EIO)
        return syncfs_result

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store_fs, "SYNCFS", syncfs if grouped else None)
    if grouped:
        monkeypatch.setattr(store_fs, "syncfs_covers", lambda path: True)  # whatever filesystem tmp_path is on
    return events


def _shard_tree(root, index):
    """(files, directories) under a shard's directory, the directory itself included."""
    shard = os.path.join(root, "shards", f"{index:06d}")
    files, dirs = [], []
    for dirpath, _, names in os.walk(shard):
        dirs.append(dirpath)
        files += [os.path.join(dirpath, n) for n in names]
    return files, dirs


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_a_shard_costs_one_syncfs_then_two_fsyncs_for_its_commit_record(backend, tmp_path, monkeypatch):
    root = str(tmp_path / "s")
    events = _record(monkeypatch)
    write_store(root, make_labels("topk", n_examples=N), backend=backend, per_shard=PER_SHARD, finalize=False)
    shards = os.path.join(root, "shards")
    for index in range(N // PER_SHARD):
        commit = os.path.join(shards, f"{index:06d}.commit.json")
        at = next(i for i, (_, p) in enumerate(events) if p.startswith(commit + ".tmp-"))
        # the shard's data, its directories included, are synced in one call just before the record
        assert events[at - 1] == ("syncfs", os.path.join(shards, f"{index:06d}"))
        assert events[at + 1] == ("fsync", shards)  # the record's rename
    per_shard = [e for e in events if "manifest.json" not in e[1] and e[1] != root]
    assert len(per_shard) == 3 * (N // PER_SHARD), per_shard
    assert open_store(root).complete_shards() == [0, 1]


def test_file_by_file_every_file_and_directory_is_fsynced_once(tmp_path, monkeypatch):
    root = str(tmp_path / "s")
    events = _record(monkeypatch, grouped=False)  # no syncfs (not Linux >= 5.8, or NFS): the fallback
    write_store(root, make_labels("topk", n_examples=N), per_shard=PER_SHARD, finalize=False)
    files, dirs = _shard_tree(root, 1)
    commit = os.path.join(root, "shards", "000001.commit.json")
    start = next(i for i, (_, p) in enumerate(events) if p.startswith(os.path.join(root, "shards", "000001")))
    stop = next(i for i, (_, p) in enumerate(events) if p.startswith(commit + ".tmp-"))
    synced = [p for _, p in events[start:stop]]
    # each file and directory once, plus shards/ (it gained the shard's directory) and the store root
    assert sorted(synced) == sorted(files + dirs + [os.path.join(root, "shards"), root])
    assert len(events) - stop == 2  # the record and its directory


def test_a_shard_on_another_filesystem_than_the_root_is_synced_file_by_file(tmp_path, monkeypatch):
    root = str(tmp_path / "s")
    events = _record(monkeypatch)
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=N, examples_per_shard=PER_SHARD, temperatures=(1.0, 2.0, 4.0),
                     value_encoding="lossless")
    writer = create_store(root, spec)
    writer.sfs.sync_dev = -2  # the root's device differs from the shard's (shards/ is a symlink to another disk)
    labels = make_labels("topk", n_examples=N)
    writer.write_shard(0, labels.examples(0, PER_SHARD))
    files, dirs = _shard_tree(root, 0)
    synced = {p for kind, p in events if kind == "fsync"}
    assert not any(kind == "syncfs" for kind, _ in events)
    assert set(files + dirs) <= synced


def test_a_failed_syncfs_is_one_line_and_leaves_the_shard_pending(tmp_path, monkeypatch):
    root = str(tmp_path / "s")
    _record(monkeypatch, syncfs_result=-1)
    with pytest.raises(WriteError, match=r"cannot write shards/000000 in the store .* \(syncing it\)") as e:
        write_store(root, make_labels("topk", n_examples=N), per_shard=PER_SHARD, finalize=False)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert open_store(root).complete_shards() == []


def test_distill_syncfs_0_keeps_the_file_by_file_syncs(tmp_path, monkeypatch):
    """On a disk shared with heavy writers syncfs waits for their data too: DISTILL_SYNCFS=0 opts out."""
    monkeypatch.setattr(store_fs, "SYNCFS", lambda fd: 0)
    monkeypatch.setattr(store_fs, "_filesystem_type", lambda dev: "ext4")
    assert store_fs.syncfs_covers(str(tmp_path))
    monkeypatch.setenv("DISTILL_SYNCFS", "0")
    assert not store_fs.syncfs_covers(str(tmp_path))
