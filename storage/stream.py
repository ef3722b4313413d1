"""Streaming a store joined to its dataset: the input pipeline of stage two.

``LabelStream`` is an ``IterableDataset`` of ready batches: the dataset's collated inputs
(and hard labels) for B examples, joined by example index to those examples' soft labels
from the store. Memory is bounded: each DataLoader worker holds at most its shuffle buffer
plus the shards that buffer draws from, and the DataLoader's prefetch.

Order, for a given seed and epoch, is deterministic:

1. the store's shards are permuted (seeded by seed and epoch); rank r of W takes every W-th
   one, so ranks stream disjoint shares;
2. within a rank, DataLoader worker w of N takes every N-th of those shards;
3. each worker passes its examples through a shuffle buffer (seeded by seed, epoch, rank,
   worker) and groups them into batches of B examples (the last one may be short);
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

from distill.storage.labels import SoftLabels, concat_labels

__all__ = ["LabelStream", "labels_from_batch"]

SOFT_FIELDS = ("offsets", "topk_ids", "topk_logprobs", "tail_logprob", "tempered_lse", "counts", "token_index")


class LabelStream(IterableDataset):
    """Batches of ``examples`` joined with their soft labels from ``store`` (or none).

    examples:  anything with ``__len__``, ``__getitem__(i) -> dict`` and ``collate(items)``
               (``distill.pipeline.data.ExampleSet``).
    store:     a ``StoreReader`` over the same examples, or None.
    Yields dicts: the collated example tensors, ``example_index`` (B,), and, with a store,
    ``soft_<field>`` tensors of the batch's ``SoftLabels`` (see ``labels_from_batch``).
    """

    def __init__(self, examples, store=None, *, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True, shuffle_buffer: int = 4096, chunk_examples: int = 1024, workers: int = 0):
        self.examples, self.store = examples, store
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
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

    def _worker_skips(self) -> list[int]:
        """How many of its own batches each worker skips so the interleaved stream skips ``self.skip``."""
        counts = self.worker_batches(self.epoch, self.rank)
        taken, left = [0] * len(counts), self.skip
        while left > 0 and any(t < c for t, c in zip(taken, counts)):
            for w, c in enumerate(counts):  # the DataLoader's round-robin, passing exhausted workers
                if left > 0 and taken[w] < c:
                    taken[w] += 1
                    left -= 1
        return taken

    # --- iteration -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if n_workers != self.workers:
            raise RuntimeError(f"LabelStream was planned for {self.workers} worker(s) but runs in {n_workers}")
        shards = self.rank_shards(self.epoch, self.rank)[worker::n_workers]
        skip = self._worker_skips()[worker]
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/buffer")
        batch: list[tuple[int, SoftLabels | None]] = []
        produced = 0
        for item in self._shuffled(shards, rng):
            batch.append(item)
            if len(batch) == self.batch_size:
                if produced >= skip:
                    yield self._collate(batch)
                produced += 1
                batch = []
        if batch and produced >= skip:
            yield self._collate(batch)

    def _shuffled(self, shards: list[int], rng: random.Random) -> Iterator[tuple[int, SoftLabels | None]]:
        buffer: list[tuple[int, SoftLabels | None]] = []
        for index in shards:
            a, b = self.ranges[index]
            labels = self.store.read_shard(index) if self.store is not None else None
            for e in range(a, b):
                item = (e, None if labels is None else labels.example(e - a))
                if not self.shuffle:
                    yield item
                    continue
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _collate(self, batch: list[tuple[int, SoftLabels | None]]) -> dict:
        out = self.examples.collate([self.examples[e] for e, _ in batch])
        out["example_index"] = torch.tensor([e for e, _ in batch], dtype=torch.int64)
        if self.store is not None:
            labels = concat_labels([lab for _, lab in batch])
            for field in SOFT_FIELDS:
                value = getattr(labels, field)
                if value is not None:
                    out[f"soft_{field}"] = value
        return out


def labels_from_batch(batch: dict, temperatures: tuple[float, ...]) -> SoftLabels:
    """The batch's ``SoftLabels`` back from its ``soft_*`` tensors (on whatever device they are)."""
    return SoftLabels(
        offsets=batch["soft_offsets"],
        topk_ids=batch["soft_topk_ids"],
        topk_logprobs=batch["soft_topk_logprobs"],
        tail_logprob=batch["soft_tail_logprob"],
        tempered_lse=batch["soft_tempered_lse"],
        temperatures=temperatures,
        counts=batch.get("soft_counts"),
        token_index=batch.get("soft_token_index"),
    )
