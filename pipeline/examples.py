"""ExampleSet: a loaded dataset as whole arrays, its items, batches and fingerprint.

``distill.pipeline.data.load_data`` builds one from the spec a user passes; the rules for
what becomes an example (and a position) are in that module's docstring. The per-token
arrays it loads live in temporary files (``distill.pipeline.diskarrays``), so memory does
not grow with the data; arrays handed in directly (small data, tests) stay in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.pipeline.batching import take_ranges, take_rows, token_batch
from distill.pipeline.diskarrays import DiskArray
from distill.pipeline.fingerprint import Fingerprint
from distill.pipeline.tasks import TASKS

__all__ = ["ExampleSet"]


def _tensor(a: Any, dtype: np.dtype) -> torch.Tensor:
    """A C-contiguous tensor that owns its (copied) memory."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return torch.from_numpy(np.array(a, dtype=dtype, order="C"))


def _array(a: Any, dtypes: tuple) -> np.ndarray | DiskArray | None:
    """A DiskArray as it is (its dtype one of ``dtypes``), else a C-contiguous numpy copy of
    dtype ``dtypes[-1]``: the dtype items are handed out in."""
    if a is None or isinstance(a, DiskArray):
        assert a is None or a.dtype in dtypes, (a.dtype, dtypes)
        return a
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.array(a, dtype=dtypes[-1], order="C")


