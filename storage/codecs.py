"""Value and id encodings: soft labels <-> the plain arrays a shard stores.

Ids are sorted within each position and stored as gaps (``ids_delta``: the first id,
then differences), which a byte-shuffling compressor turns into about
log2(V/k) + 1.5 bits per id instead of log2(V). Values follow their ids.

Value encodings:
    lossless: ``logprobs`` float32 as given; tail and normalisers float32.
    sqrt:     ``logprob_codes`` = round(L * sqrt(p / p_max)), uint8 (L <= 255) or uint16,
              L = 2^bits - 1 for ``ValueEncoding.from_bits`` (2..16 bits; 8 is the default),
              with p_max the position's largest stored probability. Uniform steps in
              sqrt(p) are uniform steps in the Fisher metric, so every entry costs about
              the same KL, about p_max / (6 L^2) nats (less in the zero bin). Decoding
              takes p ~ (c / L)^2 (c = 0 -> (0.25 / L)^2) and rescales the position's
              values so that they and the exact tail sum to 1: the scale p_max need not
              be stored. Tail and tempered normalisers are float16.
Tail draws (a top-k store with ``tail_samples``) are ids and counts only: ``tail_ids_delta``
gap-coded like ``ids_delta``, and ``tail_counts``.

Id codings (``ID_CODINGS``): ``delta`` (the default, above) or ``rank``: the shard's slot ids
renumbered by descending frequency in the shard (ties by id), ``id_order`` (D,) the ids used,
most frequent first, and ``ranks_delta`` (P, K) each position's ranks ascending as gaps, values
and counts following them. Frequent ids get small ranks and small gaps: on a real LM teacher's
logits the top-k ids take about 26% fewer bytes (k = 16 to 64; benchmarks/store.py --real), but
on near-uniform ids (the synthetic workloads) the table makes the shard larger. Tail draws keep
``tail_ids_delta``: they spread over the whole vocabulary and a rank table makes them larger.
See docs/FORMAT.md for the layout.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from distill.storage.labels import SoftLabels

__all__ = ["ValueEncoding", "encode_labels", "decode_labels", "DEFAULT_LEVELS", "VALUE_ENCODINGS", "VALUE_BITS",
           "codes_dtype", "ID_CODINGS"]

# One byte per code: zstd's entropy stage works on bytes, so 255 levels cost about the
# information they carry; more levels (uint16 codes) compress markedly worse.
DEFAULT_LEVELS = 255
_NAMED_LEVELS = {"sqrt": DEFAULT_LEVELS, "lossless": 0}  # what ValueEncoding.named(name) gets, default first
VALUE_ENCODINGS = tuple(_NAMED_LEVELS)
VALUE_BITS = (2, 16)  # the bits ValueEncoding.from_bits accepts, inclusive: 3 to 65,535 levels
ID_CODINGS = ("delta", "rank")  # how a shard stores its slot ids, default first (see the module docstring)


def codes_dtype(levels: int):
    """The smallest unsigned dtype that holds codes 0..levels: uint8 up to 255 levels (8 bits), else uint16."""
    return np.uint8 if levels <= 255 else np.uint16


@dataclasses.dataclass(frozen=True)
class ValueEncoding:
    """How log-probabilities are stored: ``lossless`` or ``sqrt`` with ``levels`` steps.

    ``ValueEncoding()`` is the store's default (sqrt, 255 levels: 8 bits); ``levels`` left out
    takes the name's default (``ValueEncoding("lossless")`` has 0, as ``named`` gives).
    """

    name: str = "sqrt"
    levels: int | None = None

    def __post_init__(self):
        if self.name not in VALUE_ENCODINGS:
            raise ValueError(f"unknown value encoding {self.name!r}: use 'sqrt' (default, lossy) or 'lossless'")
        if self.levels is None:
            object.__setattr__(self, "levels", _NAMED_LEVELS[self.name])
        if self.name == "sqrt" and not 1 <= self.levels <= 65535:
            raise ValueError(f"sqrt encoding needs 1 <= levels <= 65535, got {self.levels}")

    @property
    def lossless(self) -> bool:
        return self.name == "lossless"

    def to_json(self) -> dict:
        return {"name": self.name} if self.lossless else {"name": self.name, "levels": self.levels}

    @classmethod
    def from_json(cls, d: dict) -> "ValueEncoding":
        return cls(name=d["name"], levels=int(d.get("levels", 0)))

    @classmethod
    def from_bits(cls, bits: int) -> "ValueEncoding":
        """``sqrt`` with 2^bits - 1 levels (bits in VALUE_BITS; 8 is the default's 255); others raise ValueError."""
        if not VALUE_BITS[0] <= bits <= VALUE_BITS[1]:
            raise ValueError(f"value bits must be {VALUE_BITS[0]} to {VALUE_BITS[1]}, got {bits}")
        return cls("sqrt", (1 << bits) - 1)

    @classmethod
    def named(cls, name: str) -> "ValueEncoding":
        """The encoding called ``name`` (one of VALUE_ENCODINGS) with its default levels; others raise ValueError."""
        return cls(name, _NAMED_LEVELS.get(name, 0))


def ids_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _numpy(t):
    return None if t is None else (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t))


