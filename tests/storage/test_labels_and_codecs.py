"""Soft-label extraction and the value codecs against naive float64 references."""

import numpy as np
import pytest
import torch
from distill.storage import ValueEncoding, draw, sampled_labels, topk_labels
from distill.storage.codecs import decode_labels, encode_labels
from distill.storage.labels import largest


def _logits(p=40, v=120, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p, v, generator=g, dtype=torch.float64) * scale


def test_topk_labels_match_dense_float64():
    logits = _logits()
    labels = topk_labels(logits, 10, temperatures=(2.0, 0.5))
    dense = torch.log_softmax(logits, 1)  # (P, V)
    ref_vals, ref_ids = dense.topk(10, 1)
    assert torch.equal(labels.topk_ids, ref_ids.sort(1).values)
    assert torch.allclose(labels.topk_logprobs.double(), dense.gather(1, labels.topk_ids), atol=1e-5)
    ref_tail = dense.scatter(1, ref_ids, float("-inf")).logsumexp(1)
    assert torch.allclose(labels.tail_logprob.double(), ref_tail, atol=1e-5)
    assert labels.temperatures == (2.0, 0.5)
    for j, t in enumerate((2.0, 0.5)):
        assert torch.allclose(labels.tempered_lse[:, j].double(), (dense / t).logsumexp(1), atol=1e-4)


@pytest.mark.parametrize("temperatures", [(2.0,), (4.0, 2.0), (2.0, 0.5), (0.5,), (3.0,), (1.5, 2.0), (4.0, 3.0), ()])
@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_every_temperature_set_and_the_tail_draws_match_float64(temperatures, scale):
    """Each temperature's normaliser is a power of the one exp pass, taken in place in any order: every set
    gives the float64 labels, and the tail draws come from the T = 1 tail whatever else was computed."""
    logits = _logits(p=60, v=700, seed=3, scale=scale)
    labels = topk_labels(logits.float(), 8, temperatures=temperatures, tail_samples=16,
                         generator=torch.Generator().manual_seed(5))
    dense = torch.log_softmax(logits, 1)
    assert torch.allclose(labels.topk_logprobs.double(), dense.gather(1, labels.topk_ids), atol=2e-5)
    ref_tail = dense.scatter(1, labels.topk_ids, float("-inf")).logsumexp(1)
    assert (labels.tail_logprob.double() - ref_tail).abs().max() < 1e-4
    for j, t in enumerate(temperatures):
        assert torch.allclose(labels.tempered_lse[:, j].double(), (dense / t).logsumexp(1), atol=1e-4, rtol=0)
    # the same ids as drawn from the dense reference's T = 1 tail
    want = draw(dense.exp().scatter(1, labels.topk_ids, 0.0).float(), 16, torch.Generator().manual_seed(5))
    assert torch.equal(labels.tail_ids, want[0]) and torch.equal(labels.tail_counts, want[1].int())


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0, 40.0])
def test_tail_is_exact_from_flat_to_very_peaked(scale):
    """Both tail paths (1 - kept mass, and the exact pass for tails under 1e-3) against float64."""
    logits = _logits(p=200, v=3000, seed=1, scale=scale)
    labels = topk_labels(logits.float(), 16, temperatures=(2.0,))
    dense = torch.log_softmax(logits, 1)
    ref_tail = dense.scatter(1, labels.topk_ids, float("-inf")).logsumexp(1)
    # log-space error 1e-4: under 0.01% of the tail mass, however small the tail
    assert (labels.tail_logprob.double() - ref_tail).abs().max() < 1e-4
    assert torch.allclose(labels.tempered_lse[:, 0].double(), (dense / 2.0).logsumexp(1), atol=1e-5)


def test_topk_with_k_equal_vocab_has_empty_tail():
    labels = topk_labels(_logits(v=16), 16)
    assert bool(torch.isneginf(labels.tail_logprob).all())


def test_sampled_labels_are_consistent_and_seeded():
    logits = _logits(v=50)
    a = sampled_labels(logits, 12, generator=torch.Generator().manual_seed(1))
    b = sampled_labels(logits, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.counts, b.counts)
    assert bool((a.counts.sum(1) == 12).all())
    dense = torch.log_softmax(logits, 1)
    live = a.counts > 0
    assert bool((a.topk_ids[:, 1:] >= a.topk_ids[:, :-1]).all())
    for row in range(len(logits)):
        ids = a.topk_ids[row][live[row]]
        assert len(ids.unique()) == len(ids)  # live slots hold distinct ids
        assert torch.allclose(a.topk_logprobs[row][live[row]].double(), dense[row, ids], atol=1e-5)
        outside = dense[row].clone()
        outside[ids] = float("-inf")
        assert torch.allclose(a.tail_logprob[row].double(), outside.logsumexp(0), atol=1e-5)
    assert bool(torch.isneginf(a.topk_logprobs[~live]).all())


