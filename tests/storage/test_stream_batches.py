"""LabelStream's fast paths give the very batches of the plain ones: whole-batch gathers from an ExampleSet
(equal to collating its items one by one) and packed batches across DataLoader workers (equal to unpacked)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distill.pipeline.batching import PackedBatch, pack_batch
from distill.pipeline.examples import ExampleSet
from distill.pipeline.runtime import to_device
from distill.storage import open_store
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


def _packed_lm() -> ExampleSet:
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 12, N)
    t = int(lengths.sum())
    return ExampleSet("causal-lm", input_ids=rng.integers(0, 99, t), lengths=lengths, position_mask=rng.random(t) < 0.8,
                      position_ids=np.concatenate([np.arange(m) % 5 for m in lengths]))


def _batches(data, store, workers=0, **loader):
    stream = LabelStream(data, store, batch_size=4, seed=2, shuffle_buffer=12, workers=max(workers, 1))
    stream.set_epoch(1, skip=3)
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
