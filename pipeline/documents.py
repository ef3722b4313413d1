"""Documents to sequences: the one rule that turns tokenised documents into causal-LM examples.

A *document* is one text file, one row of a table (text, token ids or a conversation), or
one item of a user's function, tokenised whole. ``documents_to_sequences`` cuts each into
windows of ``seq_len`` tokens (optionally overlapping by ``stride``), or packs several
into each window with an end-of-text separator. Nothing is dropped unless ``limit`` asks.

Positions (the position at token t predicts token t+1) are stored exactly once per
document token: a window that overlaps the one before it masks out the ``stride``
positions the earlier window already holds.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from distill.pipeline.diskarrays import ArrayWriter

__all__ = ["Sequences", "documents_to_sequences", "write_sequences"]


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Sequences cut or packed from documents, and what happened to the documents' tokens."""

    input_ids: np.ndarray
    """(T',) int64: every sequence's token ids, end to end (a DiskArray from ``write_sequences``)."""
    lengths: np.ndarray
    """(N,) int64 tokens per sequence, 1 <= length <= seq_len."""
    position_mask: np.ndarray | None
    """(T',) bool, aligned with input_ids; None when every position is kept."""
    position_ids: np.ndarray | None
    """(T',) int64 position of each token in its document, restarting at 0 at each window
    start (packing only; None otherwise)."""
    stats: dict
    """documents, sequences, tokens (document tokens, separators not counted), positions
    (kept positions), dropped_tokens (document tokens in no kept sequence: only ``limit``
    drops any), packed, stride."""