def encode_labels(labels: SoftLabels, vocab_size: int, encoding: ValueEncoding, id_coding: str = "delta") -> dict[str, np.ndarray]:
    """The arrays of one shard (names as in docs/FORMAT.md) from in-memory labels; ``id_coding`` one of ID_CODINGS."""
    ids = torch.as_tensor(labels.topk_ids)
    logprobs = torch.as_tensor(labels.topk_logprobs).float()
    counts = None if labels.counts is None else torch.as_tensor(labels.counts)
    columns = {"offsets": _numpy(labels.offsets).astype(np.int64)}
    if id_coding == "rank":
        order, rank = _rank_table(ids.numpy(), vocab_size)
        columns["id_order"] = order.astype(ids_dtype(vocab_size))
        ranks, by_rank = _sorted_lookup(rank, ids.numpy())  # (P, K) ranks ascending; values and counts follow
        ids, by_rank = torch.from_numpy(ranks), torch.from_numpy(by_rank.astype(np.int64))
        logprobs = logprobs.gather(1, by_rank)
        counts = None if counts is None else counts.gather(1, by_rank)
    elif bool((ids[:, 1:] < ids[:, :-1]).any()):  # topk_labels sorts on the device; others may not
        ids, order = torch.sort(ids, dim=1)
        logprobs = logprobs.gather(1, order)
        counts = None if counts is None else counts.gather(1, order)
    columns["ranks_delta" if id_coding == "rank" else "ids_delta"] = _gaps(ids).numpy().astype(ids_dtype(vocab_size))
    float_dtype = np.float32 if encoding.lossless else np.float16
    if encoding.lossless:
        columns["logprobs"] = logprobs.numpy()
    else:
        top = logprobs.amax(dim=1, keepdim=True) if logprobs.shape[1] else logprobs
        root = torch.exp(0.5 * (logprobs - top))  # (P, K) sqrt(p / p_max) in [0, 1]; -inf -> 0
        codes = torch.round(root * encoding.levels).numpy()
        columns["logprob_codes"] = codes.astype(codes_dtype(encoding.levels))
    columns["tail_logprob"] = _numpy(labels.tail_logprob).astype(float_dtype)
    lse = _numpy(labels.tempered_lse)
    if lse is not None and lse.shape[1]:
        columns["tempered_lse"] = lse.astype(float_dtype)
    if counts is not None:
        counts = counts.numpy()
        columns["counts"] = counts.astype(np.uint8 if counts.max(initial=0) < 256 else np.uint16)
    if labels.token_index is not None:
        columns["token_index"] = _numpy(labels.token_index).astype(np.int32)
    if labels.tail_ids is not None:
        tail_ids, tail_counts = torch.as_tensor(labels.tail_ids), torch.as_tensor(labels.tail_counts)
        if bool((tail_ids[:, 1:] < tail_ids[:, :-1]).any()):
            tail_ids, order = torch.sort(tail_ids, dim=1)
            tail_counts = tail_counts.gather(1, order)
        columns["tail_ids_delta"] = _gaps(tail_ids).numpy().astype(ids_dtype(vocab_size))
        tail_counts = tail_counts.numpy()
        columns["tail_counts"] = tail_counts.astype(np.uint8 if tail_counts.max(initial=0) < 256 else np.uint16)
    return columns