def test_sampled_draws_follow_the_teacher():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    labels = sampled_labels(logits, 1, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(labels.topk_ids[:, 0], minlength=4).double() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0].double(), 0), atol=0.03)


def test_systematic_draws_never_land_on_a_zero_weight_id_even_at_the_largest_offset(monkeypatch):
    """With the offset at its largest, (u + m - 1) / m * total rounds to the total in float32: the last
    point must still fall on the last weighted id, not on the zero-weight ids after it."""
    weights = torch.tensor([[0.0, 0.2, 0.17, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full(shape, 1 - 2**-24, dtype=kw.get("dtype")))
    ids, counts = draw(weights, 48, sampling="systematic")
    assert set(ids[counts > 0].tolist()) <= {1, 2} and int(counts.sum()) == 48


@pytest.mark.parametrize("k,v", [(8, 300), (64, 5000)])
def test_sqrt_codes_kl_within_documented_bound(k, v):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(500, v, generator=g) * 2.5
    labels = topk_labels(logits, k)
    enc = ValueEncoding("sqrt", 255)
    back = decode_labels(encode_labels(labels, v, enc), k, enc, ())
    p = torch.cat([labels.topk_logprobs, labels.tail_logprob[:, None]], 1).double()
    q = torch.cat([back.topk_logprobs, back.tail_logprob[:, None]], 1).double()
    kl = (p.exp() * (p - q)).sum(1)
    p_max = labels.topk_logprobs.double().exp().amax(1)
    bound = k * p_max / (6 * 255**2)  # FORMAT.md: about k p_max / (6 L^2) per position
    assert float(kl.mean()) < 2 * float(bound.mean())
    assert float(kl.mean()) > 0.1 * float(bound.mean())  # the estimate is not vacuous either


def test_encoder_sorts_unsorted_ids_and_keeps_pairs():
    labels = topk_labels(_logits(v=60), 6)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    shuffled = labels.examples(0, labels.num_examples)
    shuffled.topk_ids, shuffled.topk_logprobs = labels.topk_ids[:, perm], labels.topk_logprobs[:, perm]
    enc = ValueEncoding("lossless")
    back = decode_labels(encode_labels(shuffled, 60, enc), 6, enc, ())
    assert torch.equal(back.topk_ids, labels.topk_ids) and torch.equal(back.topk_logprobs, labels.topk_logprobs)
    assert np.all(np.diff(back.topk_ids.numpy(), axis=1) > 0)


@pytest.mark.parametrize("bits", [4, 6, 8, 12, 16])
def test_value_bits_round_trip_within_one_step(bits):
    """Codes of 2^bits - 1 levels in the smallest dtype; decoded sqrt(p / p_max) within half a step of the truth."""
    k, v = 16, 400
    labels = topk_labels(torch.randn(300, v, generator=torch.Generator().manual_seed(bits)) * 2.5, k)
    enc = ValueEncoding.from_bits(bits)
    assert enc.levels == 2**bits - 1 and enc.to_json() == {"name": "sqrt", "levels": 2**bits - 1}
    columns = encode_labels(labels, v, enc)
    assert columns["logprob_codes"].dtype == (np.uint8 if bits <= 8 else np.uint16)
    back = decode_labels(columns, k, enc, ())
    assert torch.equal(back.topk_ids, labels.topk_ids)
    exact, got = labels.topk_logprobs.double(), back.topk_logprobs.double()
    root = (0.5 * (exact - exact.amax(1, keepdim=True))).exp()  # (P, K) sqrt(p / p_max) in float64
    root_back = (0.5 * (got - got.amax(1, keepdim=True))).exp()
    assert float((root - root_back).abs().max()) <= 0.5 / enc.levels + 1e-6  # float32 logs: ~1e-7 relative
    q = torch.cat([got, back.tail_logprob[:, None].double()], 1)
    assert torch.allclose(q.exp().sum(1), torch.ones(len(q), dtype=torch.float64), atol=1e-5)
    if bits >= 6:  # FORMAT.md's estimate k p_max / (6 L^2) holds once few entries fall in the zero bin
        p = torch.cat([exact, labels.tail_logprob[:, None].double()], 1)
        kl = (p.exp() * (p - q)).sum(1)
        bound = k * exact.exp().amax(1) / (6 * enc.levels**2)
        assert float(kl.mean()) < 2 * float(bound.mean()) + 1e-7  # + the float32 decode's floor (12, 16 bits)


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_value_bits_out_of_range_is_refused(bits):
    with pytest.raises(ValueError, match="value bits must be 2 to 16"):
        ValueEncoding.from_bits(bits)


@pytest.mark.parametrize("bits", [4, 12])
def test_store_with_value_bits_reads_back_on_every_backend(backend, store_url, bits):
    """A store written with any levels records them in its manifest, and the reader decodes with them."""
    from distill.storage import open_store
    from storehelp import by_id, make_labels, write_store

    labels = make_labels("topk", n_examples=40)
    enc = ValueEncoding.from_bits(bits)
    write_store(store_url, labels, backend=backend, encoding=enc)
    reader = open_store(store_url)
    assert reader.spec.value_encoding == enc and reader.summary()["value_encoding"] == enc.to_json()
    back = reader.read_all()
    ids, lp, _ = by_id(labels)
    assert torch.equal(back.topk_ids, ids)
    root = (0.5 * (lp - lp.amax(1, keepdim=True))).double().exp()
    root_back = (0.5 * (back.topk_logprobs - back.topk_logprobs.amax(1, keepdim=True))).double().exp()
    assert float((root - root_back).abs().max()) <= 0.5 / enc.levels + 1e-6


@pytest.mark.parametrize("v", [4096, 5003, 9000])  # whole blocks, a short last block; 9000: k = 64 searched twice
@pytest.mark.parametrize("k", [1, 4, 9, 64])
@pytest.mark.parametrize("wider", [0, 13])  # contiguous rows, and rows of a wider tensor (the blocks gathered)
def test_largest_finds_what_topk_finds(v, k, wider):
    x = (torch.randn(50, v + wider, generator=torch.Generator().manual_seed(k + v)) * 3)[:, :v]
    x[0, -7:] = 50.0  # the largest values in the short last block (or the last whole one)
    x[1] = float("-inf")
    x[1, 3] = 0.0  # one finite value; the rest of the top k are -inf
    values, ids = largest(x, k)
    ref_values, ref_ids = x.topk(k, dim=1)
    assert torch.equal(values, ref_values)
    assert torch.equal(x.gather(1, ids), ref_values)  # ids hold exactly those values (ties may pick other ids)
    assert all(len(set(row.tolist())) == k for row in ids)  # distinct ids
    assert torch.equal(ids[2:], ref_ids[2:])  # no ties among random values: the same ids


def test_topk_labels_of_a_large_vocabulary_match_dense_float64():
    """The block search and the block sums (V = 5,003, a short last block) against float64 log_softmax."""
    logits = _logits(p=30, v=5003, seed=3, scale=4.0)
    labels = topk_labels(logits, 16, temperatures=(2.0, 0.5))
    dense = torch.log_softmax(logits, 1)
    ref_ids = dense.topk(16, 1).indices
    assert torch.equal(labels.topk_ids, ref_ids.sort(1).values)
    assert torch.allclose(labels.topk_logprobs.double(), dense.gather(1, labels.topk_ids), atol=1e-5)
    assert torch.allclose(labels.tail_logprob.double(), dense.scatter(1, ref_ids, float("-inf")).logsumexp(1), atol=1e-5)
    for j, t in enumerate((2.0, 0.5)):
        assert torch.allclose(labels.tempered_lse[:, j].double(), (dense / t).logsumexp(1), atol=1e-4)


def _systematic_reference(weights: torch.Tensor, m: int, offset: torch.Tensor) -> torch.Tensor:
    """Systematic draws on one float64 cumulative sum over each whole row (P, m)."""
    cdf = weights.double().cumsum(1)
    total = cdf[:, -1:]
    points = (offset.double() + torch.arange(m, dtype=torch.float64)) / m * total
    points = torch.minimum(points, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, points, right=True).clamp_max(weights.shape[1] - 1)


@pytest.mark.parametrize("v", [5, 300, 6144, 8192, 8203])  # one cumulative sum; blocks (V >= 4 m BLOCK)
def test_systematic_draws_in_blocks_equal_one_float64_cumulative_sum(v):
    g = torch.Generator().manual_seed(v)
    weights = torch.rand(40, v, generator=g) ** 8  # heavy and light ids
    weights[:, torch.randint(0, v, (v // 3,), generator=g)] = 0.0  # kept ids weigh nothing
    weights[3] = 0.0  # a row with no tail
    ids, counts = draw(weights, 48, torch.Generator().manual_seed(1))
    offset = torch.rand(40, 1, generator=torch.Generator().manual_seed(1))  # the offsets draw takes
    ref = _systematic_reference(weights, 48, offset)
    for row in range(40):
        if row == 3:
            assert int(counts[row].sum()) == 0
            continue
        want = torch.bincount(ref[row], minlength=v)
        got = torch.zeros(v, dtype=torch.int64).index_add_(0, ids[row], counts[row])
        assert torch.equal(got, want)
    assert bool((weights.gather(1, ids)[counts > 0] > 0).all())
