"""LabelStream: every example once per epoch, joined to its own labels, deterministic, resumable."""

import pytest
import torch
from torch.utils.data import DataLoader

from distill.storage import open_store
from distill.storage.stream import LabelStream, labels_from_batch
from storehelp import make_labels, write_store


class Examples:
    """A stand-in dataset: example e is the tensor [e]."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, e):
        return {"inputs": torch.tensor([float(e)])}

    def collate(self, items):
        return {"inputs": torch.stack([x["inputs"] for x in items])}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    labels = make_labels("topk", n_examples=57, seed=3)
    url = tmp_path_factory.mktemp("stream") / "s"
    write_store(url, labels, per_shard=5)
    return open_store(str(url)), labels


def _batches(stream, workers=0):
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def test_select_gathers_examples_in_any_order():
    labels = make_labels("topk", n_examples=9, seed=1)
    picked = labels.select([4, 0, 4, 7])
    for i, e in enumerate([4, 0, 4, 7]):
        mine, want = picked.example(i), labels.example(e)
        assert torch.equal(mine.topk_ids, want.topk_ids) and torch.equal(mine.topk_logprobs, want.topk_logprobs)


@pytest.mark.parametrize("workers", [0, 2])
def test_each_example_once_with_its_own_labels(store, workers):
    reader, labels = store
    stream = LabelStream(Examples(57), reader, batch_size=4, seed=1, shuffle_buffer=12, workers=max(workers, 1))
    batches = _batches(stream, workers)
    assert len(batches) == stream.batches(0)
    seen = torch.cat([b["example_index"] for b in batches])
    assert sorted(seen.tolist()) == list(range(57)) and seen.tolist() != list(range(57))  # all, shuffled
    for b in batches:
        assert torch.equal(b["inputs"][:, 0].long(), b["example_index"])
        got = labels_from_batch(b, reader.spec.stored_temperatures)
        want = labels.select(b["example_index"])
        assert torch.equal(got.offsets, want.offsets) and torch.equal(got.topk_ids, want.topk_ids)


def test_order_is_deterministic_per_epoch_and_ranks_are_disjoint(store):
    reader, _ = store
    order = lambda epoch, rank=0, world=1: torch.cat([  # noqa: E731
        b["example_index"] for b in _batches(_at(LabelStream(Examples(57), reader, batch_size=4, seed=7, rank=rank,
                                                             world=world, shuffle_buffer=10), epoch))])
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    r0, r1 = order(2, 0, 2), order(2, 1, 2)
    assert not set(r0.tolist()) & set(r1.tolist()) and len(r0) + len(r1) == 57


def _at(stream, epoch, skip=0):
    stream.set_epoch(epoch, skip=skip)
    return stream


@pytest.mark.parametrize("workers, skip", [(0, 5), (2, 3), (2, 8), (3, 7), (3, 13), (2, 14)])
def test_skipping_resumes_exactly_where_an_uninterrupted_epoch_would_be(store, workers, skip):
    reader, _ = store
    make = lambda: LabelStream(Examples(57), reader, batch_size=4, seed=2, shuffle_buffer=10, workers=max(workers, 1))  # noqa: E731
    whole = [b["example_index"] for b in _batches(_at(make(), 1), workers)]
    rest = [b["example_index"] for b in _batches(_at(make(), 1, skip), workers)]
    assert len(rest) == len(whole) - skip and all(torch.equal(a, b) for a, b in zip(whole[skip:], rest))


def test_tail_draws_travel_with_their_positions(tmp_path):
    """Batches carry a store's tail draws, gathered like every other per-position field."""
    labels = make_labels("topk", n_examples=31, seed=8, tail_samples=5)
    write_store(tmp_path / "s", labels, per_shard=4, tail_samples=5)
    stream = LabelStream(Examples(31), open_store(str(tmp_path / "s")), batch_size=6, seed=2, shuffle_buffer=8)
    seen = 0
    for batch in _batches(stream):
        got = labels_from_batch(batch, labels.temperatures)
        want = labels.select(batch["example_index"])
        assert torch.equal(got.tail_counts, want.tail_counts)
        assert torch.equal(got.tail_ids[got.tail_counts > 0], want.tail_ids[want.tail_counts > 0])
        seen += len(batch["example_index"])
    assert seen == 31


def test_tempered_labels_worked_out_ahead_are_what_the_step_would_compute(store):
    """A stream given the loss's temperature works out ``tempered(T)`` per block (in the worker); the labels the
    step rebuilds from the packed batch return exactly the values computed from the stored fields."""
    from distill.pipeline.batching import pack_batch

    reader, labels = store
    t = reader.spec.stored_temperatures[0]
    stream = LabelStream(Examples(57), reader, batch_size=4, seed=1, shuffle_buffer=12, temperature=t)
    for b in _batches(stream):
        got = labels_from_batch(pack_batch(b).to(torch.device("cpu")), reader.spec.stored_temperatures)
        assert got.pretempered is not None and got.pretempered[0] == t
        fresh = labels.select(b["example_index"])  # no precomputed values: tempered() from the stored fields
        assert fresh.pretempered is None
        for mine, want in zip(got.tempered(t), fresh.tempered(t)):
            assert torch.equal(mine, want)
    plain = LabelStream(Examples(57), reader, batch_size=4, seed=1, shuffle_buffer=12)  # T = 1: nothing ahead
    assert not any(name.startswith("soft_pretempered") for b in _batches(plain) for name in b)


def test_tempered_values_follow_their_labels_through_slices_selections_and_concatenation():
    from distill.storage.labels import concat_labels

    labels = make_labels("topk", n_examples=9, seed=5)
    t = labels.temperatures[0]
    ahead = labels.with_tempered(t)
    for derived, fresh in [(ahead.examples(2, 6), labels.examples(2, 6)), (ahead.select([7, 1, 1]), labels.select([7, 1, 1])),
                           (concat_labels([ahead.examples(0, 3), ahead.examples(3, 9)]), labels)]:
        assert derived.pretempered is not None
        for mine, want in zip(derived.tempered(t), fresh.tempered(t)):
            assert torch.equal(mine, want)
    mixed = concat_labels([ahead.examples(0, 3), labels.examples(3, 9)])  # one part without: none kept
    assert mixed.pretempered is None
