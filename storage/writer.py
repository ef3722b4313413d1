"""Writing a store: create or reopen it, write whole shards, finalize the manifest.

Order of writes for one shard, which is what makes a crash at any moment safe:
1. remove whatever an earlier, interrupted attempt left of the shard;
2. write every data file of the shard, then make the files and their directories durable
   together: one syncfs(2) of the shard's filesystem where it covers them (Linux >= 5.8 on
   ext4, xfs, btrfs, tmpfs: ~3 ms instead of 27 fsyncs of ~3 ms each for a zarr shard),
   else an fsync of each file as it is written and of each directory (``StoreFS.sync_dirs``);
3. write the shard's commit record (sizes + CRC-32 of every file), atomically, last.
A shard without a valid commit record is pending and is rewritten from step 1.

On a local filesystem a process writes a shard only while it holds the shard's lock
(``shards/<index>.lock``, flock), so two processes started on one store by mistake split
the shards between them instead of writing the same files.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from distill import __version__
from distill.errors import CorruptStoreError, StoreError
from distill.storage.backend import get_backend
from distill.storage.fs import FileLock, StoreFS
from distill.storage.labels import POSITION_FIELDS, SoftLabels
from distill.storage.layout import (MANIFEST, SHARDS, commit_index, commit_names, commit_path, load_manifest, lock_path,
                                    read_commit_record, read_commit_records, read_shard_files, remove_commit_record,
                                    shard_dir, write_commit_record, write_manifest, write_shard_files)
from distill.storage.manifest import Manifest, ShardRecord, StoreSpec
from distill.storage.shards import encode_shard
from distill.storage.stats import topk_mass_sum

__all__ = ["StoreWriter", "ShardWriter", "create_store", "open_store_writer", "empty_labels"]


class StoreWriter:
    """Writes shards of one store; several writers may work on disjoint shards at once."""

    def __init__(self, sfs: StoreFS, manifest: Manifest):
        self.sfs = sfs
        self.manifest = manifest
        self.spec = manifest.spec
        self.backend = get_backend(self.spec.backend)
        self.locks: dict[int, FileLock] = {}

    @property
    def url(self) -> str:
        return self.sfs.url

    def claim(self, index: int) -> str:
        """Take shard ``index``'s lock to write it: "claimed", "busy" (another process holds it) or "complete"."""
        lock = self.sfs.try_lock(lock_path(index))
        if lock is None:
            return "busy"
        if self.sfs.isfile(commit_path(index)):  # finished by another process since we listed the pending shards
            lock.release(remove=True)
            return "complete"
        self.locks[index] = lock
        return "claimed"

    def release(self, index: int | None = None, remove: bool = False) -> None:
        """Drop the lock of shard ``index`` (None: every lock this writer holds)."""
        for i in list(self.locks) if index is None else [index]:
            lock = self.locks.pop(i, None)
            if lock is not None:
                lock.release(remove)

    def repair(self) -> list[int]:
        """Mark damaged shards pending: a commit record that fails its checks, or files that do not match it.

        Reads every complete shard's files (no decoding). Shards another process is writing
        are left alone. Returns the shards that will be redone; unseals the manifest if any.
        """
        damaged = []
        for name in commit_names(self.sfs):
            index = commit_index(name)
            lock = self.sfs.try_lock(lock_path(index)) if 0 <= index < self.spec.num_shards else None
            if lock is None and 0 <= index < self.spec.num_shards:
                continue  # being written by another process
            try:
                read_shard_files(self.sfs, read_commit_record(self.sfs, self.spec, name))
            except CorruptStoreError:
                remove_commit_record(self.sfs, name)
                damaged.append(index)
            finally:
                if lock is not None:
                    lock.release(remove=True)
        if self.manifest.finalized:
            sealed = {r.index: r for r in self.manifest.shards}
            damaged += [i for i in sealed if not self.sfs.isfile(commit_path(i)) and i not in damaged]
        if damaged and self.manifest.finalized:
            self._unseal()
        return sorted(i for i in damaged if i >= 0)

    def complete_shards(self) -> set[int]:
        return set(read_commit_records(self.sfs, self.spec))

    def pending_shards(self) -> list[int]:
        done = self.complete_shards()
        return [i for i in range(self.spec.num_shards) if i not in done]

    def shard(self, index: int) -> "ShardWriter":
        """A buffer for shard ``index``: append its examples' labels in order, then commit."""
        if not 0 <= index < self.spec.num_shards:
            raise StoreError(f"shard {index} does not exist: the store has shards 0..{self.spec.num_shards - 1}")
        return ShardWriter(self, index)

    def write_shard(self, index: int, labels: SoftLabels) -> ShardRecord:
        """Encode and write a whole shard, then mark it complete. Returns its record."""
        start, stop = self.spec.shard_range(index)
        if labels.num_examples != stop - start:
            raise StoreError(f"shard {index} holds examples {(start, stop)}: got {labels.num_examples} examples, not "
                             f"{stop - start}")
        files = encode_shard(labels, self.spec, where=f"shard {index}")  # which checks the rest of the labels
        if self.manifest.finalized:  # redoing a shard: the sealed shard table is about to go stale
            self._unseal()
        self.sfs.remove(commit_path(index))
        self.sfs.remove(shard_dir(index))
        table = write_shard_files(self.sfs, index, files)
        record = ShardRecord(index, start, stop, labels.num_positions, table, {"topk_mass_sum": topk_mass_sum(labels)})
        write_commit_record(self.sfs, record)
        self.release(index, remove=True)  # lockers after us see the commit record and skip the shard
        return record

    def finalize(self) -> Manifest:
        """Seal the store: every shard must be complete; the manifest gets the shard table."""
        records = read_commit_records(self.sfs, self.spec)
        missing = [i for i in range(self.spec.num_shards) if i not in records]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            url = self.sfs.url
            raise StoreError(f"cannot finalize {url}: {len(missing)} shard(s) not complete (shards {shown} of "
                             f"{self.spec.num_shards}): rerun generation for them: `distill generate-labels --teacher "
                             f"... --data ... --out {url}` with the same settings and no --shard labels just these and "
                             "seals the store (or rerun each --shard I/N task whose I is a shard's number mod N)")
        self.manifest = Manifest(self.spec, __version__, finalized=True, shards=[records[i] for i in sorted(records)])
        write_manifest(self.sfs, self.manifest)
        return self.manifest

    def _unseal(self) -> None:
        """Back to an unfinalized manifest: the commit records, not the manifest's table, say what is complete."""
        self.manifest = Manifest(self.spec, __version__)
        write_manifest(self.sfs, self.manifest)


