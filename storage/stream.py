"""Streaming a store joined to its dataset: the input pipeline of stage two.

``LabelStream`` is an ``IterableDataset`` of ready batches: the dataset's collated inputs
(and hard labels) for B examples, joined by example index to those examples' soft labels
from the store, gathered with index tensors. Memory is bounded: each DataLoader worker
holds one block of decoded shards (about ``shuffle_buffer`` examples, rounded up to whole
shards), the same block's examples when they are on disk and take at most RESIDENT_BYTES
(read at once, ``ExampleSet.resident``), one batch, and the DataLoader's prefetch; nothing
grows with the store.

Order, for a given seed and epoch, is deterministic:

1. the store's shards are permuted (seeded by seed and epoch); rank r of W takes every W-th
   one, so ranks stream disjoint shares;
2. within a rank, DataLoader worker w of N takes every N-th of those shards;
3. each worker reads its shards in blocks of at least ``shuffle_buffer`` examples, shuffles
   each block's examples (seeded by seed, epoch, rank, worker) and groups them into batches
   of B examples (a batch may span two blocks; the worker's last batch may be short);
4. the DataLoader interleaves its workers' batches round-robin.

Because the order is a pure function of (seed, epoch, rank, workers), a resumed run skips
the batches it already trained on (``set_epoch(epoch, skip=n)``) and sees exactly the
batches an uninterrupted run would. Without a store (training on hard labels only) the
"shards" are fixed runs of ``chunk_examples`` examples.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from distill.storage.labels import POSITION_FIELDS, SoftLabels, concat_labels

__all__ = ["LabelStream", "labels_from_batch"]

# a shuffle block's examples are read into memory at once when they take at most this (else a batch at a time)
RESIDENT_BYTES = 64 << 20
BUFFER_POSITIONS = 65536  # default shuffle block: ~50 MB of decoded labels at k=64 (ids int64 + values float32)
SOFT_FIELDS = ("offsets", *POSITION_FIELDS)


class LabelStream(IterableDataset):
    """Batches of ``examples`` joined with their soft labels from ``store`` (or none).

    examples:  anything with ``__len__``, ``__getitem__(i) -> dict`` and ``collate(items)``
               (``distill.pipeline.data.ExampleSet``).
    store:     a ``StoreReader`` over the same examples, or None.
    shuffle_buffer: examples per shuffled block; None: about 65,536 positions' worth.
    temperature: the loss's temperature: the teacher's tempered log-probabilities at it are worked out
               here (``SoftLabels.with_tempered``, once per shuffled block, in the DataLoader worker)
               and travel with the batch as ``soft_pretempered_*``, so the training step does not.
    Yields dicts: the collated example tensors, ``example_index`` (B,), and, with a store,
    ``soft_<field>`` tensors of the batch's ``SoftLabels`` (see ``labels_from_batch``).
    """

    def __init__(self, examples, store=None, *, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True, shuffle_buffer: int | None = None, chunk_examples: int = 1024, workers: int = 0,
                 temperature: float = 1.0):
        self.examples, self.store, self.temperature = examples, store, float(temperature)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        if shuffle_buffer is None:  # about BUFFER_POSITIONS positions' worth of examples, at least a batch
            per = store.num_positions / max(1, store.spec.num_examples) if store is not None else 1.0
            shuffle_buffer = max(batch_size, int(BUFFER_POSITIONS / max(per, 1.0)))
        self.shuffle, self.shuffle_buffer = shuffle, max(1, shuffle_buffer)
        self.workers = max(1, workers)  # how many DataLoader workers will share this rank's shards
        if store is not None:
            spec = store.spec
            self.ranges = [spec.shard_range(i) for i in range(spec.num_shards)]
        else:
            n = len(examples)
            self.ranges = [(a, min(a + chunk_examples, n)) for a in range(0, n, chunk_examples)] or [(0, 0)]
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Stream ``epoch``'s order, leaving out its first ``skip`` batches (already trained on)."""
        self.epoch, self.skip = epoch, skip

    # --- the plan: which shards each rank and worker streams this epoch ---------------------

    def rank_shards(self, epoch: int, rank: int) -> list[int]:
        order = list(range(len(self.ranges)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}/shards").shuffle(order)
        return order[rank :: self.world]

    def worker_batches(self, epoch: int, rank: int) -> list[int]:
        """Batches each of this rank's workers yields in ``epoch``."""
        shards = self.rank_shards(epoch, rank)
        counts = []
        for w in range(self.workers):
            n = sum(self.ranges[i][1] - self.ranges[i][0] for i in shards[w :: self.workers])
            counts.append(-(-n // self.batch_size))
        return counts

    def batches(self, epoch: int, rank: int | None = None) -> int:
        """Batches rank ``rank`` (default: this one) streams in ``epoch``."""
        return sum(self.worker_batches(epoch, self.rank if rank is None else rank))

    def _worker_plan(self) -> tuple[list[int], int]:
        """Batches each worker skips so the interleaved stream skips ``self.skip``, and the rotation.

        The DataLoader takes workers' batches round-robin from worker 0, passing exhausted
        ones. After skipping, the next batch is due from some worker j, but a new DataLoader
        starts at worker 0: so its worker i plays the part of worker (i + j) % N.
        """
        counts = self.worker_batches(self.epoch, self.rank)
        taken, left, turn = [0] * len(counts), self.skip, 0
        while left > 0 and any(t < c for t, c in zip(taken, counts)):
            for w, c in enumerate(counts):
                if left > 0 and taken[w] < c:
                    taken[w] += 1
                    left -= 1
                    turn = (w + 1) % len(counts)
        return taken, turn

    # --- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if n_workers != self.workers:
            raise RuntimeError(f"LabelStream was planned for {self.workers} worker(s) but runs in {n_workers}")
        skips, turn = self._worker_plan()
        part = (worker + turn) % n_workers  # the part of the epoch this worker streams (see _worker_plan)
        shards = self.rank_shards(self.epoch, self.rank)[part::n_workers]
        skip = skips[part]
        rng = torch.Generator().manual_seed(random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{part}").getrandbits(62))
        # a batch begun in the previous block: its global ids, their labels, and the ids it is gathered by
        pending: tuple[torch.Tensor, SoftLabels | None] | None = None
        pending_at = None
        produced = 0
        for ids, labels in self._blocks(shards, rng):
            # the block's examples (and the pending ones) in memory when they are on disk; ``at``: where to gather
            source, at = self._resident(ids if pending is None else torch.cat([pending[0], ids]))
            if pending is not None:  # finish the batch begun in the previous block
                pending_at, at = at[: len(pending[0])], at[len(pending[0]) :]
                need = self.batch_size - len(pending[0])
                head, rest = ids[:need], ids[need:]
                part = None if labels is None else labels.examples(0, len(head))  # slices: no gather per batch
                ids_b, at_b = torch.cat([pending[0], head]), torch.cat([pending_at, at[:need]])
                labels_b = None if labels is None else concat_labels([pending[1], part])
                if labels is not None:
                    labels = labels.examples(len(head), len(ids))
                ids, at = rest, at[need:]
                if len(ids_b) < self.batch_size:
                    pending, pending_at = (ids_b, labels_b), at_b
                    continue
                if produced >= skip:
                    yield self._collate(ids_b, labels_b, source, at_b)
                produced += 1
                pending = None
            full = len(ids) // self.batch_size * self.batch_size
            for a in range(0, full, self.batch_size):
                if produced >= skip:
                    yield self._collate(ids[a : a + self.batch_size],
                                        None if labels is None else labels.examples(a, a + self.batch_size),
                                        source, at[a : a + self.batch_size])
                produced += 1
            if full < len(ids):
                pending = (ids[full:], None if labels is None else labels.examples(full, len(ids)))
                pending_at = at[full:]
        if pending is not None and produced >= skip:
            yield self._collate(*pending, source, pending_at)

    def _resident(self, ids: torch.Tensor) -> tuple[object, torch.Tensor]:
        """(what to gather ``ids`` from, the index of each there): the examples themselves, or a copy of just
        these in memory (``ExampleSet.resident``, at most RESIDENT_BYTES) when they are on disk."""
        if not hasattr(self.examples, "resident") or not len(ids):
            return self.examples, ids
        unique, at = torch.unique(ids, sorted=True, return_inverse=True)  # ascending: the shards' runs, few reads
        block = self.examples.resident(unique, RESIDENT_BYTES)
        return (self.examples, ids) if block is None else (block, at)

    def _blocks(self, shards: list[int], rng: torch.Generator) -> Iterator[tuple[torch.Tensor, SoftLabels | None]]:
        """Consecutive runs of this worker's shards holding at least ``shuffle_buffer`` examples,
        their examples in a seeded random order: (global example ids (n,), their labels in that order)."""
        block: list[int] = []
        for n, index in enumerate(shards):
            block.append(index)
            size = sum(self.ranges[i][1] - self.ranges[i][0] for i in block)
            if size >= self.shuffle_buffer or n == len(shards) - 1:
                ids = torch.cat([torch.arange(*self.ranges[i]) for i in block])
                labels = None
                if self.store is not None:
                    labels = concat_labels([self.store.read_shard(i) for i in block])
                if self.shuffle:
                    order = torch.randperm(len(ids), generator=rng)
                    ids = ids[order]
                    labels = None if labels is None else labels.select(order)
                if labels is not None and self.temperature in labels.temperatures:
                    labels = labels.with_tempered(self.temperature)
                yield ids, labels
                block = []

    def _collate(self, ids: torch.Tensor, labels: SoftLabels | None, source, at: torch.Tensor) -> dict:
        """The batch of examples ``ids`` (B,) joined to ``labels`` (theirs, in that order), gathered from
        ``source`` at ``at`` (``_resident``). The soft fields are slices of the shuffled block, not copies:
        the trainer's DataLoader packs each batch into one new buffer (``distill.pipeline.batching.pack_batch``)
        to cross to it."""
        if hasattr(source, "gather"):  # an ExampleSet: whole-batch gathers, not one item at a time
            out = source.gather(at)
        else:
            out = source.collate([source[int(e)] for e in at])
        out["example_index"] = ids.clone()
        if labels is not None:
            for field in SOFT_FIELDS:
                value = getattr(labels, field)
                if value is not None:
                    out[f"soft_{field}"] = value
            if labels.pretempered is not None:  # the temperature in the names: reading it back needs no device sync
                at = repr(labels.pretempered[0])
                out[f"soft_pretempered_logprobs@{at}"], out[f"soft_pretempered_tail@{at}"] = labels.pretempered[1:]
        return out


def labels_from_batch(batch: dict, temperatures: tuple[float, ...]) -> SoftLabels:
    """The batch's ``SoftLabels`` back from its ``soft_*`` tensors (on whatever device they are)."""
    pre = None
    for name in batch:
        if name.startswith("soft_pretempered_logprobs@"):
            at = name.partition("@")[2]
            pre = (float(at), batch[name], batch[f"soft_pretempered_tail@{at}"])
    return SoftLabels(offsets=batch["soft_offsets"], temperatures=temperatures, pretempered=pre,
                      **{name: batch.get(f"soft_{name}") for name in POSITION_FIELDS})
