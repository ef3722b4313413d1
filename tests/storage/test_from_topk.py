"""SoftLabels.from_topk: labels from top-k ids and log-probabilities alone, checked against float64 references."""

import math

import mpmath
import pytest
import torch

from distill.errors import ConfigError
from distill.pipeline.losses import TopKDistillationLoss
from distill.storage import BACKENDS, SoftLabels, open_store, topk_labels
from distill.storage.synthetic import zipf_logits

from storehelp import K, V, write_store


def _reference_tail(logprobs) -> float:
    """log(1 - sum exp(logprobs)) with 60 significant digits."""
    with mpmath.workdps(60):
        return float(mpmath.log(1 - mpmath.fsum(mpmath.exp(mpmath.mpf(float(x))) for x in logprobs)))


def test_tail_matches_a_60_digit_reference_near_empty_and_near_full():
    g = torch.Generator().manual_seed(0)
    rows = []
    for mass in (1e-9, 0.3, 0.5, 0.9, 1 - 1e-6, 1 - 1e-9):  # the top k hold almost nothing, ..., almost everything
        share = torch.rand(K, generator=g, dtype=torch.float64) + 0.1
        rows.append(torch.log(share / share.sum() * mass))
    logprobs = torch.stack(rows)  # (6, K) float64
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in rows])
    labels = SoftLabels.from_topk(ids, logprobs)
    # float64 inputs pin the mass to ~1e-16: a tail of 1e-9 is known to ~1e-7 of itself
    for row, tail in zip(logprobs, labels.tail_logprob):
        reference = _reference_tail(row.tolist())
        assert float(tail) == pytest.approx(reference, rel=1e-6, abs=1e-6)
    assert labels.tempered_lse.shape == (6, 0) and labels.temperatures == ()
    assert torch.equal(labels.offsets, torch.arange(7))


def test_equals_what_stage_one_computes_from_the_full_logits():
    g = torch.Generator().manual_seed(1)
    logits = zipf_logits(40, V, g).double()
    exact = topk_labels(logits.float(), K, lengths=[10, 0, 30])
    # the same ids in a shuffled order, log-probabilities from a float64 log_softmax
    logprobs = torch.log_softmax(logits, 1).gather(1, exact.topk_ids)
    shuffle = torch.argsort(torch.rand(40, K, generator=g), 1)
    labels = SoftLabels.from_topk(exact.topk_ids.gather(1, shuffle), logprobs.gather(1, shuffle),
                                  offsets=exact.offsets)
    assert torch.equal(labels.topk_ids, exact.topk_ids)  # sorted back, values following
    torch.testing.assert_close(labels.topk_logprobs, exact.topk_logprobs, rtol=0, atol=2e-5)
    torch.testing.assert_close(labels.tail_logprob, exact.tail_logprob, rtol=0, atol=2e-5)
    assert labels.num_examples == 3 and labels.example(2).num_positions == 30

    student = torch.randn(40, V, generator=g)
    loss = TopKDistillationLoss("kl", temperature=1.0, alpha=0.0)
    # the (k+1)-bucket KL in float64, by hand
    p = torch.cat([logprobs, torch.log1p(-logprobs.exp().sum(1, keepdim=True))], 1).exp()
    s = torch.log_softmax(student.double(), 1)
    q = torch.cat([s.gather(1, exact.topk_ids), torch.log1p(-s.gather(1, exact.topk_ids).exp().sum(1, keepdim=True))], 1)
    naive = (p * (p.log() - q)).sum(1).mean()
    assert float(loss(student, labels)["soft"]) == pytest.approx(float(naive), rel=1e-4)


def test_refuses_a_position_whose_mass_exceeds_one_and_scales_one_within_tolerance():
    ids = [[1, 2], [3, 4], [5, 6]]
    good, hair, over = [math.log(0.25), math.log(0.5)], [math.log(0.5), math.log(0.5 + 1e-5)], [-0.1, -0.2]
    with pytest.raises(ConfigError, match=r"^position 2's probabilities sum to 1\.72.*, more than 1: pass"):
        SoftLabels.from_topk(ids, [good, hair, over])
    labels = SoftLabels.from_topk(ids[:2], [good, hair])
    assert float(labels.tail_logprob[0]) == pytest.approx(math.log(0.25))
    assert labels.tail_logprob[1] == float("-inf")  # a hair over 1 (rounding): no tail, the k scaled to 1
    assert float(labels.topk_logprobs[1].double().exp().sum()) == pytest.approx(1.0, abs=1e-6)
    for bad_ids, bad_lp in (([[1, 1]], [[-1.0, -2.0]]), ([[-1, 2]], [[-1.0, -2.0]]), ([[1, 2]], [[float("nan"), -2.0]])):
        with pytest.raises(ConfigError, match="^position 0 has a negative or repeated id"):
            SoftLabels.from_topk(bad_ids, bad_lp)
    with pytest.raises(ConfigError, match="offsets"):
        SoftLabels.from_topk(ids[:2], [good, hair], offsets=[0, 3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_store_writer_takes_them_and_reads_them_back(tmp_path, backend):
    g = torch.Generator().manual_seed(2)
    logits = zipf_logits(30, V, g).double()
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(30)])
    logprobs = torch.log_softmax(logits, 1).gather(1, ids)
    labels = SoftLabels.from_topk(ids, logprobs, offsets=[0, 4, 4, 11, 30])
    write_store(tmp_path / "s", labels, backend=backend, per_shard=2)
    back = open_store(str(tmp_path / "s")).read_all()
    assert torch.equal(back.topk_ids, labels.topk_ids) and torch.equal(back.offsets, labels.offsets)
    torch.testing.assert_close(back.topk_logprobs, labels.topk_logprobs)
    torch.testing.assert_close(back.tail_logprob, labels.tail_logprob)