class ShardWriter:
    """Collects one shard's labels batch by batch; ``commit`` writes the shard.

    Each batch is copied on arrival into one buffer per field, sized for the whole shard from the
    first batch's positions per example (pages never written cost no memory; a longer shard doubles
    the buffer), and its own buffers are freed at once. Held until the commit instead, a shard's worth
    of batch-sized buffers (a few MB each: glibc serves blocks that size from its heap once it has
    freed one) fragmented the heap shard after shard, and generate-labels' peak RSS grew over its
    first default-size shards (``benchmarks/generate.py --memory-default-shards``). The commit writes
    the buffers' filled part: each position is still copied once, as the join at the commit did.
    """

    def __init__(self, writer: StoreWriter, index: int):
        self.writer, self.index = writer, index
        self.num_examples = 0
        self._first: SoftLabels | None = None  # its non-position fields (temperatures, example_start) are the shard's
        self._buffers: dict[str, torch.Tensor] = {}
        self._offsets: list[torch.Tensor] = [torch.zeros(1, dtype=torch.int64)]
        self._used = 0

    def append(self, labels: SoftLabels) -> None:
        n = labels.num_positions
        fields = {name: getattr(labels, name) for name in POSITION_FIELDS if getattr(labels, name) is not None}
        if self._first is None:  # its other fields; its position buffers are freed with the batch
            self._first = dataclasses.replace(labels, pretempered=None, **{name: None for name in POSITION_FIELDS})
            per = n / max(labels.num_examples, 1)
            capacity = max(n, math.ceil(per * self.writer.spec.examples_per_shard * 1.25))
            self._buffers = {name: t.new_empty((capacity, *t.shape[1:]), dtype=self._dtype(name, t))
                             for name, t in fields.items()}
        if fields.keys() != self._buffers.keys():
            raise StoreError(f"shard {self.index}: a batch holds {sorted(fields)} but the shard's first held "
                             f"{sorted(self._buffers)}: every batch of a store must carry the same fields")
        for name, t in fields.items():
            buf = self._buffers[name]
            if buf.dtype == torch.int32 and t.dtype == torch.int64 and t.numel() and _wraps(t):
                raise StoreError(f"shard {self.index}: {name} outside the vocabulary [0, {self.writer.spec.vocab_size})")
            if self._used + n > len(buf):  # longer than the first batch suggested: double
                grown = buf.new_empty((max(2 * len(buf), self._used + n), *buf.shape[1:]))
                grown[: self._used] = buf[: self._used]
                self._buffers[name] = buf = grown
            buf[self._used : self._used + n] = t
        self._offsets.append(labels.offsets[1:] + self._used)
        self._used += n
        self.num_examples += labels.num_examples

    def _dtype(self, name: str, t: torch.Tensor) -> torch.dtype:
        """Ids are held as int32 (every vocabulary fits): half the bytes of the int64 that topk gives, in the
        buffers and in the encoder's copies at the commit, which coincide with the next batches' teacher logits."""
        if name in ("topk_ids", "tail_ids") and t.dtype == torch.int64 and self.writer.spec.vocab_size <= 2**31 - 1:
            return torch.int32
        return t.dtype

    def commit(self) -> ShardRecord:
        spec = self.writer.spec
        if self._first is None:
            return self.writer.write_shard(self.index, empty_labels(spec))
        fields = {name: None for name in POSITION_FIELDS}
        fields.update({name: buf[: self._used] for name, buf in self._buffers.items()})
        labels = dataclasses.replace(self._first, offsets=torch.cat(self._offsets), **fields)
        return self.writer.write_shard(self.index, labels)


