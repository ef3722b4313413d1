"""Durability order of a shard write on a local disk: data, every directory entry, then the record."""

import os

from storehelp import make_labels, write_store

from distill.storage import fs as store_fs


def test_shard_files_and_all_their_directories_are_synced_before_the_commit_record(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(store_fs, "SYNCFS", None)  # file by file; tests/storage/test_syncs.py checks the one-syncfs path
    real_fsync, real_fsync_dir = os.fsync, store_fs.fsync_dir
    monkeypatch.setattr(store_fs.fsync_dir.__globals__["os"], "fsync", lambda fd: (events.append(("file", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(store_fs, "fsync_dir", lambda path: (events.append(("dir", path)), real_fsync_dir(path))[1])
    write_store(tmp_path / "s", make_labels("topk", n_examples=5), per_shard=5, finalize=False)
    root = str(tmp_path / "s")
    commit = next(i for i, (kind, p) in enumerate(events) if kind == "file" and ".commit.json" in p)
    before = events[:commit]
    synced_dirs = {p for kind, p in before if kind == "dir"}
    synced_files = {p for kind, p in before if kind == "file"}
    shard = os.path.join(root, "shards", "000000")
    for dirpath, _, files in os.walk(shard):
        for name in files:
            assert os.path.join(dirpath, name) in synced_files
        d = dirpath
        while d != root:  # the entry of this directory in its parent is durable too
            assert d in synced_dirs, d
            d = os.path.dirname(d)