def _slice(a: np.ndarray | DiskArray, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows start:end of ``a`` as a tensor of ``dtype`` that owns its memory."""
    return torch.from_numpy(np.array(a[start:end])).to(dtype)


def _hash(fp: Fingerprint, name: str, a: np.ndarray | DiskArray, dtype: np.dtype) -> None:
    """Feed ``a`` to ``fp`` as an array of ``dtype`` (what the items hand out), in blocks when on disk."""
    if isinstance(a, DiskArray):
        fp.blocks(name, dtype, a.shape, a.chunks())
    else:
        fp.tensor(name, np.asarray(a, dtype))


class ExampleSet:
    """Examples held as whole arrays, of which items are slices.

    Float features: ``inputs`` (N, F) float32. Token ids: one flat (T,) array (int64, or int32
    on disk) with offsets (N+1,), and for causal-lm an optional flat (T,) bool position mask
    and, for packed documents, flat (T,) position ids; items hand ids and position ids out as
    int64 whatever their storage. Each per-token array, and the features, is either in memory
    or a ``DiskArray``. Labels (N,) int64 in both, -1 = none. ``stats``
    says what the documents became (documents, sequences, tokens, positions, dropped_tokens,
    packed, stride; see ``distill.pipeline.documents``); empty when not known.
    """

    def __init__(self, task: str, *, inputs=None, input_ids=None, lengths=None, labels=None,
                 position_mask=None, num_classes: int | None = None, vocab_size: int | None = None,
                 position_ids=None, stats: dict | None = None):
        """Either ``inputs`` (N, F) or ``input_ids`` (T,) flat with ``lengths`` (N,); ``labels``
        (N,) (default all -1); ``position_mask`` (T,) bool and ``position_ids`` (T,) int64 for
        causal-lm. Arrays are copied, unless they are DiskArrays, which are kept as they are."""
        assert task in TASKS and (inputs is None) != (input_ids is None)
        self.task = task
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self._inputs = _array(inputs, (np.float32,))
        self._ids = _array(input_ids, (np.int32, np.int64))
        self._offsets = None if lengths is None else np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._mask = _array(position_mask, (np.bool_,))
        self._position_ids = _array(position_ids, (np.int32, np.int64))
        self.stats = dict(stats or {})
        n = len(self._inputs) if inputs is not None else len(self._offsets) - 1
        self._labels = torch.full((n,), -1, dtype=torch.int64) if labels is None else _tensor(labels, np.int64)
        assert len(self._labels) == n
        assert self._offsets is None or self._offsets[-1] == len(self._ids)
        assert self._mask is None or (task == "causal-lm" and len(self._mask) == len(self._ids))
        assert self._position_ids is None or (task == "causal-lm" and len(self._position_ids) == len(self._ids))
        self._fingerprint: str | None = None

    @property
    def has_position_mask(self) -> bool:
        """True when examples mark positions to skip (causal-lm only)."""
        return self._mask is not None

    @property
    def packed(self) -> bool:
        """True when examples carry position ids: several documents packed per sequence."""
        return self._position_ids is not None

    def on_disk(self) -> list[DiskArray]:
        """The arrays kept in temporary files (ids, position mask, position ids, features); [] when all in memory."""
        arrays = (self._inputs, self._ids, self._mask, self._position_ids)
        return [a for a in arrays if isinstance(a, DiskArray)]

    @property
    def num_features(self) -> int | None:
        """F for float features, else None."""
        return None if self._inputs is None else int(np.prod(self._inputs.shape[1:]))

    @property
    def lengths(self) -> torch.Tensor | None:
        """Tokens per example (N,) int64 for token ids, else None."""
        return None if self._offsets is None else torch.from_numpy(np.diff(self._offsets))

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for {n} examples")
        i = int(i) % n
        if self._inputs is not None:
            return {"inputs": _slice(self._inputs, i, i + 1, torch.float32)[0], "labels": self._labels[i].clone()}
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        item = {"input_ids": _slice(self._ids, start, end, torch.int64)}
        if self.task == "classification":
            item["labels"] = self._labels[i].clone()
            return item
        if self._mask is not None:
            item["position_mask"] = _slice(self._mask, start, end, torch.bool)
        if self._position_ids is not None:
            item["position_ids"] = _slice(self._position_ids, start, end, torch.int64)
        return item

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Items -> a batch: inputs (B, F) and labels (B,); or input_ids and attention_mask
        (B, Lmax) right-padded with 0, plus labels (B,) or position_mask (B, Lmax) bool and
        position_index (P,) int64, the flat indices into the B * Lmax tokens of the kept
        positions: computed here, on the host, so no device has to tell the host how many
        positions a batch keeps (see ``distill.pipeline.tasks.position_logits``). Packed items
        add position_ids (B, Lmax) int64; padding continues its row's last position, so it
        joins the row's last document (Hugging Face finds documents where positions do not
        step by 1), and no real token attends to it in a causal model."""
        if "inputs" in items[0]:
            return {"inputs": torch.stack([it["inputs"] for it in items]),
                    "labels": torch.stack([it["labels"] for it in items])}
        lengths = [len(it["input_ids"]) for it in items]
        input_ids = torch.zeros(len(items), max(lengths), dtype=torch.int64)  # (B, Lmax)
        attention_mask = torch.zeros_like(input_ids)
        for row, (item, n) in enumerate(zip(items, lengths)):
            input_ids[row, :n] = item["input_ids"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.task == "classification":
            batch["labels"] = torch.stack([it["labels"] for it in items])
            return batch
        position_mask = attention_mask.bool()
        for row, (item, n) in enumerate(zip(items, lengths)):
            if "position_mask" in item:
                position_mask[row, :n] &= item["position_mask"]
        batch["position_mask"] = position_mask
        batch["position_index"] = position_mask.reshape(-1).nonzero()[:, 0]
        if "position_ids" in items[0]:
            position_ids = torch.zeros_like(input_ids)
            for row, (item, n) in enumerate(zip(items, lengths)):
                last = item["position_ids"][-1]
                position_ids[row, :n] = item["position_ids"]
                position_ids[row, n:] = last + torch.arange(1, input_ids.shape[1] - n + 1)
            batch["position_ids"] = position_ids
        return batch

    def gather(self, index) -> dict[str, torch.Tensor]:
        """The batch of examples ``index`` (B,) int64, equal to ``collate([self[i] for i in index])``,
        built with whole-batch gathers (``distill.pipeline.batching``), not one item at a time."""
        n = len(self)
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if len(index) and not (-n <= int(index.min()) and int(index.max()) < n):
            raise IndexError(f"example index out of range for {n} examples")
        index = index % max(n, 1)
        labels = self._labels.index_select(0, index)  # (B,)
        if self._inputs is not None:
            return {"inputs": take_rows(self._inputs, index).to(torch.float32), "labels": labels}
        starts = torch.from_numpy(self._offsets[index.numpy()])  # (B,)
        lengths = torch.from_numpy(self._offsets[index.numpy() + 1]) - starts  # (B,)
        runs = {name: None if array is None else take_ranges(array, starts, lengths)
                for name, array in (("input_ids", self._ids), ("position_mask", self._mask),
                                    ("position_ids", self._position_ids))}
        return token_batch(self.task, lengths=lengths, labels=labels, **runs)

    def resident(self, index, max_bytes: int) -> "ExampleSet | None":
        """Examples ``index`` (n,) int64, in that order, as a new ExampleSet held in memory; None when this one
        is in memory already or they would take more than ``max_bytes``.

        A training stream reads a whole shuffle block's examples at once (its shards' rows are long runs, a few
        large reads) and gathers each batch from memory: gathering a shuffled batch from the on-disk arrays
        takes a read per run of nearby rows, 60-odd for a batch of 256 mnist1d-sized examples (2 ms, about
        as long as that student's training step). ``gather`` on the result at i equals ``gather`` here at
        ``index[i]``."""
        if not self.on_disk():
            return None
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        common = dict(labels=self._labels.index_select(0, index), num_classes=self.num_classes,
                      vocab_size=self.vocab_size)
        if self._inputs is not None:
            if len(index) * self.num_features * 4 > max_bytes:
                return None
            return ExampleSet(self.task, inputs=take_rows(self._inputs, index).numpy(), **common)
        starts = torch.from_numpy(self._offsets[index.numpy()])
        lengths = torch.from_numpy(self._offsets[index.numpy() + 1]) - starts
        arrays = {"input_ids": self._ids, "position_mask": self._mask, "position_ids": self._position_ids}
        token_bytes = sum(8 if name != "position_mask" else 1 for name, a in arrays.items() if a is not None)
        if int(lengths.sum()) * token_bytes > max_bytes:  # as held in memory: ids and position ids int64
            return None
        runs = {name: None if a is None else take_ranges(a, starts, lengths).numpy() for name, a in arrays.items()}
        return ExampleSet(self.task, lengths=lengths.numpy(), **runs, **common)

    def fingerprint(self) -> str:
        """sha256 over the task and what the teacher sees, in order (not the hard labels)."""
        if self._fingerprint is None:
            fp = Fingerprint("dataset").text("task", self.task)
            if self._inputs is not None:
                _hash(fp, "inputs", self._inputs, np.float32)
            else:
                fp.tensor("lengths", np.diff(self._offsets))
                _hash(fp, "input_ids", self._ids, np.int64)  # as int64 whatever the storage: stores match old data
                if self._mask is not None:
                    _hash(fp, "position_mask", self._mask, np.bool_)
                if self._position_ids is not None:
                    _hash(fp, "position_ids", self._position_ids, np.int64)
            self._fingerprint = fp.hexdigest()
        return self._fingerprint

    def head(self, n: int) -> "ExampleSet":
        """The first ``n`` examples (all when there are fewer). Its stats count the stored
        tokens of the examples left out as dropped (an overlap of --stride counted too)."""
        if n >= len(self):
            return self
        common = dict(labels=self._labels[:n], num_classes=self.num_classes, vocab_size=self.vocab_size)
        if self._inputs is not None:
            return ExampleSet(self.task, inputs=_head(self._inputs, n), **common)
        end = int(self._offsets[n])
        stats = self.stats and {**self.stats, "sequences": n,
                                "dropped_tokens": self.stats.get("dropped_tokens", 0) + len(self._ids) - end}
        return ExampleSet(self.task, input_ids=_head(self._ids, end), lengths=np.diff(self._offsets[: n + 1]),
                          position_mask=_head(self._mask, end), position_ids=_head(self._position_ids, end),
                          stats=stats, **common)

    def __repr__(self) -> str:
        what = f"features={self.num_features}" if self._inputs is not None else f"tokens={len(self._ids)}"
        return f"ExampleSet(task={self.task!r}, examples={len(self)}, {what})"


def _head(a: np.ndarray | DiskArray | None, rows: int) -> np.ndarray | DiskArray | None:
    """The first ``rows`` rows of ``a``; a DiskArray's share its file."""
    return None if a is None else a.head(rows) if isinstance(a, DiskArray) else a[:rows]