def empty_labels(spec: StoreSpec, num_examples: int = 0) -> SoftLabels:
    """Labels with no positions for ``num_examples`` examples, shaped for a store of ``spec``.

    offsets: (num_examples + 1,) zeros; every other array has 0 positions, with the store's
    k slots, stored temperatures, and counts / token_index / tail draws exactly when the store has them.
    """
    return SoftLabels(
        offsets=torch.zeros(num_examples + 1, dtype=torch.int64),
        topk_ids=torch.zeros(0, spec.k, dtype=torch.int64),
        topk_logprobs=torch.zeros(0, spec.k),
        tail_logprob=torch.zeros(0),
        tempered_lse=torch.zeros(0, len(spec.stored_temperatures)),
        temperatures=spec.stored_temperatures,
        counts=torch.zeros(0, spec.k, dtype=torch.int32) if spec.method == "sample" else None,
        token_index=torch.zeros(0, dtype=torch.int32) if spec.has_token_index else None,
        tail_ids=torch.zeros(0, spec.tail_samples, dtype=torch.int64) if spec.tail_samples else None,
        tail_counts=torch.zeros(0, spec.tail_samples, dtype=torch.int32) if spec.tail_samples else None,
    )


def create_store(url: str, spec: StoreSpec, overwrite: bool = False) -> StoreWriter:
    """Create a store at ``url``, or reopen it to resume when it was made with the same spec.

    A store made with another spec is refused (IncompatibleStoreError) unless ``overwrite``;
    a path that holds something other than a store is refused too.
    """
    sfs = StoreFS(url)
    if sfs.isfile():
        raise StoreError(f"{url} is a file, not a store directory: pass a directory path for the store")
    if sfs.isfile(MANIFEST) and not overwrite:
        existing = load_manifest(sfs)
        spec.check_same(existing.spec)
        return StoreWriter(sfs, existing)
    if overwrite:
        if sfs.isdir() and _entries(sfs) and not sfs.isfile(MANIFEST):
            raise StoreError(f"{url} exists and is not a distill store; refusing to overwrite it: choose another path")
        sfs.remove(MANIFEST)
        sfs.remove(SHARDS)
    elif sfs.isdir() and _entries(sfs):
        raise StoreError(f"{url} exists and is not empty (no manifest.json): choose a new path for the store")
    sfs.makedirs()
    manifest = Manifest(spec, __version__)
    write_manifest(sfs, manifest)  # same bytes from every worker that races here
    return StoreWriter(sfs, manifest)


def open_store_writer(url: str) -> StoreWriter:
    """Reopen an existing store for writing (to finalize it, or redo shards) with its own spec."""
    sfs = StoreFS(url)
    if not sfs.isdir():
        raise StoreError(f"no store at {url}: check the path")
    return StoreWriter(sfs, load_manifest(sfs))


def _entries(sfs: StoreFS) -> list[str]:
    """Directory entries, ignoring another worker's manifest write in flight (job arrays race to create)."""
    return [e for e in sfs.listdir() if ".tmp-" not in e]


def _wraps(ids: torch.Tensor) -> bool:
    """Whether int64 ``ids`` would wrap as int32: the commit's vocabulary check could not see it then."""
    lo, hi = torch.aminmax(ids)  # one pass for both
    return int(lo) < -(2**31) or int(hi) >= 2**31
