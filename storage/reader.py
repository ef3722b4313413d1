"""Reading a store: random access to examples, and bounded-memory streaming over shards.

Every shard read checks each file's size and CRC-32 against the shard's commit record
before decoding, so damaged bytes raise ``CorruptStoreError`` naming the shard instead of
turning into wrong labels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from distill.errors import CorruptStoreError, StoreError
from distill.storage.backend import get_backend
from distill.storage.codecs import decode_labels
from distill.storage.fs import StoreFS
from distill.storage.labels import SoftLabels, concat_labels
from distill.storage.manifest import FORMAT_VERSION, Manifest, ShardRecord
from distill.storage.writer import MANIFEST, read_commit_record, read_commit_records, read_shard_files

__all__ = ["StoreReader", "open_store", "load_manifest"]

MASS_BINS = 100_000  # fine bins of the top-k mass: label_figures' percentiles are exact to 1e-5
FIGURES_BYTES = 1 << 30  # label_figures reads stores up to this payload whole, larger ones a sample


def load_manifest(sfs: StoreFS) -> Manifest:
    try:
        data = sfs.read(MANIFEST)
    except FileNotFoundError:
        raise StoreError(f"{sfs.url} has no manifest.json: it is not a distill store (or was never created)") from None
    return Manifest.from_bytes(data)


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
            columns = self.backend.deserialize(files, self._shapes(record))
            labels = decode_labels(columns, self.spec.k, self.spec.value_encoding, self.spec.stored_temperatures, record.example_start)
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
            record = read_commit_record(self.sfs, self.spec, f"{index:06d}.commit.json")
        except FileNotFoundError:
            raise CorruptStoreError(f"shard {index} has lost its commit record; rerun generate-labels with "
                                    "--repair to redo it", index) from None
        if record != self.records[index]:
            raise CorruptStoreError(f"shard {index}'s commit record disagrees with manifest.json; rerun "
                                    "generate-labels with --repair to redo it", index)

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
        mass_sum, count = 0.0, 0
        for index in self.complete_shards():
            record = self.records[index]
            if "topk_mass_sum" in record.stats:
                mass_sum += float(record.stats["topk_mass_sum"])
                count += record.positions
            elif index not in unreadable:
                labels = self.read_shard(index)
                mass_sum += float(-np.expm1(labels.tail_logprob.double().numpy()).sum())
                count += labels.num_positions
        return {
            "url": self.url,
            "format_version": FORMAT_VERSION,
            "tool_version": self.manifest.tool_version,
            "method": spec.method,
            "backend": spec.backend,
            "value_encoding": spec.value_encoding.to_json(),
            "examples": spec.num_examples,
            "positions": positions,
            "k": spec.k,
            "vocab_size": spec.vocab_size,
            "temperatures": list(spec.temperatures),
            "finalized": self.manifest.finalized,
            "shards_complete": len(self.records),
            "shards_total": spec.num_shards,
            **({"shards_unreadable": unreadable, "damaged_shards": damaged} if verify else {}),
            "payload_bytes": payload,
            "bytes_per_position": payload / positions if positions else math.nan,
            "bytes_per_entry": payload / (positions * spec.k) if positions else math.nan,
            "topk_mass_mean": mass_sum / count if count else math.nan,
            "teacher_fingerprint": spec.teacher_fingerprint,
            "dataset_fingerprint": spec.dataset_fingerprint,
        }

    def figure_shards(self, max_shards: int | None = None) -> list[int]:
        """The complete shards ``label_figures`` reads: all, or an evenly spaced, deterministic sample.

        max_shards: None reads every shard of a store with at most ``FIGURES_BYTES`` of payload
        and about that many bytes' worth of shards of a larger one; 0 every shard; N at most N.
        """
        if max_shards is not None and max_shards < 0:
            raise ValueError(f"max_shards must be >= 0, got {max_shards}")
        shards = self.complete_shards()
        if max_shards is None:
            payload = sum(r.payload_bytes for r in self.records.values())
            max_shards = len(shards) if payload <= FIGURES_BYTES else max(1, len(shards) * FIGURES_BYTES // payload)
        if max_shards == 0 or max_shards >= len(shards):
            return shards
        picks = np.linspace(0, len(shards) - 1, max_shards).round().astype(int)  # distinct for max_shards < len
        return [shards[i] for i in picks]

    def label_figures(self, max_shards: int | None = None, bins: int = 10, skip: Iterable[int] = ()) -> dict:
        """What the teacher's distributions look like, read shard by shard (one decoded shard in memory).

        Returns ``topk_mass_percentiles`` ({p1, p10, p50, p90, p99, mean} of the mass the stored
        ids hold per position), ``topk_mass_histogram`` (position counts in ``bins`` equal bins
        over [0, 1], the last one closed), ``teacher_entropy_buckets_mean`` (nats: the entropy
        over the k+1 buckets, ids plus tail, a lower bound of the teacher's entropy over the whole
        vocabulary), ``unique_ids_mean`` (sampled stores) and which shards were read
        (``figures_*``; see ``figure_shards`` for ``max_shards``). Shards in ``skip`` are left
        out; damaged ones are left out and listed in ``figures_skipped_shards``.
        """
        if MASS_BINS % bins:
            raise ValueError(f"bins must divide {MASS_BINS}, got {bins}")
        planned = self.figure_shards(max_shards)
        skip = set(skip)
        chosen = [i for i in planned if i not in skip]
        fine = np.zeros(MASS_BINS, np.int64)
        sums = {"mass": 0.0, "entropy": 0.0, "unique": 0.0}
        low, high, damaged = math.inf, -math.inf, []
        for index in chosen:
            try:
                labels = self.read_shard(index)
            except CorruptStoreError:
                damaged.append(index)
                continue
            mass, entropy = _mass_and_entropy(labels)  # (P,), (P,)
            fine += np.bincount(np.minimum((mass * MASS_BINS).astype(np.int64), MASS_BINS - 1), minlength=MASS_BINS)
            if len(mass):
                low, high = min(low, float(mass.min())), max(high, float(mass.max()))
            sums["mass"] += float(mass.sum())
            sums["entropy"] += float(entropy.sum())
            if labels.counts is not None:
                sums["unique"] += float((labels.counts > 0).sum())
        n = int(fine.sum())
        mean = (lambda key: sums[key] / n if n else math.nan)  # noqa: E731
        read = [i for i in chosen if i not in damaged]
        return {
            "topk_mass_percentiles": {**_percentiles(fine, n, low, high), "mean": mean("mass")},
            "topk_mass_histogram": fine.reshape(bins, -1).sum(1).tolist(),
            "teacher_entropy_buckets_mean": mean("entropy"),
            **({"unique_ids_mean": mean("unique")} if self.spec.method == "sample" else {}),
            "figures_positions": n,
            "figures_shards_read": len(read),
            "figures_sampled": len(planned) < len(self.records),
            "figures_skipped_shards": sorted(damaged),
        }

    # --- internals --------------------------------------------------------------------
    def _record(self, index: int) -> ShardRecord:
        if index in self.damaged_records:
            raise CorruptStoreError(self.damaged_records[index], index)
        if index not in self.records:
            if not 0 <= index < self.spec.num_shards:
                raise StoreError(f"shard {index} does not exist: the store has shards 0..{self.spec.num_shards - 1}")
            raise StoreError(f"shard {index} is not complete: rerun generation to finish the store")
        return self.records[index]

    def _shapes(self, record: ShardRecord) -> dict[str, tuple[int, ...]]:
        """The shape every array of the shard must have, from its record (bounds what decoding allocates)."""
        spec, p, k = self.spec, record.positions, self.spec.k
        shapes = {"offsets": (record.example_stop - record.example_start + 1,), "ids_delta": (p, k),
                  "tail_logprob": (p,), "logprobs": (p, k), "logprob_codes": (p, k), "counts": (p, k), "token_index": (p,)}
        if spec.stored_temperatures:
            shapes["tempered_lse"] = (p, len(spec.stored_temperatures))
        return shapes


def _mass_and_entropy(labels: SoftLabels) -> tuple[np.ndarray, np.ndarray]:
    """Per position (P,): the mass of the stored ids, and the entropy (nats) over ids plus tail."""
    tail = labels.tail_logprob.double().numpy()  # (P,)
    mass = np.clip(-np.expm1(tail), 0.0, 1.0)
    buckets = np.concatenate([labels.topk_logprobs.double().numpy(), tail[:, None]], axis=1)  # (P, K+1)
    finite = np.isfinite(buckets)  # -inf: padding slots, or no tail; they hold no mass
    plogp = np.exp(buckets) * np.where(finite, buckets, 0.0)
    return mass, -plogp.sum(1)


def _percentiles(fine: np.ndarray, n: int, low: float, high: float) -> dict:
    """p1..p99 from the fine histogram: the midpoint of the bin holding each rank, kept within [min, max]."""
    if not n:
        return {f"p{q}": math.nan for q in (1, 10, 50, 90, 99)}
    cdf = np.cumsum(fine)
    out = {}
    for q in (1, 10, 50, 90, 99):
        b = int(np.searchsorted(cdf, q / 100 * n, side="left"))
        out[f"p{q}"] = min(max((b + 0.5) / len(fine), low), high)
    return out
