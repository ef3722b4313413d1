"""Files on any fsspec URL, written so that a crash never leaves a partial file in place."""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from distill.errors import CorruptStoreError, StoreError

__all__ = ["StoreFS"]


class StoreFS:
    """A store's root directory on a filesystem; paths are '/'-separated and relative."""

    def __init__(self, url: str):
        try:
            self.fs, self.root = fsspec.core.url_to_fs(str(url))
        except (ValueError, ImportError) as e:
            raise StoreError(f"cannot open {url!r} ({e}); check the URL and that its fsspec backend is installed") from None
        self.url = str(url)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, rel: str) -> str:
        if rel.startswith("/") or ".." in rel.split("/") or "\\" in rel:
            raise CorruptStoreError(f"store path {rel!r} points outside the store; the store is damaged or hostile")
        return posixpath.join(self.root, rel) if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def isfile(self, rel: str = "") -> bool:
        return self.fs.isfile(self.path(rel))

    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write(self, rel: str, data: bytes, atomic: bool = True) -> None:
        """Write ``data`` durably. ``atomic``: readers see the old file or the whole new one.

        Non-atomic writes suit files that nothing reads until a later atomic write (a
        commit record) vouches for them; their directories need ``sync_dirs`` before it.
        """
        path = self.path(rel)
        if not self.local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self.fs.pipe_file(path, data)  # one PUT: object stores make it visible whole
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}" if atomic else path
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if atomic:
                os.replace(tmp, path)
        except BaseException:
            if atomic and os.path.exists(tmp):
                os.unlink(tmp)
            raise
        if atomic:
            _fsync_dir(os.path.dirname(path))

    def sync_dirs(self, rels) -> None:
        """Make the directory entries of files written with ``atomic=False`` durable."""
        if not self.local:
            return
        dirs = set()
        for rel in rels:  # every directory between the file and the store root gained an entry
            parts = rel.split("/")[:-1]
            dirs.update("/".join(parts[:i]) for i in range(len(parts) + 1))
        for d in sorted(dirs, key=len, reverse=True):  # children before parents
            _fsync_dir(self.path(d))

    def remove(self, rel: str) -> None:
        """Remove a file or a directory tree; missing is fine."""
        path = self.path(rel)
        try:
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            elif self.fs.exists(path):
                self.fs.rm(path)
        except FileNotFoundError:
            pass

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
