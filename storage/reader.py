"""Reading a store: random access to examples, and bounded-memory streaming over shards.

Every shard read checks each file's size and CRC-32 against the shard's commit record
before decoding, so damaged bytes raise ``CorruptStoreError`` naming the shard instead of
turning into wrong labels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from distill.errors import CorruptStoreError, StoreError
from distill.storage.backend import get_backend
from distill.storage.fs import StoreFS
from distill.storage.labels import SoftLabels, concat_labels
from distill.storage.layout import (REDO, commit_name, load_manifest, read_commit_record, read_commit_records,
                                    read_shard_files, shard_dir)
from distill.storage.manifest import FORMAT_VERSION, Manifest, ShardRecord
from distill.storage.shards import array_bytes, decode_shard
from distill.storage.stats import topk_mass_sum

__all__ = ["StoreReader", "open_store"]


def open_store(url: str, damaged_records_ok: bool = False) -> "StoreReader":
    """Open the store at ``url`` (any fsspec URL) for reading.

    A damaged commit record raises CorruptStoreError, unless ``damaged_records_ok``: then
    its shard counts as damaged (``verify`` lists it) and the rest stay readable.
    """
    sfs = StoreFS(url)
    if sfs.isfile():
        raise StoreError(f"{url} is a file, not a store: pass the store's directory")
    if not sfs.exists():
        raise StoreError(f"no store at {url}: check the path, or create it with `distill generate-labels`")
    return StoreReader(sfs, load_manifest(sfs), damaged_records_ok)


class StoreReader:
    """Read-only view of a store. Only complete shards are ever read."""

    def __init__(self, sfs: StoreFS, manifest: Manifest, damaged_records_ok: bool = False):
        self.sfs = sfs
        self.manifest = manifest
        self.spec = manifest.spec
        self.backend = get_backend(self.spec.backend)
        self.damaged_records: dict[int, str] = {}
        if manifest.finalized:
            self.records = {r.index: r for r in manifest.shards}
        else:  # still being written: the commit records say what is complete
            self.records = read_commit_records(sfs, self.spec, self.damaged_records if damaged_records_ok else None)
        self._cache: tuple[int, SoftLabels] | None = None

    # --- what the store holds -------------------------------------------------------
    @property
    def url(self) -> str:
        return self.sfs.url

    @property
    def num_examples(self) -> int:
        return self.spec.num_examples

    @property
    def num_positions(self) -> int:
        """Positions in complete shards."""
        return sum(r.positions for r in self.records.values())

    @property
    def complete(self) -> bool:
        return len(self.records) == self.spec.num_shards

    def complete_shards(self) -> list[int]:
        return sorted(self.records)

    def shard_of(self, example: int) -> int:
        if not 0 <= example < self.num_examples:
            raise IndexError(f"example {example} is out of range [0, {self.num_examples})")
        return example // self.spec.examples_per_shard

    # --- reading ----------------------------------------------------------------------
    def read_shard(self, index: int) -> SoftLabels:
        """All labels of a complete shard (torch tensors; ids ascending within a position)."""
        record = self._record(index)
        files = read_shard_files(self.sfs, record)
        try:
            labels = decode_shard(files, self.spec, index, record)
        except Exception as e:  # checksums matched, so this is a writer bug or an edited record
            raise CorruptStoreError(f"shard {index} cannot be decoded ({type(e).__name__}: {e}); regenerate it", index) from None
        if labels.num_examples != record.example_stop - record.example_start or labels.num_positions != record.positions:
            raise CorruptStoreError(f"shard {index} does not hold what its commit record says; regenerate it", index)
        return labels

    def example(self, example: int) -> SoftLabels:
        """Labels of one example (its positions), by global example index."""
        index = self.shard_of(example)
        if self._cache is None or self._cache[0] != index:
            self._cache = (index, self.read_shard(index))
        labels = self._cache[1]
        return labels.example(example - labels.example_start)

    def iter_shards(self, shards: Iterable[int] | None = None) -> Iterator[SoftLabels]:
        """Decoded shards one at a time, in the order given (default: all, ascending)."""
        for index in self.complete_shards() if shards is None else shards:
            yield self.read_shard(index)

    def iter_batches(self, batch_examples: int, shards: Iterable[int] | None = None) -> Iterator[SoftLabels]:
        """Batches of ``batch_examples`` consecutive examples over the given shards.

        Memory holds at most one decoded shard plus one batch. A batch never spans two
        shards, so the last batch of each shard may be short.
        """
        if batch_examples < 1:
            raise ValueError("batch_examples must be >= 1")
        for labels in self.iter_shards(shards):
            for start in range(0, labels.num_examples, batch_examples):
                yield labels.examples(start, min(start + batch_examples, labels.num_examples))

    def read_all(self) -> SoftLabels:
        """Every complete shard concatenated (for tests and small stores)."""
        return concat_labels(list(self.iter_shards()))

    def verify(self) -> list[dict]:
        """Read and check every shard; returns ``[{"shard": i, "error": str}]`` for damaged or missing ones."""
        damaged = []
        for index in range(self.spec.num_shards):
            if index in self.damaged_records:
                damaged.append({"shard": index, "error": self.damaged_records[index]})
                continue
            if index not in self.records:
                damaged.append({"shard": index, "error": "not complete"})
                continue
            try:
                self.read_shard(index)
                if self.manifest.finalized:
                    self._check_sealed_record(index)
            except CorruptStoreError as e:
                damaged.append({"shard": index, "error": str(e)})
        return damaged

    def _check_sealed_record(self, index: int) -> None:
        """In a finalized store the commit record is a second copy of the manifest's entry: it must agree."""
        try:
            record = read_commit_record(self.sfs, self.spec, commit_name(index))
        except FileNotFoundError:
            raise CorruptStoreError(f"shard {index} has lost its commit record; {REDO}", index) from None
        if record != self.records[index]:
            raise CorruptStoreError(f"shard {index}'s commit record disagrees with manifest.json; {REDO}", index)

    def summary(self, verify: bool = False) -> dict:
        """Figures about the store, from the commit records (cheap at any size).

        With ``verify`` every shard is also read and checked once: ``damaged_shards``
        lists what ``verify()`` returns and ``shards_unreadable`` the complete shards
        among them. Records without statistics (allowed by the format) are read for them.
        """
        spec = self.spec
        payload = sum(r.payload_bytes for r in self.records.values())
        positions = self.num_positions
        damaged = self.verify() if verify else []
        unreadable = [d["shard"] for d in damaged if d["shard"] in self.records]
        by_array = self.array_bytes()
        mass_sum, count = 0.0, 0
        for index in self.complete_shards():
            record = self.records[index]
            if "topk_mass_sum" in record.stats:
                mass_sum += float(record.stats["topk_mass_sum"])
                count += record.positions
            elif index not in unreadable:
                labels = self.read_shard(index)
                mass_sum += topk_mass_sum(labels)
                count += labels.num_positions
        return {
            "url": self.url,
            "format_version": FORMAT_VERSION,
            "tool_version": self.manifest.tool_version,
            "method": spec.method,
            "backend": spec.backend,
            "value_encoding": spec.value_encoding.to_json(),
            **({"id_coding": spec.id_coding} if spec.id_coding != "delta" else {}),
            "examples": spec.num_examples,
            **({"data": spec.extra["data"]} if isinstance(spec.extra.get("data"), dict) else {}),
            "positions": positions,
            "k": spec.k,
            **({"tail_samples": spec.tail_samples, "sampling": spec.extra.get("sampling", "iid"),
                "sample_temperature": spec.sample_temperature} if spec.tail_samples else {}),
            "vocab_size": spec.vocab_size,
            "temperatures": list(spec.temperatures),
            "finalized": self.manifest.finalized,
            "shards_complete": len(self.records),
            "shards_total": spec.num_shards,
            **({"shards_unreadable": unreadable, "damaged_shards": damaged} if verify else {}),
            "payload_bytes": payload,
            "bytes_per_position": payload / positions if positions else math.nan,
            "bytes_per_entry": payload / (positions * spec.k) if positions else math.nan,
            "bytes_by_array": by_array,
            "bytes_per_position_by_array": {name: round(b / positions, 3) for name, b in by_array.items()}
                                           if positions else {},
            "topk_mass_mean": mass_sum / count if count else math.nan,
            "teacher_fingerprint": spec.teacher_fingerprint,
            "dataset_fingerprint": spec.dataset_fingerprint,
        }

    def array_bytes(self) -> dict[str, int]:
        """Bytes on disk of each array (docs/FORMAT.md's names) over the complete shards, largest first.

        ``"metadata"`` counts what belongs to no one array (zarr.json files, Parquet footers),
        so the values sum to the payload. From the commit records, and for Parquet from each
        file's footer; a shard whose files cannot be opened counts under ``"unreadable"``.
        """
        total: dict[str, int] = {}
        for index in self.complete_shards():
            record = self.records[index]

            def open_file(rel: str, index=index):
                return self.sfs.fs.open(self.sfs.path(f"{shard_dir(index)}/{rel}"), "rb")

            try:
                sizes = array_bytes(self.spec, record, open_file)
            except Exception:  # noqa: BLE001 - a missing or damaged file (pyarrow's errors vary): verify names it
                sizes = {"unreadable": record.payload_bytes}
            for name, size in sizes.items():
                total[name] = total.get(name, 0) + size
        return dict(sorted(total.items(), key=lambda item: -item[1]))

    # --- internals --------------------------------------------------------------------
    def _record(self, index: int) -> ShardRecord:
        if index in self.damaged_records:
            raise CorruptStoreError(self.damaged_records[index], index)
        if index not in self.records:
            if not 0 <= index < self.spec.num_shards:
                raise StoreError(f"shard {index} does not exist: the store has shards 0..{self.spec.num_shards - 1}")
            raise StoreError(f"shard {index} is not complete: rerun generation to finish the store")
        return self.records[index]