def documents_to_sequences(input_ids: np.ndarray, lengths: np.ndarray, seq_len: int, *,
                           position_mask: np.ndarray | None = None, stride: int = 0, pack: bool = False,
                           eos_id: int | None = None, limit: int | None = None) -> Sequences:
    """Documents -> sequences of at most ``seq_len`` tokens.

    ``input_ids`` (T,) int64 holds the documents end to end, ``lengths`` (D,) their token
    counts (empty documents are skipped), ``position_mask`` (T,) bool the positions each
    document keeps (None: all). Windowing (``pack`` False): each document on its own,
    windows start every ``seq_len - stride`` tokens, the last (shorter) one kept whatever
    its length; in every window after a document's first, its first ``stride`` positions
    are masked out. Packing: each document followed by ``eos_id``, all concatenated and
    cut every ``seq_len`` tokens; ``position_ids`` restart at 0 at each document and each
    window; the position at a separator followed by another document in the same window is
    masked out (it would predict across documents), as is every separator's when the
    documents carry masks (a separator is no document's own position). ``limit`` keeps
    only the first ``limit`` sequences. Raises ValueError on arguments that do not fit.
    """
    input_ids = np.asarray(input_ids, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if seq_len < 1 or not 0 <= stride < seq_len or (pack and (stride or eos_id is None)):
        raise ValueError(f"seq_len={seq_len}, stride={stride}, pack={pack}, eos_id={eos_id} do not fit")
    if int(lengths.sum()) != len(input_ids) or (position_mask is not None and len(position_mask) != len(input_ids)):
        raise ValueError("lengths must sum to len(input_ids), and position_mask must align with input_ids")
    mask = None if position_mask is None else np.asarray(position_mask, bool)
    lengths = lengths[lengths > 0]
    cut = _pack if pack else _windows
    ids, seq_lengths, mask_out, position_ids, fresh = cut(input_ids, lengths, mask, seq_len, stride, eos_id)
    if limit is not None and limit < len(seq_lengths):
        end = int(seq_lengths[:limit].sum())
        ids, seq_lengths, fresh = ids[:end], seq_lengths[:limit], fresh[:limit]
        mask_out = None if mask_out is None else mask_out[:end]
        position_ids = None if position_ids is None else position_ids[:end]
    if mask_out is not None and position_mask is None and mask_out.all():
        mask_out = None  # nothing masked: store no mask, as before there was one to store
    stats = {"documents": len(lengths), "sequences": len(seq_lengths), "tokens": len(input_ids),
             "positions": int(len(ids) if mask_out is None else mask_out.sum()),
             "dropped_tokens": len(input_ids) - int(fresh.sum()), "packed": bool(pack), "stride": int(stride)}
    return Sequences(ids, seq_lengths, mask_out, position_ids, stats)


def write_sequences(batches: Iterable[tuple], seq_len: int, *, stride: int = 0, pack: bool = False,
                    eos_id: int | None = None, limit: int | None = None) -> Sequences:
    """``documents_to_sequences`` over documents that come in batches, written to temporary files.

    ``batches`` yields (input_ids (T_b,), lengths (D_b,), position_mask (T_b,) bool or None),
    whole documents each, the same way (all with masks or none). Returns the Sequences that
    ``documents_to_sequences`` returns for all the documents end to end, with the per-token
    arrays as DiskArrays (ids int32 when they fit, position ids int32) and the lengths in
    memory; memory holds one batch at a time. Windows never cross documents, so batches are
    cut alone; packed windows do cross them, so packing carries each batch's unfinished
    window into the next.
    """
    if pack:
        return _write_packed(batches, seq_len, eos_id, limit)
    ids_out, mask_out = ArrayWriter(np.int32), ArrayWriter(np.bool_, check=False)
    lengths, stats, masked = [], _no_stats(False, stride), False
    for ids, doc_lengths, mask in batches:
        remaining = None if limit is None else max(0, limit - sum(map(len, lengths)))
        out = documents_to_sequences(ids, doc_lengths, seq_len, position_mask=mask, stride=stride, limit=remaining)
        ids_out.append(out.input_ids)
        masked |= out.position_mask is not None
        mask_out.append(np.ones(len(out.input_ids), bool) if out.position_mask is None else out.position_mask)
        lengths.append(out.lengths)
        stats = _add_stats(stats, out.stats)
    return Sequences(ids_out.finish(), _concat(lengths), mask_out.finish() if masked else None, None, stats)


def _write_packed(batches, seq_len, eos_id, limit) -> Sequences:
    """Packing in batches, as ``_pack`` packs them all: each batch's stream is cut where the
    global stream is, after the unfinished window the batches before left (``carry``)."""
    ids_out, mask_out, pos_out = ArrayWriter(np.int32), ArrayWriter(np.bool_, check=False), ArrayWriter(np.int32)
    lengths, stats = [], _no_stats(True, 0)
    state = {"start": 0, "fresh": 0, "masked": False, "any_dropped": False}
    carry = None  # (ids, mask, position_ids, is_eos) of the unfinished window, its last token a separator
    for ids, doc_lengths, mask in batches:
        ids, doc_lengths = np.asarray(ids, np.int64), np.asarray(doc_lengths, np.int64)
        stats["tokens"] += len(ids)
        keep = doc_lengths > 0
        doc_lengths, state["masked"] = doc_lengths[keep], state["masked"] or mask is not None
        if not len(doc_lengths):
            continue
        stats["documents"] += len(doc_lengths)
        piece = _pack_piece(ids, doc_lengths, None if mask is None else np.asarray(mask, bool), seq_len, eos_id,
                            state["start"])
        state["start"] += len(piece[0])
        if carry is not None:
            if (len(carry[0])) % seq_len:  # its separator is now followed by a document in the same window
                carry[1][-1] = False
            piece = tuple(np.concatenate([c, p]) for c, p in zip(carry, piece))
        full = len(piece[0]) // seq_len * seq_len
        carry = tuple(p[full:] for p in piece) if full < len(piece[0]) else None
        _emit_windows(tuple(p[:full] for p in piece), seq_len, limit, ids_out, mask_out, pos_out, lengths, stats,
                      state)
    if carry is not None:
        _emit_windows(carry, seq_len, limit, ids_out, mask_out, pos_out, lengths, stats, state)
    stats["dropped_tokens"] = stats["tokens"] - state["fresh"]
    masks = mask_out.finish()
    keep_mask = state["masked"] or state["any_dropped"]  # as documents_to_sequences: no mask when all are kept
    return Sequences(ids_out.finish(), _concat(lengths), masks if keep_mask else None, pos_out.finish(), stats)


def _pack_piece(ids, lengths, mask, seq_len, eos_id, start):
    """``_pack``'s stream for documents that begin at index ``start`` of the whole stream:
    (ids, mask, position_ids, is_eos), the last separator's position still kept."""
    ends = np.cumsum(lengths)  # (D,)
    stream = np.insert(ids, ends, eos_id)  # (T + D,)
    index = np.arange(len(stream)) + start  # (T + D,) in the whole stream
    doc_start = np.repeat(ends - lengths + np.arange(len(lengths)), lengths + 1) + start
    is_eos = np.zeros(len(stream), bool)
    is_eos[ends + np.arange(len(lengths))] = True
    position_ids = index - np.maximum(doc_start, index - index % seq_len)
    out_mask = np.ones(len(stream), bool)
    if mask is not None:
        out_mask[~is_eos] = mask
        out_mask[is_eos] = False
    followed = is_eos & ((index + 1) % seq_len != 0)
    followed[-1] = False  # decided when the next document comes
    out_mask[followed] = False
    return stream, out_mask, position_ids, is_eos


def _emit_windows(piece, seq_len, limit, ids_out, mask_out, pos_out, lengths, stats, state) -> None:
    """Write the windows of ``piece`` (whole windows but for the very last) that ``limit`` leaves."""
    ids, mask, position_ids, is_eos = piece
    sizes = [min(seq_len, len(ids) - s) for s in range(0, len(ids), seq_len)]
    room = len(sizes) if limit is None else max(0, min(len(sizes), limit - stats["sequences"]))
    end = sum(sizes[:room])
    state["any_dropped"] |= not mask[:end].all()
    ids_out.append(ids[:end])
    mask_out.append(mask[:end])
    pos_out.append(position_ids[:end])
    lengths.append(np.asarray(sizes[:room], np.int64))
    stats["sequences"] += room
    stats["positions"] += int(mask[:end].sum())
    state["fresh"] += int((~is_eos[:end]).sum())


def _no_stats(pack: bool, stride: int) -> dict:
    return {"documents": 0, "sequences": 0, "tokens": 0, "positions": 0, "dropped_tokens": 0, "packed": pack,
            "stride": stride}


def _add_stats(total: dict, more: dict) -> dict:
    return {k: v + more[k] if k in ("documents", "sequences", "tokens", "positions", "dropped_tokens") else v
            for k, v in total.items()}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [starts[0], starts[0] + sizes[0]), [starts[1], ...), ... as one (sum(sizes),) array."""
    shift = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)
    return np.arange(int(sizes.sum()), dtype=np.int64) + shift


def _windows(ids, lengths, mask, seq_len, stride, eos_id):
    """Each document cut into windows; returns (ids, lengths, mask, None, document tokens first stored per window)."""
    step = seq_len - stride
    per_doc = 1 + np.maximum(0, -(-(lengths - seq_len) // step))  # (D,) windows per document
    doc = np.repeat(np.arange(len(lengths)), per_doc)  # (N,) document of each window
    k = np.arange(len(doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # (N,) window number in its document
    doc_start = (np.cumsum(lengths) - lengths)[doc]  # (N,)
    start = k * step  # (N,) offset in the document
    sizes = np.minimum(start + seq_len, lengths[doc]) - start  # (N,)
    gather = _ranges(doc_start + start, sizes)  # (T',)
    overlap = np.where(k > 0, stride, 0)  # (N,) positions an earlier window already holds
    out_mask = None
    if mask is not None or stride:
        out_mask = np.ones(len(gather), bool) if mask is None else mask[gather]
        within = np.arange(len(gather)) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # (T',) index in its window
        out_mask &= within >= np.repeat(overlap, sizes)
    return ids[gather], sizes, out_mask, None, sizes - overlap


def _pack(ids, lengths, mask, seq_len, stride, eos_id):
    """Documents, each followed by ``eos_id``, cut every ``seq_len`` tokens; see documents_to_sequences."""
    ends = np.cumsum(lengths)  # (D,) end of each document in ids
    stream = np.insert(ids, ends, eos_id)  # (T + D,)
    doc_start = np.repeat(ends - lengths + np.arange(len(lengths)), lengths + 1)  # (T + D,) in the stream
    index = np.arange(len(stream))
    is_eos = np.zeros(len(stream), bool)
    is_eos[ends + np.arange(len(lengths))] = True
    window_start = index - index % seq_len
    position_ids = index - np.maximum(doc_start, window_start)  # (T + D,)
    out_mask = np.ones(len(stream), bool)
    if mask is not None:
        out_mask[~is_eos] = mask
        out_mask[is_eos] = False
    followed = is_eos & (index + 1 < len(stream)) & ((index + 1) % seq_len != 0)  # next document, same window
    out_mask[followed] = False
    sizes = np.full(len(stream) // seq_len, seq_len, np.int64)
    if len(stream) % seq_len:
        sizes = np.append(sizes, len(stream) % seq_len)
    fresh = np.add.reduceat((~is_eos).astype(np.int64), np.cumsum(sizes) - sizes) if len(sizes) else sizes
    return stream, sizes, out_mask, position_ids, fresh
