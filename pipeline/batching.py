"""Whole-batch gathering and packing: what turns example indices into one batch quickly.

``ExampleSet.gather`` builds a batch from its arrays with a few whole-batch gathers
(``take_rows``, ``take_ranges``, ``token_batch``) instead of one slice, dict and copy per
example: the same tensors ``ExampleSet.collate`` makes from the items, at a fraction of
the per-batch cost (the classifier's training step takes ~3 ms, and 256 per-item slices
took ~10 ms).

``PackedBatch`` carries a batch across the DataLoader's worker boundary as one byte
buffer instead of one shared-memory tensor per field (each of which costs a file
descriptor, a socket round trip and a memory map in the training process): the worker
packs (``pack_batch``, the loader's ``collate_fn``), the pin-memory thread pins the one
buffer, and the training process copies it to the device once and unpacks views of it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["take_rows", "take_ranges", "token_batch", "PackedBatch", "pack_batch", "unpack_batch"]

PIPE_BYTES = 1 << 20  # packed batches up to this size cross to the training process as bytes, larger in shared memory
ALIGN = 64  # byte alignment of each field in a packed buffer: every dtype's views (and vector loads) line up


GAP_BYTES = 64 << 10  # on-disk runs closer than this are read together: a read costs about as much as a 64 KiB copy


def take_rows(array: Any, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B,) of an (N, ...) array: a tensor, a numpy array, or an on-disk array whose
    ``a[start:stop]`` reads rows (``distill.pipeline.diskarrays.DiskArray``). Returns (B, ...)."""
    if isinstance(array, torch.Tensor):
        return array.index_select(0, index)
    if isinstance(array, np.ndarray):  # one fancy index: 13 us for 256 rows of 40 floats, the runs' way 44 us
        return torch.from_numpy(np.ascontiguousarray(array[index.numpy()]))
    return take_ranges(array, index, torch.ones_like(index))


