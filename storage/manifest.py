"""The store's manifest and per-shard commit records (JSON, self-checksummed).

A store is self-describing: ``manifest.json`` at its root says what it holds (format
version, method, k, vocabulary, temperatures, value encoding, fingerprints, the shard
plan). A shard is complete once its commit record ``shards/<index>.commit.json`` exists;
the record is written last, after the shard's files are durable, and carries their sizes
and CRC-32s. ``finalize`` copies the records into the manifest's shard table.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

from distill.errors import CorruptStoreError, IncompatibleStoreError, StoreError
from distill.storage.backend import BACKENDS
from distill.storage.codecs import ID_CODINGS, ValueEncoding

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "METHODS", "StoreSpec", "ShardRecord", "Manifest", "dumps_checked",
           "loads_checked"]

FORMAT_NAME = "distill-soft-labels"
FORMAT_VERSION = 1
METHODS = ("topk", "sample")  # the label methods a store may hold, default first


def dumps_checked(obj: dict) -> bytes:
    """JSON bytes with a ``crc32`` field over the canonical JSON of everything else."""
    body = {k: v for k, v in obj.items() if k != "crc32"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    body["crc32"] = f"{zlib.crc32(canonical.encode()):08x}"
    return (json.dumps(body, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


REGENERATE = "regenerate the store (generate-labels --overwrite)"


def loads_checked(data: bytes, what: str, shard: int | None = None, fix: str = REGENERATE) -> dict:
    """Parse JSON written by ``dumps_checked``; any damage raises ``CorruptStoreError`` (``fix`` ends its message)."""
    try:
        obj = json.loads(data.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        body = {k: v for k, v in obj.items() if k != "crc32"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = " ".join(str(e).split())[:120]
        raise CorruptStoreError(f"{what} is not valid JSON ({reason}); {fix}", shard) from None
    if obj.get("crc32") != f"{zlib.crc32(canonical.encode()):08x}":
        raise CorruptStoreError(f"{what} fails its checksum (damaged or edited by hand); {fix}", shard)
    return body


@dataclasses.dataclass(frozen=True)
class StoreSpec:
    """What a store holds; two runs with equal specs write interchangeable shards.

    method:              "topk" (top-k ids + exact log-probs + tail) or "sample" (drawn ids + counts).
    k:                   slots per position: top-k size, or draws per position for "sample".
    vocab_size:          size V of the teacher's output distribution.
    num_examples:        examples in the dataset; example i maps to shard i // examples_per_shard.
    examples_per_shard:  shard size, the unit of writing, checking, resuming and parallelism.
    temperatures:        temperatures whose exact tempered normalisers are stored (1 is implicit).
    value_encoding:      "sqrt" (default, lossy, error measured) or "lossless", or a ValueEncoding.
    backend:             "zarr" (default) or "parquet".
    teacher_fingerprint: identifies the teacher (weights hash, config), refuses mismatched resumes.
    dataset_fingerprint: identifies the data, so stage two never joins labels to the wrong data.
    sample_temperature:  temperature of the distribution draws come from ("sample", and tail draws of "topk").
    has_token_index:     positions carry their token index within the example.
    extra:               free-form JSON metadata (generation settings, ...).
    task:                "classification" or "causal-lm" when known (on disk: ``extra["task"]``).
    tail_samples:        M, ids drawn per position from the teacher's distribution restricted to the
                         tail ("topk" only; 0: none). On disk only when M > 0, so older stores read as M = 0.
    id_coding:           how shards store their slot ids: "delta" (default: ids ascending as gaps) or "rank"
                         (a per-shard frequency table; see storage/codecs.py). On disk only when not "delta".
    """

    method: str
    k: int
    vocab_size: int
    num_examples: int
    examples_per_shard: int = 1024
    temperatures: tuple[float, ...] = (1.0,)
    value_encoding: str | ValueEncoding = "sqrt"
    backend: str = "zarr"
    teacher_fingerprint: str = ""
    dataset_fingerprint: str = ""
    sample_temperature: float | None = None
    has_token_index: bool = False
    extra: dict = dataclasses.field(default_factory=dict)
    task: str | None = None
    tail_samples: int = 0
    id_coding: str = "delta"

    def __post_init__(self):
        self._take_task_from_extra()
        if self.id_coding not in ID_CODINGS:
            raise StoreError(f"unknown id coding {str(self.id_coding)[:20]!r}: use one of {', '.join(ID_CODINGS)}")
        if not 0 <= self.tail_samples <= 65535 or (self.tail_samples and self.method != "topk"):
            raise StoreError(f"tail_samples={self.tail_samples} is out of range: use 0 <= tail_samples <= 65535, "
                             "and tail draws with method topk only")
        if self.method not in METHODS:
            raise StoreError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.backend not in BACKENDS:
            raise StoreError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.vocab_size < 1:
            raise StoreError(f"vocab_size must be positive, got {self.vocab_size}")
        if not 1 <= self.k <= (self.vocab_size if self.method == "topk" else 65535):
            raise StoreError(f"k={self.k} is out of range: use 1 <= k <= vocab_size ({self.vocab_size})")
        if self.num_examples < 0 or self.examples_per_shard < 1:
            raise StoreError("num_examples must be >= 0 and examples_per_shard >= 1")
        temps = tuple(sorted({float(t) for t in (1.0, *self.temperatures)}))
        if any(not t > 0 or t != t or t == float("inf") for t in temps):
            raise StoreError(f"temperatures must be finite and > 0, got {list(self.temperatures)}")
        object.__setattr__(self, "temperatures", temps)
        enc = self.value_encoding
        if isinstance(enc, str):
            try:
                enc = ValueEncoding.named(enc)
            except ValueError as e:
                raise StoreError(str(e)) from None
        object.__setattr__(self, "value_encoding", enc)
        if (self.method == "sample" or self.tail_samples) and self.sample_temperature is None:
            object.__setattr__(self, "sample_temperature", 1.0)

    def _take_task_from_extra(self) -> None:
        """Move ``extra["task"]`` (how callers and manifests give it) into ``task``; both given must agree."""
        if "task" not in self.extra:
            return
        extra = dict(self.extra)  # the caller's dict stays as it was
        task = extra.pop("task")
        if self.task is not None and self.task != task:
            raise StoreError(f"task {self.task!r} and extra['task'] {task!r} disagree: give the task once")
        object.__setattr__(self, "task", task)
        object.__setattr__(self, "extra", extra)

    @property
    def stored_temperatures(self) -> tuple[float, ...]:
        """Temperatures with a stored normaliser column (all but 1)."""
        return tuple(t for t in self.temperatures if t != 1.0)

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_examples // self.examples_per_shard))

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.examples_per_shard
        return start, min(start + self.examples_per_shard, self.num_examples)

    def to_json(self) -> dict:
        """The spec as the manifest holds it: the task inside ``extra`` (format version 1 has no top-level task)."""
        d = dataclasses.asdict(self)
        d["temperatures"] = list(self.temperatures)
        d["value_encoding"] = self.value_encoding.to_json()
        task = d.pop("task")
        if task is not None:
            d["extra"] = {**d["extra"], "task": task}
        for key, default in OPTIONAL_KEYS.items():  # a store that does not use them keeps its version-1 bytes
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StoreSpec":
        """The spec ``to_json`` describes (the task read from ``extra``); wrong types raise TypeError."""
        d = dict(d)
        for key, types in _FIELD_TYPES.items():
            if not isinstance(d[key], types) or (isinstance(d[key], bool) and bool not in types):
                raise TypeError(f"{key} is a {type(d[key]).__name__}")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in d["temperatures"]):
            raise TypeError("temperatures must be numbers")
        d["temperatures"] = tuple(d["temperatures"])
        d["value_encoding"] = ValueEncoding.from_json(d["value_encoding"])
        if not isinstance(d.get("tail_samples", 0), int) or isinstance(d.get("tail_samples"), bool):
            raise TypeError("tail_samples is not an integer")
        if not isinstance(d.get("id_coding", "delta"), str):
            raise TypeError("id_coding is not a string")
        return cls(**d)

    def check_same(self, other: "StoreSpec") -> None:
        """Raise IncompatibleStoreError naming the first setting that differs."""
        mine, theirs = ({**OPTIONAL_KEYS, **spec.to_json()} for spec in (self, other))
        for d in (mine, theirs):  # what describes the data is covered by its fingerprint: stores made before it resume
            d["extra"] = {k: v for k, v in d["extra"].items() if k not in DESCRIPTIVE_EXTRA}
        what = {"teacher_fingerprint": "another teacher", "dataset_fingerprint": "other data"}
        for key, thing in what.items():  # the likeliest mistakes first, in words
            if mine[key] != theirs[key]:
                raise IncompatibleStoreError(
                    f"the store was made with {thing} ({key} {theirs[key][:19]}..., not {mine[key][:19]}...): "
                    "use a new --out, or --overwrite to replace it"
                )
        for key in mine:
            if mine[key] != theirs[key]:
                raise IncompatibleStoreError(
                    f"the store was written with {key}={theirs[key]!r}, not {mine[key]!r}: "
                    "use a new --out, or --overwrite to replace it"
                )


# The spec's keys in manifest.json and their JSON types (the task travels inside extra).
_FIELD_TYPES = {"method": (str,), "k": (int,), "vocab_size": (int,), "num_examples": (int,),
                "examples_per_shard": (int,), "temperatures": (list,), "value_encoding": (dict,), "backend": (str,),
                "teacher_fingerprint": (str,), "dataset_fingerprint": (str,), "sample_temperature": (int, float, type(None)),
                "has_token_index": (bool,), "extra": (dict,)}


OPTIONAL_KEYS = {"tail_samples": 0, "id_coding": "delta"}  # spec keys a manifest holds only when they differ from these defaults
# extra keys that describe the data (sequences, sizes), which the dataset fingerprint already pins, and who made
# the store when (provenance: its date and command change on every run): not compared
DESCRIPTIVE_EXTRA = ("data", "seq_len", "longest_sequence", "provenance")


def _optional(d: dict, keys: tuple[str, ...]) -> dict:
    return {key: d[key] for key in keys if key in d}


def _check_files(files, shard: int | None) -> dict:
    """A record's file table: safe relative paths to {"bytes": int >= 0, "crc32": 8 hex digits}."""
    if not isinstance(files, dict):
        raise TypeError("files is not an object")
    for rel, meta in files.items():
        parts = rel.split("/")
        if rel.startswith("/") or "\\" in rel or ":" in rel or any(p in ("", ".", "..") for p in parts):
            raise CorruptStoreError(f"shard {shard}'s record names a file {rel[:80]!r} that points outside the store; "
                                    "the store is damaged or hostile: do not use it", shard)
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and not isinstance(meta["bytes"], bool)
                and meta["bytes"] >= 0 and isinstance(meta.get("crc32"), str) and len(meta["crc32"]) == 8):
            raise TypeError(f"file entry {rel[:80]!r} is not {{bytes, crc32}}")
    return dict(files)


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """A complete shard: its example range, position count, file checksums and statistics."""

    index: int
    example_start: int
    example_stop: int
    positions: int
    files: dict  # relative path -> {"bytes": int, "crc32": "8 hex digits"}
    stats: dict = dataclasses.field(default_factory=dict)  # {"topk_mass_sum": float, "entropy_sum": ...}

    @property
    def payload_bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "status": "complete"}

    @classmethod
    def from_json(cls, d: dict, shard: int | None = None) -> "ShardRecord":
        try:
            ints = [d[k] for k in ("index", "example_start", "example_stop", "positions")]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
                raise TypeError("index, example_start, example_stop and positions must be integers >= 0")
            stats = d.get("stats", {})
            if not isinstance(stats, dict):
                raise TypeError("stats is not an object")
            return cls(*ints, _check_files(d["files"], shard), dict(stats))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptStoreError(f"the record of shard {shard} is malformed ({e!r}); rerun generate-labels with "
                                    "--repair to redo the shard", shard) from None


