"""Whole-batch gathering equals per-item collation; packed batches unpack to the same tensors."""

import numpy as np
import pytest
import torch

from distill.pipeline import batching
from distill.pipeline.batching import PackedBatch, pack_batch, take_ranges, take_rows, unpack_batch
from distill.pipeline.diskarrays import ArrayWriter
from distill.pipeline.examples import ExampleSet


def _on_disk(a: np.ndarray, dtype=None):
    writer = ArrayWriter(dtype or a.dtype, a.shape[1:])
    writer.append(a)
    return writer.finish()


def _sets(disk: bool) -> dict[str, ExampleSet]:
    """One ExampleSet of every kind: features, ragged token ids (classification), causal-lm with a position
    mask, and packed causal-lm with position ids (some examples empty of kept positions, lengths 1 to 9)."""
    rng = np.random.default_rng(0)
    n = 23
    lengths = rng.integers(1, 10, n)
    t = int(lengths.sum())
    ids, mask = rng.integers(0, 500, t), rng.random(t) < 0.7
    pos = np.concatenate([np.arange(m) % 4 for m in lengths])  # documents of 4 tokens packed per example
    store = (lambda a, dtype=None: _on_disk(np.asarray(a), dtype)) if disk else (lambda a, dtype=None: a)
    return {
        "features": ExampleSet("classification", inputs=store(rng.standard_normal((n, 6)).astype(np.float32)),
                               labels=rng.integers(0, 4, n)),
        "token-classes": ExampleSet("classification", input_ids=store(ids, np.int32), lengths=lengths,
                                    labels=rng.integers(0, 4, n)),
        "lm-masked": ExampleSet("causal-lm", input_ids=store(ids, np.int32), lengths=lengths,
                                position_mask=store(mask)),
        "lm-packed": ExampleSet("causal-lm", input_ids=store(ids), lengths=lengths, position_mask=store(mask),
                                position_ids=store(pos, np.int32)),
    }


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("kind", ["features", "token-classes", "lm-masked", "lm-packed"])
def test_gather_equals_collate_of_the_items(kind, disk):
    data = _sets(disk)[kind]
    g = torch.Generator().manual_seed(1)
    for index in (torch.randperm(len(data), generator=g)[:8], torch.tensor([5, 5, 0, 22, -1]), torch.tensor([3]),
                  torch.arange(len(data))):
        _same(data.gather(index), data.collate([data[int(i)] for i in index]))


def test_gather_refuses_an_index_out_of_range():
    data = _sets(False)["features"]
    with pytest.raises(IndexError):
        data.gather(torch.tensor([0, 23]))


class CountingReads:
    """An on-disk-like array (numpy behind ``a[start:stop]``) that counts its reads."""

    def __init__(self, a):
        self.a, self.dtype, self.shape, self.reads = a, a.dtype, a.shape, 0

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None
        self.reads += 1
        return self.a[key].copy()


def test_on_disk_runs_are_read_in_groups_and_come_back_in_order(monkeypatch):
    monkeypatch.setattr(batching, "GAP_BYTES", 1000 * 12)  # runs under 1,000 rows of 12 bytes apart: one read
    rng = np.random.default_rng(2)
    a = rng.standard_normal((5000, 3)).astype(np.float32)
    starts = torch.tensor([4000, 10, 12, 4990, 11, 700, 3])
    lengths = torch.tensor([3, 2, 0, 10, 4, 1, 1])
    want = np.concatenate([a[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist())])
    disk = CountingReads(a)
    assert np.array_equal(take_ranges(disk, starts, lengths).numpy(), want)
    assert disk.reads == 2  # nearby runs (rows 3 to 700) share a read, and so do 4000 to 5000
    rows = torch.from_numpy(rng.integers(0, 5000, 300))
    assert np.array_equal(take_rows(CountingReads(a), rows).numpy(), a[rows.numpy()])
    empty = take_ranges(CountingReads(a), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (0, 3)


def test_a_packed_batch_unpacks_to_equal_tensors_of_every_dtype():
    batch = {"f": torch.randn(3, 5), "i": torch.arange(7), "b": torch.tensor([True, False, True]),
             "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3), "scalar": torch.tensor(2.5),
             "empty": torch.zeros(0, 4, dtype=torch.int64), "h": torch.randn(5).half(), "t": torch.arange(12)[::2]}
    packed = pack_batch(batch)
    assert isinstance(packed, PackedBatch) and packed.buffer.dtype == torch.uint8
    for got in (unpack_batch(packed.buffer, packed.layout), packed.to(torch.device("cpu"))):
        _same(got, batch)


@pytest.mark.parametrize("numel", [0, 1000, 3 << 20])  # under PIPE_BYTES: as bytes; over it: in shared memory
def test_a_packed_batch_crosses_a_process_boundary_whole(numel):
    import gc
    import pickle

    from multiprocessing.reduction import ForkingPickler  # the pickler DataLoader workers use

    import torch.multiprocessing  # noqa: F401 (registers torch's reductions with it)

    batch = {"ids": torch.arange(numel), "mask": torch.arange(numel) % 3 == 0}
    back = pickle.loads(bytes(ForkingPickler.dumps(pack_batch(batch))))
    gc.collect()  # the buffer must keep its memory alive by itself
    _same(back.to(torch.device("cpu")), batch)