def take_ranges(array: Any, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The runs of rows ``array[starts[i] : starts[i] + lengths[i]]`` concatenated: (sum(lengths), ...).

    ``array``: a tensor, a numpy array, or an on-disk array whose ``a[start:stop]`` reads rows
    and which has ``dtype`` and ``shape``: read in as few calls as its runs allow (``GAP_BYTES``)."""
    total = int(lengths.sum())
    # row j of run i sits at starts[i] + (j - first[i]), first[i] = where run i begins in the output
    first = torch.cumsum(lengths, 0) - lengths  # (B,)
    flat = torch.arange(total) + torch.repeat_interleave(starts - first, lengths, output_size=total)  # (total,)
    if isinstance(array, torch.Tensor):
        return array.index_select(0, flat)
    if isinstance(array, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(array[flat.numpy()]))
    return torch.from_numpy(_read_runs(array, starts.numpy(), lengths.numpy(), flat.numpy()))


def _read_runs(array: Any, starts: np.ndarray, lengths: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Rows ``flat`` (the runs' rows in order) of an on-disk array, read as groups of nearby runs."""
    row_bytes = np.dtype(array.dtype).itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    gap = max(1, GAP_BYTES // max(row_bytes, 1))
    used = lengths > 0
    order = np.argsort(starts[used], kind="stable")
    lo, hi = starts[used][order], (starts + lengths)[used][order]  # runs sorted by start
    # a new group where a run starts more than ``gap`` rows past the end of every run before it
    reach = np.maximum.accumulate(hi) if len(hi) else hi
    new = np.ones(len(lo), dtype=bool)
    new[1:] = lo[1:] > reach[:-1] + gap
    begin = np.flatnonzero(new)
    group_lo, group_hi = lo[begin], np.maximum.reduceat(hi, begin) if len(begin) else hi
    out = np.empty((len(flat), *array.shape[1:]), dtype=array.dtype)
    group = np.searchsorted(group_lo, flat, side="right") - 1  # each row's group: the last to begin at or before it
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(len(group_lo) + 1))  # group g: order[bounds[g]:bounds[g + 1]]
    for g, (a, b) in enumerate(zip(group_lo.tolist(), group_hi.tolist())):
        rows = order[bounds[g] : bounds[g + 1]]
        out[rows] = np.asarray(array[a:b])[flat[rows] - a]
    return out


def token_batch(task: str, input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor | None = None,
                position_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> dict:
    """A token batch from its examples' tokens concatenated, as ``ExampleSet.collate`` makes it from items.

    input_ids (T,), position_mask (T,) bool, position_ids (T,): the B examples' tokens one after
    another; lengths (B,) int64; labels (B,) (classification). Returns input_ids and
    attention_mask (B, Lmax) int64 right-padded with 0; labels (B,) for classification; else
    position_mask (B, Lmax) bool, position_index (P,) int64 and, with ``position_ids``,
    position_ids (B, Lmax) int64 whose padding continues each row's last position.
    """
    width = int(lengths.max()) if len(lengths) else 0
    columns = torch.arange(width)  # (Lmax,)
    real = columns[None, :] < lengths[:, None]  # (B, Lmax): row-major order is the tokens' order
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)  # (B, Lmax)
    ids[real] = input_ids.to(torch.int64)
    batch = {"input_ids": ids, "attention_mask": real.to(torch.int64)}
    if task == "classification":
        batch["labels"] = labels.to(torch.int64)
        return batch
    keep = real.clone()
    if position_mask is not None:
        keep[real] = position_mask.to(torch.bool)
    batch["position_mask"] = keep
    batch["position_index"] = keep.reshape(-1).nonzero()[:, 0]
    if position_ids is not None:
        pos = torch.zeros_like(ids)  # (B, Lmax)
        pos[real] = position_ids.to(torch.int64)
        last = pos.gather(1, (lengths - 1).clamp_min(0)[:, None])  # (B, 1) each row's last position
        pad = last + (columns[None, :] - lengths[:, None] + 1)  # (B, Lmax): last + 1, last + 2, ... past the end
        batch["position_ids"] = torch.where(real, pos, pad)
    return batch


class PackedBatch:
    """A dict of tensors held as one byte buffer and a layout ``(name, dtype, shape, byte offset)`` per field."""

    def __init__(self, buffer: torch.Tensor, layout: list[tuple[str, torch.dtype, tuple[int, ...], int]]):
        self.buffer, self.layout = buffer, layout

    def __reduce__(self):
        # Pickled to cross to the training process: a small buffer as bytes through the pipe (three
        # copies of ~100 KB cost less than a shared-memory file, a descriptor sent over a socket and a
        # memory map); a large one as a tensor, which torch's reductions put in shared memory.
        if self.buffer.is_pinned() or self.buffer.numel() > PIPE_BYTES:
            return PackedBatch, (self.buffer, self.layout)
        return _from_bytes, (self.buffer.numpy().tobytes(), self.layout)

    def pin_memory(self) -> "PackedBatch":
        """The same batch in page-locked memory (the DataLoader's pin-memory thread calls this)."""
        return PackedBatch(self.buffer.pin_memory(), self.layout)

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The batch on ``device``: one copy of the buffer (asynchronous when pinned), then views of it."""
        buffer = self.buffer if device.type == "cpu" else self.buffer.to(device, non_blocking=self.buffer.is_pinned())
        return unpack_batch(buffer, self.layout)


def _from_bytes(data: bytes, layout) -> PackedBatch:
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return PackedBatch(buffer, layout)


def pack_batch(batch: dict[str, torch.Tensor]) -> PackedBatch:
    """``batch`` copied into one uint8 buffer, each field at a multiple of ``ALIGN`` bytes."""
    layout, offset = [], 0
    for name, value in batch.items():
        layout.append((name, value.dtype, tuple(value.shape), offset))
        offset += -(-value.numel() * value.element_size() // ALIGN) * ALIGN
    buffer = torch.empty(offset, dtype=torch.uint8)
    for (name, _, _, start), value in zip(layout, batch.values()):
        n = value.numel() * value.element_size()
        if n:
            buffer[start : start + n] = value.contiguous().reshape(-1).view(torch.uint8)
    return PackedBatch(buffer, layout)


def unpack_batch(buffer: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """The fields of a packed ``buffer`` (on any device), as views of it."""
    out = {}
    for name, dtype, shape, start in layout:
        size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        out[name] = buffer[start : start + size].view(dtype).reshape(shape)
    return out