@dataclasses.dataclass
class Manifest:
    """The store's root document: spec, tool version, and (once finalized) the shard table."""

    spec: StoreSpec
    tool_version: str
    finalized: bool = False
    shards: list[ShardRecord] = dataclasses.field(default_factory=list)

    def to_bytes(self) -> bytes:
        table = {r.index: r.to_json() for r in self.shards}
        shards = [
            table.get(i, {"index": i, "example_start": a, "example_stop": b, "status": "pending"})
            for i, (a, b) in ((i, self.spec.shard_range(i)) for i in range(self.spec.num_shards))
        ]
        return dumps_checked(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "tool_version": self.tool_version,
                "finalized": self.finalized,
                **self.spec.to_json(),
                "shards": shards,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        d = loads_checked(data, "manifest.json")
        if d.get("format") != FORMAT_NAME:
            raise StoreError("manifest.json is not a distill soft-label store manifest; check the path")
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptStoreError(f"manifest.json has no valid format_version ({str(version)[:20]}); {REGENERATE}")
        if version > FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"the store has format version {version}, newer than this distill reads ({FORMAT_VERSION}): upgrade distill"
            )
        try:
            spec = StoreSpec.from_json({key: d[key] for key in _FIELD_TYPES} | _optional(d, OPTIONAL_KEYS))
            table = d["shards"]
            if not isinstance(table, list) or len(table) != spec.num_shards or not all(isinstance(s, dict) for s in table):
                raise ValueError(f"the shard table does not list the {spec.num_shards} shards of the plan")
            complete = [(i, ShardRecord.from_json(s, i)) for i, s in enumerate(table) if s.get("status") == "complete"]
            if any((r.index, (r.example_start, r.example_stop)) != (i, spec.shard_range(i)) for i, r in complete):
                raise ValueError("the shard table does not follow the shard plan")
            shards = [r for _, r in complete]
            if not isinstance(d["finalized"], bool) or not isinstance(d["tool_version"], str):
                raise TypeError("finalized or tool_version has the wrong type")
            if d["finalized"] and len(shards) != spec.num_shards:
                raise ValueError("a finalized manifest must list every shard as complete")
            return cls(spec=spec, tool_version=d["tool_version"], finalized=d["finalized"], shards=shards)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise CorruptStoreError(f"manifest.json is malformed ({str(e)[:120]!r}); {REGENERATE}") from None
        except StoreError as e:  # a spec value out of range: the same damage, said as such
            if isinstance(e, CorruptStoreError):
                raise
            raise CorruptStoreError(f"manifest.json is malformed ({e}); {REGENERATE}") from None
