"""Files on any fsspec URL, written so that a crash never leaves a partial file in place."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import posixpath
import re
import sys
import uuid

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no shard locks
    fcntl = None

import fsspec
from fsspec.implementations.local import LocalFileSystem

from distill.errors import CorruptStoreError, StoreError, write_error

__all__ = ["StoreFS", "FileLock", "write_atomic", "fsync_file", "fsync_dir", "syncfs_covers", "SYNCFS",
           "WHOLE_FS_SYNC"]


def _load_syncfs():
    """libc's ``syncfs(fd)`` where it also reports writeback errors (Linux >= 5.8), else None."""
    if not sys.platform.startswith("linux"):
        return None
    version = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if version is None or tuple(map(int, version.groups())) < (5, 8):  # older kernels drop writeback errors there
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


SYNCFS = _load_syncfs()
# Local filesystems whose syncfs(2) writes back every dirty file and commits every metadata
# change: one call does the work of an fsync per file and per directory (each of which costs a
# journal commit or a device cache flush: ~3 ms on a virtual disk, 27 of them per zarr shard).
# Elsewhere (NFS, FUSE, overlay, unknown) every file and directory is fsynced.
WHOLE_FS_SYNC = ("ext4", "xfs", "btrfs", "tmpfs")


class StoreFS:
    """A store's root directory on a filesystem; paths are '/'-separated and relative."""

    def __init__(self, url: str):
        try:
            self.fs, self.root = fsspec.core.url_to_fs(str(url))
        except (ValueError, ImportError) as e:
            raise StoreError(f"cannot open {url!r} ({e}); check the URL and that its fsspec backend is installed") from None
        self.url = str(url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.sync_dev: int | None = None  # the root's device once it is known to take a whole-fs sync; -1: it does not

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
        if self.local:  # a plain open: fsspec's cat_file costs ~4x as much per file, and a shard is ~11 files
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    def write(self, rel: str, data: bytes, atomic: bool = True) -> None:
        """Write ``data`` durably. ``atomic``: readers see the old file or the whole new one.

        Non-atomic writes suit files that nothing reads until a later atomic write (a
        commit record) vouches for them; ``sync_dirs`` must make them durable before it
        (where one syncfs covers the store, their bytes are synced there, all at once).
        A failure raises a one-line WriteError naming ``rel`` and the store.
        """
        path = self.path(rel)
        try:
            self._write(path, data, atomic)
        except OSError as e:
            raise write_error(e, f"{rel} in the store {self.url}") from None

    def _write(self, path: str, data: bytes, atomic: bool) -> None:
        """The write itself; OSError propagates (tests/reliability/faults.py wraps this to tear files)."""
        if not self.local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self.fs.pipe_file(path, data)  # one PUT: object stores make it visible whole
        elif atomic:
            _replace_durably(path, data)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if self.whole_fs_sync():
                _write_unsynced(path, data)  # sync_dirs syncs it with the rest of its shard
            else:
                _write_synced(path, data)

    def whole_fs_sync(self) -> bool:
        """Whether ``sync_dirs`` makes files durable with one syncfs(2) (decided once, from the store root)."""
        if self.sync_dev is None:
            root = self.path("")
            self.sync_dev = os.stat(root).st_dev if self.local and syncfs_covers(root) else -1
        return self.sync_dev != -1

    def sync_dirs(self, rels) -> None:
        """Make files written with ``atomic=False`` durable, and every directory entry that leads to them.

        ``rels``: those files' paths. One syncfs(2) where ``whole_fs_sync()``; elsewhere each
        file was fsynced as it was written and each directory is fsynced here, children
        before parents. A failed sync raises a one-line WriteError.
        """
        rels = list(rels)
        if not self.local or not rels:
            return
        if self.whole_fs_sync():
            top = posixpath.commonpath([posixpath.dirname(rel) for rel in rels])  # what the writes created is under it
            try:
                if self._syncfs(top):
                    return
                for rel in rels:  # on another filesystem than the root (a symlink): file by file after all
                    fsync_file(self.path(rel))
            except OSError as e:
                raise write_error(e, f"{top or rels[0]} in the store {self.url} (syncing it)") from None
        dirs = set()
        for rel in rels:  # every directory between the file and the store root gained an entry
            parts = rel.split("/")[:-1]
            dirs.update("/".join(parts[:i]) for i in range(len(parts) + 1))
        for d in sorted(dirs, key=len, reverse=True):  # children before parents
            fsync_dir(self.path(d))

    def _syncfs(self, rel: str) -> bool:
        """syncfs(2) the filesystem of directory ``rel`` if it is the root's; False (nothing done) if not."""
        fd = os.open(self.path(rel), os.O_RDONLY)
        try:
            if os.fstat(fd).st_dev != self.sync_dev:
                return False
            if SYNCFS(fd) != 0:
                err = ctypes.get_errno() or errno.EIO
                raise OSError(err, os.strerror(err))
            return True
        finally:
            os.close(fd)

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
        except OSError as e:
            raise write_error(e, f"{rel or 'the store'} in {self.url} (removing it)") from None

    def makedirs(self, rel: str = "") -> None:
        try:
            self.fs.makedirs(self.path(rel), exist_ok=True)
        except FileExistsError:
            raise StoreError(f"{self.path(rel)} is a file, not a directory: choose another path for the store") from None
        except OSError as e:
            raise write_error(e, f"the store directory {self.url}") from None

    def try_lock(self, rel: str) -> "FileLock | None":
        """An exclusive lock on the file ``rel`` (created if missing), or None while another process holds it.

        Local filesystems only (``flock``: the kernel drops it when the holder dies, even by
        kill -9, so a crash never leaves a stale lock). On object stores there is no lock:
        every call succeeds and writers must not overlap (docs/RELIABILITY.md).
        """
        if not self.local or fcntl is None:
            return FileLock(None, None)
        path = self.path(rel)
        while True:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_error(e, f"the lock file {rel} in {self.url}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:  # the holder before us may have removed the file after we opened it: lock the current one
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return FileLock(fd, path)
            except FileNotFoundError:
                pass
            os.close(fd)


class FileLock:
    """A held ``flock``; ``release(remove=True)`` also deletes the file (safe: lockers check the inode)."""

    def __init__(self, fd: int | None, path: str | None):
        self.fd, self.path = fd, path

    def release(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def write_atomic(path: str, data: bytes | str, what: str | None = None) -> None:
    """Replace the local file ``path`` with ``data`` (str is written as UTF-8), durably and atomically.

    Readers see the old file or the whole new one: the bytes go to a temporary file in the
    same directory (created if missing), are fsynced, renamed over ``path``, and the
    directory is fsynced. Any OSError becomes the one-line WriteError naming ``what``
    (default: ``path``); the temporary file is removed on any failure.
    """
    try:
        _replace_durably(path, data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as e:
        raise write_error(e, what or path) from None


def _replace_durably(path: str, data: bytes) -> None:
    """``write_atomic`` without the error translation: OSError propagates, the temporary file is removed."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_unsynced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:  # ``open``, not os.open: tests/reliability fills the disk through it
        f.write(data)


def syncfs_covers(path: str) -> bool:
    """Whether one syncfs(2) makes durable what is written under the local directory ``path``.

    True where SYNCFS exists and ``path`` lies on a filesystem named in WHOLE_FS_SYNC, unless
    the environment sets ``DISTILL_SYNCFS=0``: syncfs also waits for every other process's
    unwritten data on that filesystem, which on a disk shared with heavy writers can cost
    more than the per-file fsyncs it replaces.
    """
    if SYNCFS is None or os.environ.get("DISTILL_SYNCFS", "1") == "0":
        return False
    try:
        return _filesystem_type(os.stat(path).st_dev) in WHOLE_FS_SYNC
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def _filesystem_type(dev: int) -> str | None:
    """The type of the mounted filesystem of device ``dev`` ("ext4"), from /proc/self/mountinfo; None if unknown."""
    key = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:  # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"
                fields, sep, rest = line.partition(" - ")
                if sep and fields.split()[2:3] == [key]:
                    return rest.split()[0]
    except (OSError, IndexError):
        pass
    return None


def fsync_file(path: str) -> None:
    """Make the local file ``path``'s bytes durable; OSError propagates."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the entries of the local directory ``path`` durable, best effort (errors are ignored)."""
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