def _rank_table(ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(id_order (D,), rank (V,)) of the shard's ids (P, K): the D distinct ids by descending count, ties by id."""
    freq = np.bincount(ids.reshape(-1), minlength=vocab_size)  # (V,)
    order = np.argsort(-freq, kind="stable")[: np.count_nonzero(freq)]  # stable: ties stay in id order
    rank = np.zeros(vocab_size, dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return order, rank


def _sorted_lookup(table: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(table[index] sorted ascending within each row, the slot each came from), both (P, K); ties keep slot order.

    One sort of keys value * 2^b + slot (b bits hold a slot), 3x faster than a stable argsort;
    the table (V,) or (D,) is shifted, not the (P, K) values. An index out of the table raises IndexError.
    """
    k = index.shape[1]
    bits = max(1, (k - 1).bit_length())
    dtype = np.int32 if int(table.max(initial=0)) < 1 << (31 - bits) else np.int64
    keys = np.sort((table.astype(dtype) << bits)[index] | np.arange(k, dtype=dtype), axis=1)
    return np.right_shift(keys, bits, dtype=np.int64), keys & ((1 << bits) - 1)


def _gaps(ids: torch.Tensor) -> torch.Tensor:
    """Ascending ids (P, K) -> the first id, then the gaps (>= 0) to each next one."""
    delta = ids.clone()
    delta[:, 1:] -= ids[:, :-1]
    return delta


@functools.lru_cache(maxsize=16)
def _code_tables(levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(log p, p) of each code 0..levels, float32, read-only (cached: every shard reads them); code 0 stands for
    (0.25 / L)^2."""
    root = np.arange(levels + 1, dtype=np.float64) / levels
    root[0] = 0.25 / levels
    p = root * root
    tables = np.log(p).astype(np.float32), p.astype(np.float32)
    for table in tables:
        table.setflags(write=False)
    return tables


def _running_sum(gaps: np.ndarray, rows: int, k: int) -> torch.Tensor:
    """(rows, K) int64 running sums along each row of ``gaps`` (rows * K,) or (rows, K) (rows -1: as many as it holds):
    torch's cumsum, 3-4x numpy's along short rows."""
    return torch.from_numpy(gaps.reshape(rows, k).astype(np.int64)).cumsum_(1)


def decode_labels(
    columns: dict[str, np.ndarray], k: int, encoding: ValueEncoding, temperatures: tuple[float, ...], example_start: int = 0,
    tail_samples: int = 0,
) -> SoftLabels:
    """Soft labels (torch tensors, ids int64 ascending) from a shard's arrays; ``tail_samples`` M > 0 reads the tail draws.

    Either id coding (``ids_delta``, or ``id_order`` with ``ranks_delta``) is read from the arrays present.
    """
    if "ranks_delta" in columns:
        columns = dict(columns)
        ids = torch.from_numpy(_ranks_to_ids(columns, k))
    else:
        ids = _running_sum(columns["ids_delta"], -1, k)  # (P, K)
    n = ids.shape[0]
    tail = np.array(columns["tail_logprob"], dtype=np.float32).reshape(n)
    counts = columns.get("counts")
    if encoding.lossless:
        logprobs = np.array(columns["logprobs"], dtype=np.float32).reshape(n, k)  # a writable copy
    else:
        log_table, p_table = _code_tables(encoding.levels)
        codes = columns["logprob_codes"].reshape(n, k)
        logprobs = np.take(log_table, codes)  # (P, K); take: twice as fast as indexing with the codes
        p = np.take(p_table, codes)
        mass = p.sum(axis=1, dtype=np.float32)
        if counts is not None:  # padding slots hold nothing
            mass -= np.where(counts.reshape(n, k) == 0, p, 0).sum(axis=1, dtype=np.float32)
        target = -np.expm1(tail.astype(np.float64))  # exact top-k mass, 1 - tail
        logprobs += np.log(target / mass).astype(np.float32)[:, None]  # the scale p_max, recovered
    if counts is not None:
        counts = counts.reshape(n, k).astype(np.int32)
        logprobs = np.where(counts == 0, np.float32(-np.inf), logprobs)
    lse = columns.get("tempered_lse")
    lse = np.zeros((n, 0), np.float32) if lse is None else lse.reshape(n, len(temperatures)).astype(np.float32)
    token_index = columns.get("token_index")
    tail_ids = tail_counts = None
    if tail_samples:
        tail_ids = _running_sum(columns["tail_ids_delta"], n, tail_samples)
        tail_counts = torch.from_numpy(columns["tail_counts"].reshape(n, tail_samples).astype(np.int32))
    return SoftLabels(
        offsets=torch.from_numpy(np.array(columns["offsets"], dtype=np.int64)),
        topk_ids=ids,
        topk_logprobs=torch.from_numpy(np.ascontiguousarray(logprobs)),
        tail_logprob=torch.from_numpy(tail),
        tempered_lse=torch.from_numpy(lse),
        temperatures=tuple(temperatures),
        counts=None if counts is None else torch.from_numpy(counts),
        token_index=None if token_index is None else torch.from_numpy(token_index.astype(np.int32)),
        tail_ids=tail_ids,
        tail_counts=tail_counts,
        example_start=example_start,
    )


def _ranks_to_ids(columns: dict[str, np.ndarray], k: int) -> np.ndarray:
    """The ids (P, K) int64 ascending that ``id_order`` + ``ranks_delta`` stand for; the slot columns re-sorted to match."""
    order = columns.pop("id_order")  # (D,)
    delta = columns.pop("ranks_delta").reshape(-1, k)
    total = np.int32 if delta.dtype.itemsize <= 2 and k < 1 << 15 else np.int64  # a dtype no sum of K gaps overflows
    ranks = np.cumsum(delta, axis=1, dtype=total)  # (P, K) ascending
    ids, by_id = _sorted_lookup(order, ranks)  # a rank >= D raises IndexError: a damaged shard
    flat = by_id + np.arange(0, by_id.size, k, dtype=np.int64)[:, None]  # (P, K) indices into the flat columns
    for name in ("logprobs", "logprob_codes", "counts"):
        if name in columns:
            columns[name] = columns[name].reshape(-1)[flat]
    return ids
