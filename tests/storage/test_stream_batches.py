"""LabelStream's fast paths give the very batches of the plain ones: whole-batch gathers from an ExampleSet
(equal to collating its items one by one) and packed batches across DataLoader workers (equal to unpacked)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distill.pipeline.batching import PackedBatch, pack_batch
from distill.pipeline.diskarrays import ArrayWriter
from distill.pipeline.examples import ExampleSet
from distill.pipeline.runtime import to_device
from distill.storage import open_store
from distill.storage import stream as stream_module
from distill.storage.stream import LabelStream
from storehelp import make_labels, write_store

N = 57


class ItemByItem:
    """The same examples without ``gather``: LabelStream collates them one item at a time."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]

    def collate(self, items):
        return self.data.collate(items)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = tmp_path_factory.mktemp("stream-batches") / "s"
    write_store(url, make_labels("topk", n_examples=N, seed=5), per_shard=5)
    return open_store(str(url))


def _packed_lm(disk: bool = False) -> ExampleSet:
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 12, N)
    t = int(lengths.sum())
    keep = _on_disk if disk else (lambda a, dtype=None: a)
    return ExampleSet("causal-lm", input_ids=keep(rng.integers(0, 99, t), np.int32), lengths=lengths,
                      position_mask=keep(rng.random(t) < 0.8),
                      position_ids=keep(np.concatenate([np.arange(m) % 5 for m in lengths]), np.int32))


def _features(disk: bool = False) -> ExampleSet:
    rng = np.random.default_rng(4)
    inputs = rng.standard_normal((N, 7)).astype(np.float32)
    return ExampleSet("classification", inputs=_on_disk(inputs) if disk else inputs, labels=rng.integers(0, 3, N))


def _on_disk(a: np.ndarray, dtype=None):
    writer = ArrayWriter(dtype or a.dtype, a.shape[1:])
    writer.append(a)
    return writer.finish()


def _batches(data, store, workers=0, batch_size=4, shuffle_buffer=12, skip=3, **loader):
    stream = LabelStream(data, store, batch_size=batch_size, seed=2, shuffle_buffer=shuffle_buffer,
                         workers=max(workers, 1))
    stream.set_epoch(1, skip=skip)
    batches = DataLoader(stream, batch_size=None, num_workers=workers, **loader)
    return [to_device(b, torch.device("cpu")) for b in batches]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("with_store", [True, False])
def test_gathered_batches_equal_item_by_item_ones(store, with_store):
    data = _packed_lm()
    _same(_batches(data, store if with_store else None), _batches(ItemByItem(data), store if with_store else None))


@pytest.mark.parametrize("workers", [1, 2])
def test_packed_batches_from_workers_equal_unpacked_ones(store, workers):
    data = _packed_lm()
    plain = _batches(data, store, workers)  # the order depends on the number of workers, not on packing
    stream = LabelStream(data, store, batch_size=4, seed=2, shuffle_buffer=12, workers=workers)
    stream.set_epoch(1, skip=3)
    raw = list(DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=pack_batch))
    assert all(isinstance(b, PackedBatch) for b in raw)
    _same([to_device(b, torch.device("cpu")) for b in raw], plain)


@pytest.mark.parametrize("make", [_packed_lm, _features])
@pytest.mark.parametrize("with_store", [True, False])
@pytest.mark.parametrize("sizes", [(4, 12, 3), (16, 3, 0)])
def test_on_disk_examples_are_read_a_shuffle_block_at_a_time_into_the_same_batches(store, with_store, make, sizes,
                                                                                monkeypatch):
    """Blocks of 15 examples and batches of 4, some spanning two blocks, the epoch's first 3 skipped; or blocks
    of one 5-example shard and batches of 16, each spanning three or four."""
    labels, (batch_size, buffer, skip) = store if with_store else None, sizes
    sized = dict(batch_size=batch_size, shuffle_buffer=buffer, skip=skip)
    want = _batches(make(), labels, **sized)
    data = make()
    for batch in want:  # each batch holds the examples it names, all of them (what the in-memory path gathers)
        examples = data.gather(batch["example_index"])
        _same([{k: batch[k] for k in examples}], [examples])
    assert sum(len(b["example_index"]) for b in want) == len(data) - skip * batch_size
    made = []
    real = ExampleSet.resident
    monkeypatch.setattr(ExampleSet, "resident", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    _same(_batches(make(disk=True), labels, **sized), want)
    assert made and all(m is not None and not m.on_disk() for m in made)  # each block held in memory
    made.clear()
    monkeypatch.setattr(stream_module, "RESIDENT_BYTES", 16)  # too big to hold: read a batch at a time
    _same(_batches(make(disk=True), labels, **sized), want)
    assert made == [None] * len(made) and made
