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

import numpy as np

__all__ = ["Sequences", "documents_to_sequences"]


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Sequences cut or packed from documents, and what happened to the documents' tokens."""

    input_ids: np.ndarray
    """(T',) int64: every sequence's token ids, end to end."""
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
