"""Distillation losses against naive float64 references: the bucketed divergences equal the dense
ones computed from full logits, gradients pass gradcheck, peaked logits stay finite, and the
sampled cross-entropy is unbiased. Every user-fixable mistake is one ConfigError."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from distill.errors import ConfigError
from distill.pipeline.fused import dense_bucket_loss
from distill.pipeline.losses import (LOSSES, SampledDistillationLoss, TopKDistillationLoss, bucket_divergence,
                                     make_loss, student_buckets)
from distill.storage import native, sampled_labels, topk_labels

SHAPES = [(3, 7, 7), (5, 50, 10), (4, 33, 32), (6, 16, 1)]  # (P, V, K)
SCALES = [0.1, 3.0, 20.0]  # logits from flat to peaked


def logits(p, v, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p, v, generator=g, dtype=torch.float64) * scale


# --- naive references, float64, in probability space -----------------------------------------------


def dense_divergence(kind, p, q, beta=0.5, skew=0.1):
    """(P,) divergence between probability rows (P, B); 0 * log 0 = 0."""
    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(1)
    if kind == "kl":
        return kl(p, q)
    if kind == "reverse-kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    assert kind == "skew-kl"
    return kl(p, skew * p + (1 - skew) * q)


def bucketed(probs, ids):
    """(P, K+1): the probabilities of the ids and the mass of every other id, summed directly."""
    outside = torch.ones_like(probs).scatter_(1, ids, 0.0)
    return torch.cat([probs.gather(1, ids), (probs * outside).sum(1, keepdim=True)], 1)


def random_ids(p, v, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(p)])


# --- the divergences against the dense ones -------------------------------------------------------


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_every_id_kept_each_divergence_equals_the_dense_one(kind, scale, temperature):
    p, v = 5, 40
    t, s = logits(p, v, scale, 1), logits(p, v, scale, 2)
    ids = random_ids(p, v, v, 3)  # all ids, in no particular order: the tail is empty
    teacher_lp = F.log_softmax(t / temperature, 1).gather(1, ids)
    student_lp, student_tail = student_buckets(s, ids, temperature)
    assert torch.all(student_tail == -math.inf)
    no_tail = torch.full((p,), -math.inf, dtype=torch.float64)
    got = bucket_divergence(kind, teacher_lp, no_tail, student_lp, student_tail)
    want = dense_divergence(kind, F.softmax(t / temperature, 1), F.softmax(s / temperature, 1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("p, v, k", SHAPES)
def test_with_k_below_v_each_divergence_equals_the_dense_one_between_bucketed_distributions(kind, scale, p, v, k):
    t, s, temperature = logits(p, v, scale, 4), logits(p, v, scale, 5), 1.5
    ids = random_ids(p, v, k, 6)
    teacher = bucketed(F.softmax(t / temperature, 1), ids)  # (P, K+1)
    student_lp, student_tail = student_buckets(s, ids, temperature)
    got = bucket_divergence(kind, teacher[:, :-1].log(), teacher[:, -1].log(), student_lp, student_tail,
                            beta=0.3, skew=0.2)
    want = dense_divergence(kind, teacher, bucketed(F.softmax(s / temperature, 1), ids), beta=0.3, skew=0.2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("p, v, k", SHAPES)
def test_the_loss_on_stored_labels_uses_the_tempered_normalisers(kind, p, v, k):
    t, s = logits(p, v, 3.0, 7).float(), logits(p, v, 3.0, 8)
    labels = topk_labels(t, k, temperatures=(2.0,))
    for temperature in (1.0, 2.0):
        soft = TopKDistillationLoss(kind, temperature, alpha=0.0)(s, labels)["soft"]
        teacher = bucketed(F.softmax(t.double() / temperature, 1), labels.topk_ids)
        student = bucketed(F.softmax(s / temperature, 1), labels.topk_ids)
        torch.testing.assert_close(soft, dense_divergence(kind, teacher, student).mean(), rtol=1e-6, atol=1e-9)


def test_the_topk_loss_on_sampled_labels_leaves_padding_slots_out():
    t, s = logits(6, 30, 2.0, 9).float(), logits(6, 30, 2.0, 10)
    labels = sampled_labels(t, 12, generator=torch.Generator().manual_seed(0))
    assert (labels.counts == 0).any()  # some padding slots, repeating a kept id
    soft = TopKDistillationLoss("kl", alpha=0.0)(s, labels)["soft"]
    kept = labels.counts > 0
    want = []
    for row in range(6):
        ids = labels.topk_ids[row][kept[row]][None]
        want.append(dense_divergence("kl", bucketed(F.softmax(t[row : row + 1].double(), 1), ids),
                                     bucketed(F.softmax(s[row : row + 1], 1), ids)))
    torch.testing.assert_close(soft, torch.cat(want).mean(), rtol=2e-5, atol=1e-7)


# --- gradients and numerical safety -----------------------------------------------------------------


def test_student_buckets_pass_gradcheck():
    s = logits(3, 6, 2.0, 11).requires_grad_()
    ids = random_ids(3, 6, 4, 12)
    assert torch.autograd.gradcheck(lambda x: student_buckets(x, ids, 1.7), (s,))


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("k", [4, 6])  # 6 == V: both tails empty
def test_each_divergence_passes_gradcheck_with_padding_slots_and_empty_tails(kind, k):
    p, v = 3, 6
    t, s = logits(p, v, 2.0, 13), logits(p, v, 2.0, 14).requires_grad_()
    ids = random_ids(p, v, k, 15)
    kept = torch.ones(p, k, dtype=torch.bool)
    kept[0, -1], ids[0, -1] = False, ids[0, 0]  # a padding slot repeating a kept id
    teacher = bucketed(F.softmax(t, 1), ids)  # the padding slot adds nothing to the tail: it repeats a kept id
    teacher_lp = torch.where(kept, teacher[:, :-1].log(), -math.inf)
    teacher_tail = teacher[:, -1].log()  # -inf on rows whose ids cover the vocabulary

    def loss(x):
        return bucket_divergence(kind, teacher_lp, teacher_tail, *student_buckets(x, ids, 1.3, kept), beta=0.4)

    assert torch.isfinite(loss(s)).all()
    assert torch.autograd.gradcheck(loss, (s,))


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("teacher_scale", [1.0, 80.0])
@pytest.mark.parametrize("k", [62, 63, 64])
def test_peaked_logits_and_k_close_to_v_give_finite_loss_and_gradients(kind, teacher_scale, k):
    t = logits(8, 64, teacher_scale, 16).float()
    s = (logits(8, 64, 60.0, 17).float()).requires_grad_()
    labels = topk_labels(t, k, temperatures=(2.0,))
    for temperature in (1.0, 2.0):
        out = TopKDistillationLoss(kind, temperature, alpha=0.5)(s, labels, t.argmax(1))
        (grad,) = torch.autograd.grad(out["loss"], s)
        assert torch.isfinite(out["loss"]) and torch.isfinite(grad).all()


def test_the_student_tail_keeps_its_digits_far_below_float32_epsilon():
    s = torch.zeros(2, 10)
    s[:, 0] = 60.0  # the mass outside ids {0, 1} is ~8 * exp(-60) ~ 7e-26
    ids = torch.tensor([[0, 1], [0, 1]])
    _, tail = student_buckets(s, ids)
    want = F.log_softmax(s.double(), 1)[:, 2:].logsumexp(1)
    torch.testing.assert_close(tail.double(), want, rtol=1e-6, atol=0)
    # so a teacher with a real tail gives a finite forward KL, not log(0)
    teacher_lp = torch.log(torch.tensor([[0.5, 0.3], [0.5, 0.3]]))
    div = bucket_divergence("kl", teacher_lp, torch.log(torch.tensor([0.2, 0.2])), *student_buckets(s, ids))
    assert torch.isfinite(div).all()


def test_a_student_far_below_the_float32_floor_still_gets_its_gradient():
    s = torch.zeros(1, 6, dtype=torch.float64)
    s[0, 0] = 300.0  # log q of id 1 is -300: finite, so never read as the floor
    s.requires_grad_()
    ids = torch.tensor([[0, 1]])
    teacher_lp, teacher_tail = torch.log(torch.tensor([[0.5, 0.3]])), torch.log(torch.tensor([0.2]))
    div = bucket_divergence("kl", teacher_lp, teacher_tail, *student_buckets(s, ids))
    (grad,) = torch.autograd.grad(div.sum(), s)
    torch.testing.assert_close(grad[0, :2], torch.tensor([0.5, -0.3], dtype=torch.float64), rtol=1e-6, atol=1e-9)


def test_half_precision_student_logits_are_computed_in_float32():
    t, s = logits(4, 20, 2.0, 18).float(), logits(4, 20, 2.0, 19)
    labels = topk_labels(t, 5)
    loss = TopKDistillationLoss("kl", alpha=0.0)
    out = loss(s.bfloat16(), labels)["soft"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss(s.bfloat16().float(), labels)["soft"])


# --- the Hinton mix ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.0), (0.3, 2.0), (1.0, 2.0)])
def test_the_loss_is_alpha_ce_plus_t_squared_soft(alpha, temperature):
    t, s = logits(6, 20, 2.0, 20).float(), logits(6, 20, 2.0, 21)
    labels = topk_labels(t, 5, temperatures=(2.0,))
    hard = torch.tensor([3, -100, 0, 19, -100, 7])
    out = TopKDistillationLoss("jsd", temperature, alpha)(s, labels, hard)
    torch.testing.assert_close(out["loss"], alpha * out["ce"] + (1 - alpha) * temperature**2 * out["soft"])
    keep = hard != -100
    torch.testing.assert_close(out["ce"], F.cross_entropy(s[keep], hard[keep]))


def test_alpha_zero_needs_no_hard_labels_and_alpha_above_zero_does():
    t, s = logits(4, 10, 1.0, 22).float(), logits(4, 10, 1.0, 23)
    labels = topk_labels(t, 3)
    out = TopKDistillationLoss(alpha=0.0, temperature=1.0)(s, labels, None)
    assert out["ce"] is None
    torch.testing.assert_close(out["loss"], out["soft"])
    with pytest.raises(ConfigError, match="--alpha 0"):
        TopKDistillationLoss(alpha=0.5)(s, labels, None)


def test_positions_all_ignored_give_zero_ce_not_nan():
    t, s = logits(3, 10, 1.0, 24).float(), logits(3, 10, 1.0, 25)
    out = TopKDistillationLoss(alpha=0.5)(s, topk_labels(t, 3), torch.full((3,), -100))
    assert out["ce"] == 0.0 and torch.isfinite(out["loss"])


# --- sampled labels ---------------------------------------------------------------------------------


def sampled_vs_dense(temperature, sample_temperature, draws, replicas=500, p=4, v=12):
    """Soft loss and gradient over `replicas` independent draws per position, and the dense ones."""
    t, s = logits(p, v, 1.5, 26).float(), logits(p, v, 1.5, 27).requires_grad_()
    labels = sampled_labels(t.repeat(replicas, 1), draws, generator=torch.Generator().manual_seed(28),
                            sample_temperature=sample_temperature)  # (replicas * P) independent rows
    loss = SampledDistillationLoss(temperature, alpha=0.0, sample_temperature=sample_temperature)
    soft = loss(s.repeat(replicas, 1), labels)["soft"]
    (grad,) = torch.autograd.grad(soft, s)
    target = F.softmax(t.double() / temperature, 1)
    log_q = F.log_softmax(s / temperature, 1)
    dense = -(target * log_q).sum(1).mean()
    (dense_grad,) = torch.autograd.grad(dense, s)
    # standard errors of the mean over replicas * draws independent draws per position
    n = replicas * draws
    se = ((target * log_q**2).sum(1) - (target * log_q).sum(1) ** 2).sum().sqrt().detach() / math.sqrt(n) / p
    grad_se = (target * (1 - target)).sqrt() / math.sqrt(n) / p / temperature
    return soft.detach(), dense.detach(), se, grad, dense_grad, grad_se


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_cross_entropy_is_unbiased_at_the_sampling_temperature(temperature):
    soft, dense, se, grad, dense_grad, grad_se = sampled_vs_dense(temperature, temperature, draws=8)
    assert abs(float(soft - dense)) < 5 * float(se)
    assert ((grad - dense_grad).abs() < 5 * grad_se + 1e-9).all()


def test_sampled_cross_entropy_reweights_draws_from_another_temperature():
    soft, dense, se, grad, dense_grad, grad_se = sampled_vs_dense(2.0, 1.0, draws=64, replicas=400)
    # self-normalised importance weights: biased by O(1/M), so a generous allowance on top of the noise
    assert abs(float(soft - dense)) < 5 * float(se) + 0.01 * float(dense)
    assert ((grad - dense_grad).abs() < 5 * grad_se + 0.02 * dense_grad.abs().max()).all()


def test_sampled_loss_mixes_like_the_topk_one():
    t, s = logits(5, 10, 1.0, 29).float(), logits(5, 10, 1.0, 30)
    labels = sampled_labels(t, 6, generator=torch.Generator().manual_seed(31))
    hard = torch.tensor([1, 2, -100, 4, 5])
    out = SampledDistillationLoss(2.0, alpha=0.25, sample_temperature=2.0)(s, labels, hard)
    torch.testing.assert_close(out["loss"], 0.25 * out["ce"] + 0.75 * 4.0 * out["soft"])
    w = labels.counts.double() / 6
    want = -(w * F.log_softmax(s / 2.0, 1).gather(1, labels.topk_ids)).sum(1).mean()
    torch.testing.assert_close(out["soft"], want)


# --- configuration errors ---------------------------------------------------------------------------


def test_a_temperature_not_in_the_store_names_the_held_ones():
    t, s = logits(3, 10, 1.0, 32).float(), logits(3, 10, 1.0, 33)
    labels = topk_labels(t, 4, temperatures=(2.0,))
    msg = ("temperature 3 is not in the store (it holds 1, 2): pass --temperature 1 or 2, "
           "or regenerate labels with --temperature 3")
    with pytest.raises(ConfigError) as err:
        TopKDistillationLoss(temperature=3.0, alpha=0.0)(s, labels)
    assert str(err.value) == msg


@pytest.mark.parametrize("kwargs", [
    {"alpha": -0.1}, {"alpha": 1.5}, {"kind": "forward"}, {"temperature": 0.0},
    {"beta": 0.0}, {"beta": 1.0}, {"skew": 0.0},
])
def test_invalid_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        TopKDistillationLoss(**kwargs)


def test_make_loss_picks_the_loss_for_the_label_method():
    assert isinstance(make_loss("topk", "jsd", 2.0, 0.5, beta=0.3), TopKDistillationLoss)
    sampled = make_loss("sample", "kl", 2.0, 0.5, sample_temperature=2.0)
    assert isinstance(sampled, SampledDistillationLoss) and sampled.sample_temperature == 2.0
    with pytest.raises(ConfigError, match="forward KL"):
        make_loss("sample", "reverse-kl", 1.0, 0.5)
    with pytest.raises(ConfigError, match="method"):
        make_loss("dense", "kl", 1.0, 0.5)
    with pytest.raises(ConfigError, match="draw counts"):
        SampledDistillationLoss(alpha=0.0)(torch.zeros(2, 5), topk_labels(torch.randn(2, 5), 2))


def test_argmax_pseudo_labels_are_cross_entropy_on_the_teacher_top1():
    from distill.pipeline.losses import make_loss
    from distill.storage import topk_labels

    g = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(12, 20, generator=g) * 3, torch.randn(12, 20, generator=g)
    labels = topk_labels(teacher, 5)
    out = make_loss("topk", "argmax", 2.0, 0.0)(student, labels, None)
    want = torch.nn.functional.cross_entropy(student.double(), teacher.argmax(1))
    assert torch.allclose(out["soft"].double(), want, rtol=1e-6) and torch.allclose(out["loss"], out["soft"])


# --- renormalised top-k (no tail), for comparison ---------------------------------------------------


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("p,v,k", [(5, 50, 10), (4, 33, 32), (6, 16, 1)])
def test_without_the_tail_the_loss_is_the_divergence_between_renormalised_topk(kind, p, v, k):
    teacher, student = logits(p, v, 3.0, 11), logits(p, v, 2.0, 12)
    labels = topk_labels(teacher.float(), k)
    ids = labels.topk_ids
    renorm = lambda probs: probs.gather(1, ids) / probs.gather(1, ids).sum(1, keepdim=True)  # noqa: E731
    expected = dense_divergence(kind, renorm(teacher.softmax(1)), renorm(student.softmax(1))).mean()
    got = TopKDistillationLoss(kind, alpha=0.0, tail=False)(student, labels)["soft"]
    assert float(got) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    with_tail = TopKDistillationLoss(kind, alpha=0.0)(student, labels)["soft"]
    assert k == 1 or float(with_tail) != pytest.approx(float(got), rel=1e-6)  # the tail changes the loss


def test_without_the_tail_k_1_teaches_nothing_and_gradients_are_finite():
    student = logits(4, 20, 2.0, 3).requires_grad_()
    out = TopKDistillationLoss("kl", alpha=0.0, tail=False)(student, topk_labels(logits(4, 20, 2.0, 4).float(), 1))
    out["loss"].backward()
    assert float(out["soft"]) == pytest.approx(0.0, abs=1e-12) and torch.isfinite(student.grad).all()
    assert float(student.grad.abs().max()) == pytest.approx(0.0, abs=1e-12)


def test_no_tail_is_refused_for_sampled_labels():
    with pytest.raises(ConfigError, match="--no-tail"):
        make_loss("sample", "kl", 1.0, 0.0, tail=False)


# --- top-k + tail draws -----------------------------------------------------------------------------


def tail_draws_vs_dense(sampling, temperature=1.0, k=2, draws=8, replicas=800, p=4, v=8, scale=2.0):
    """Soft loss and gradient over `replicas` independent sets of tail draws per position, and the dense ones.

    The estimate's expectation is KL(p || q) + p_t H(r): the dense reference adds the teacher's tail entropy.
    """
    t, s = logits(p, v, scale, 40).float(), logits(p, v, scale, 41).requires_grad_()
    labels = topk_labels(t.repeat(replicas, 1), k, temperatures=(temperature,), tail_samples=draws, sampling=sampling,
                         generator=torch.Generator().manual_seed(42), sample_temperature=temperature)
    loss = TopKDistillationLoss("kl", temperature, alpha=0.0, sample_temperature=temperature)
    soft = loss(s.repeat(replicas, 1), labels)["soft"]
    (grad,) = torch.autograd.grad(soft, s)
    target = F.softmax(t.double() / temperature, 1)  # (P, V)
    log_q = F.log_softmax(s / temperature, 1)
    head = torch.zeros_like(target, dtype=torch.bool).scatter_(1, t.topk(k, 1).indices, True)
    p_tail = (target * ~head).sum(1, keepdim=True)
    r = torch.where(head, 0.0, target / p_tail)
    tail_entropy = -(torch.where(r > 0, r * r.log(), 0.0)).sum(1)
    dense = (target * (target.log() - log_q)).sum(1) + p_tail[:, 0] * tail_entropy
    (dense_grad,) = torch.autograd.grad(dense.mean(), s)
    # standard errors over replicas * draws draws per position (an upper bound: systematic draws vary less)
    log_s = log_q - (log_q.exp() * ~head).sum(1, keepdim=True).log()
    per_draw = ((r * log_s**2).sum(1) - (r * log_s).sum(1) ** 2).clamp_min(0)
    se = (p_tail[:, 0] ** 2 * per_draw).sum().sqrt().detach() / math.sqrt(replicas * draws) / p
    return soft.detach(), dense.mean().detach(), se, grad, dense_grad


@pytest.mark.parametrize("sampling", ["systematic", "iid"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_draws_estimate_the_full_kl_without_bias(sampling, temperature):
    """A small tail (6 ids, 8 draws) so that ids are drawn several times: weighting by anything but the counts fails."""
    soft, dense, se, grad, dense_grad = tail_draws_vs_dense(sampling, temperature)
    assert abs(float(soft - dense)) < 4 * float(se) + 1e-6
    # 800 x 8 draws per position: measured 0.1-0.8% here; weighting the unique ids equally instead gives 8-17%
    assert (grad - dense_grad).abs().max() < 0.03 * dense_grad.abs().max()


def test_tail_draws_with_every_id_drawn_exactly_give_the_full_kl_gradient():
    """Systematic draws with M = a multiple of 1 / r_j for every tail id hit each one exactly M r_j times."""
    v, k, m = 6, 2, 4
    t = torch.log(torch.tensor([[0.4, 0.2, 0.1, 0.1, 0.1, 0.1]])).float()  # tail of 4 ids at 1/4 each
    s = logits(1, v, 1.0, 43).requires_grad_()
    labels = topk_labels(t, k, tail_samples=m, generator=torch.Generator().manual_seed(0))
    assert labels.tail_counts.tolist() == [[1, 1, 1, 1]]
    soft = TopKDistillationLoss("kl", 1.0, alpha=0.0)(s, labels)["soft"]
    target = t.double().exp()
    dense = (target * (target.log() - F.log_softmax(s, 1))).sum() + 0.4 * math.log(4)
    torch.testing.assert_close(soft, dense, rtol=1e-6, atol=1e-6)
    g1, = torch.autograd.grad(soft, s)
    g2, = torch.autograd.grad(dense, s)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)


def test_tail_draws_loss_passes_gradcheck_and_stays_finite_on_peaked_and_empty_tails():
    t = logits(5, 20, 3.0, 44).float()
    labels = topk_labels(t, 4, tail_samples=6, generator=torch.Generator().manual_seed(45))
    loss = TopKDistillationLoss("kl", 1.0, alpha=0.0)
    s = logits(5, 20, 1.0, 46).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, labels)["soft"], (s,))
    peaked = logits(5, 20, 1.0, 47) * 200
    peaked.requires_grad_()
    out = loss(peaked, labels)["soft"]
    (g,) = torch.autograd.grad(out, peaked)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    full = topk_labels(t, 20, tail_samples=3, generator=torch.Generator().manual_seed(48))  # no tail at all
    assert int(full.tail_counts.sum()) == 0
    s2 = logits(5, 20, 1.0, 49).requires_grad_()
    out = loss(s2, full)["soft"]
    (g,) = torch.autograd.grad(out, s2)
    torch.testing.assert_close(out, loss(s2, topk_labels(t, 20))["soft"])
    assert torch.isfinite(g).all()


def test_tail_draws_stay_finite_with_masked_ids():
    """Ids masked to -inf in the teacher and the student (a padded vocabulary) are never drawn and cost nothing."""
    t, s = logits(6, 24, 2.0, 53).float(), logits(6, 24, 1.0, 54)
    t[:, 16:] = float("-inf")
    s[:, 16:] = float("-inf")
    s.requires_grad_()
    labels = topk_labels(t, 4, tail_samples=8, generator=torch.Generator().manual_seed(55))
    live = labels.tail_counts > 0
    assert bool((labels.tail_ids[live] < 16).all())
    out = TopKDistillationLoss("kl", 1.0, alpha=0.0)(s, labels)["soft"]
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out) and torch.isfinite(g).all() and bool((g[:, 16:] == 0).all())


def test_tail_draws_refuse_other_divergences_and_temperatures_unless_left_out():
    t, s = logits(3, 12, 1.0, 50).float(), logits(3, 12, 1.0, 51)
    labels = topk_labels(t, 3, temperatures=(2.0,), tail_samples=4, generator=torch.Generator().manual_seed(52))
    with pytest.raises(ConfigError, match="forward KL only.*--no-tail-samples"):
        make_loss("topk", "jsd", 1.0, 0.0)(s, labels)
    with pytest.raises(ConfigError, match="made at temperature 1: train at --temperature 1"):
        make_loss("topk", "kl", 2.0, 0.0)(s, labels)
    buckets = make_loss("topk", "kl", 2.0, 0.0, tail_samples=False)(s, labels)["soft"]
    plain = labels.__class__(**{**labels.__dict__, "tail_ids": None, "tail_counts": None})
    torch.testing.assert_close(buckets, make_loss("topk", "kl", 2.0, 0.0)(s, plain)["soft"])


# --- the fused loss against the plain one -----------------------------------------------------------

FUSED_CASES = ["random", "head-holds-all", "peaked", "flat", "sampled-padding", "masked-vocab", "every-id-kept"]


def fused_inputs(case, dtype, seed=60, p=7, v=40, k=6):
    """(student logits (P, V), labels, hard labels with IGNORE_INDEX): one of the extreme cases."""
    t = logits(p, v, 2.0, seed).float()
    scale = {"peaked": 60.0, "flat": 1e-3}.get(case, 2.0)
    s = logits(p, v, scale, seed + 1)
    if case == "masked-vocab":
        t[:, v - 8:], s[:, v - 8:] = -math.inf, -math.inf
    if case == "sampled-padding":
        labels = sampled_labels(t, 10, temperatures=(1.5, 2.0), generator=torch.Generator().manual_seed(seed))
        assert (labels.counts == 0).any()
    else:  # every id kept: the tail is empty
        labels = topk_labels(t, v if case == "every-id-kept" else k, temperatures=(1.5, 2.0))
    if case == "head-holds-all":  # the student's tail ~ 1e-20 of its mass: log(1 - head) would cancel to -inf
        s = s.scatter(1, labels.topk_ids, 50.0 + s.gather(1, labels.topk_ids))
    hard = torch.randint(0, v - 8, (p,), generator=torch.Generator().manual_seed(seed))
    hard[::3] = -100
    return s.to(dtype), labels, hard


def fused_and_plain(student, labels, hard, first=True, **kwargs):
    """{"loss", "soft", "ce"} and the gradient of the loss, from the fused (or with ``first=None``, the default)
    and the plain path."""
    got = []
    for fused in (first, False):
        x = student.clone().requires_grad_()
        out = TopKDistillationLoss(fused=fused, **kwargs)(x, labels, hard)
        (grad,) = torch.autograd.grad(out["loss"], x)
        got.append(({name: None if val is None else val.detach() for name, val in out.items()}, grad))
    return got


def assert_same_loss(got, want, dtype, rtol, atol):
    """Two (outputs, gradient) pairs of fused_and_plain agree: the same parts present, their values and a finite
    gradient of ``dtype`` within tolerance."""
    (out, grad), (ref, ref_grad) = got, want
    for name in ("loss", "soft", "ce"):
        assert (out[name] is None) == (ref[name] is None)
        if out[name] is not None:
            torch.testing.assert_close(out[name], ref[name], rtol=rtol, atol=atol)
    assert torch.isfinite(grad).all() and grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-9, 1e-12), (torch.float32, 2e-5, 1e-6)])
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.3), (2.0, 0.5), (2.0, 0.0), (1.0, 1.0)])
def test_the_fused_loss_equals_the_plain_one(dtype, rtol, atol, case, kind, temperature, alpha):
    student, labels, hard = fused_inputs(case, dtype)
    (fused, g_fused), (plain, g_plain) = fused_and_plain(student, labels, hard, kind=kind, temperature=temperature,
                                                         alpha=alpha, chunk_positions=3)
    assert_same_loss((fused, g_fused), (plain, g_plain), dtype, rtol, atol)


@pytest.mark.parametrize("case", ["random", "sampled-padding", "masked-vocab"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_fused_loss_writes_a_non_contiguous_gradient_as_a_contiguous_one(case, temperature):
    """Student logits laid out column-major (a transposed output layer's): the gradient keeps that layout, so the
    kept ids' terms go through scatter instead of the flat index writes, with the same values."""
    student, labels, hard = fused_inputs(case, torch.float64)
    column_major = student.t().contiguous().t()
    assert not column_major.is_contiguous()
    (fused, g_fused), (plain, g_plain) = fused_and_plain(column_major, labels, hard, temperature=temperature,
                                                         alpha=0.4, chunk_positions=3)
    assert not g_fused.is_contiguous()  # the layout the flat writes cannot take
    assert_same_loss((fused, g_fused), (plain, g_plain), torch.float64, 1e-9, 1e-12)


@pytest.mark.parametrize("case", ["random", "sampled-padding"])
def test_the_fused_loss_runs_under_deterministic_algorithms_with_the_same_result(case):
    """torch.use_deterministic_algorithms(True) refuses put_, the flat writes' fast path: they take index_put_
    then, and give the same loss and gradient bit for bit."""
    student, labels, hard = fused_inputs(case, torch.float32)
    free = fused_and_plain(student, labels, hard, temperature=2.0, alpha=0.5)[0]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        strict = fused_and_plain(student, labels, hard, temperature=2.0, alpha=0.5)[0]
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(free[1], strict[1]) and all(torch.equal(free[0][n], strict[0][n]) for n in ("loss", "soft", "ce"))


@pytest.mark.parametrize("case", ["random", "peaked", "every-id-kept"])
def test_the_fused_loss_equals_the_plain_one_at_another_temperature(case):
    """T = 1 and 2 share the tail's softmax with the cross-entropy; any other T takes its own."""
    student, labels, hard = fused_inputs(case, torch.float64)
    (fused, g_fused), (plain, g_plain) = fused_and_plain(student, labels, hard, temperature=1.5, alpha=0.4,
                                                         chunk_positions=3)
    for name in ("loss", "soft", "ce"):
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-9, 1e-12), (torch.float32, 2e-5, 1e-6)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("scale", [0.01, 2.0, 60.0])
def test_the_fused_loss_equals_the_plain_one_with_tail_draws(dtype, rtol, atol, temperature, scale):
    t, s = logits(9, 30, 2.0, 61).float(), logits(9, 30, scale, 62).to(dtype)
    labels = topk_labels(t, 4, temperatures=(temperature,), tail_samples=6, sample_temperature=temperature,
                         generator=torch.Generator().manual_seed(63))
    hard = torch.tensor([1, -100, 3, 4, 5, -100, 7, 8, 9])
    (fused, g_fused), (plain, g_plain) = fused_and_plain(s, labels, hard, temperature=temperature, alpha=0.2,
                                                         sample_temperature=temperature, chunk_positions=4)
    for name in ("loss", "soft", "ce"):
        torch.testing.assert_close(fused[name], plain[name], rtol=rtol, atol=atol)
    torch.testing.assert_close(g_fused, g_plain, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_fused_loss_passes_gradcheck_in_chunks_with_padding_slots_and_ignored_labels(kind, temperature):
    student, labels, hard = fused_inputs("sampled-padding", torch.float64, seed=64, p=3, v=10)
    loss = TopKDistillationLoss(kind, temperature, alpha=0.4, chunk_positions=2)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels, hard)["loss"], (student.requires_grad_(),))


def test_the_fused_loss_with_tail_draws_passes_gradcheck():
    t = logits(3, 12, 3.0, 65).float()
    labels = topk_labels(t, 3, temperatures=(2.0,), tail_samples=6, sample_temperature=2.0,
                         generator=torch.Generator().manual_seed(66))
    loss = TopKDistillationLoss("kl", 2.0, alpha=0.5, sample_temperature=2.0, chunk_positions=2)
    hard = torch.tensor([0, -100, 11])
    assert torch.autograd.gradcheck(lambda x: loss(x, labels, hard)["loss"], (logits(3, 12, 1.0, 67).requires_grad_(),))


@pytest.mark.parametrize("fused", [True, None])  # None at 40 outputs: the dense path
def test_a_scaled_fused_loss_scales_its_gradient_also_on_a_second_backward(fused):
    student, labels, hard = fused_inputs("random", torch.float64)
    x = student.clone().requires_grad_()
    loss = TopKDistillationLoss("kl", 1.0, alpha=0.5, fused=fused)(x, labels, hard)["loss"]
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1 = g1.clone()  # the returned gradient shares the loss's buffer
    (g3,) = torch.autograd.grad(loss * 3.0, x)
    torch.testing.assert_close(g3, 3.0 * g1)


def test_bfloat16_logits_get_a_bfloat16_gradient_close_to_the_plain_one():
    student, labels, hard = fused_inputs("random", torch.float32)
    (fused, g_fused), (plain, g_plain) = fused_and_plain(student.bfloat16(), labels, hard, temperature=2.0, alpha=0.5)
    assert g_fused.dtype == torch.bfloat16 and fused["loss"].dtype == torch.float32
    torch.testing.assert_close(fused["loss"], plain["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fused.float(), g_plain.float(), rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_fused_loss_allocates_at_most_what_cross_entropy_does(temperature):
    """Peak bytes of one forward + backward, logits made behind an output layer inside the count: the fused
    loss keeps its (P, V) gradient and a chunk; cross-entropy its log-softmax, then two (P, V) in backward."""
    from devicehelp import PeakMemory

    p, v, d = 256, 2000, 16
    g = torch.Generator().manual_seed(70)
    labels = topk_labels(torch.randn(p, v, generator=g) * 3, 8, temperatures=(2.0,))
    hard = torch.randint(0, v, (p,), generator=g)
    hard[::5] = -100
    hidden, head = torch.randn(p, d, generator=g).requires_grad_(), torch.randn(d, v, generator=g).requires_grad_()
    losses = {"ce": lambda x: F.cross_entropy(x, hard),
              "fused": lambda x: TopKDistillationLoss("kl", temperature, 0.5, chunk_positions=32)(x, labels, hard)["loss"]}
    peak = {}
    for name, loss in losses.items():
        with PeakMemory() as mem:
            loss(hidden @ head).backward()
        peak[name] = mem.peak
    chunk = 32 * v * 4
    assert peak["fused"] <= 2 * p * v * 4 + 4 * chunk < peak["ce"], peak


def test_the_default_path_is_fused_for_a_vocabulary_dense_for_a_classifier_and_plain_otherwise(monkeypatch):
    import distill.pipeline.losses as losses_module

    calls = []
    for name in ("fused_bucket_loss", "dense_bucket_loss"):
        real = getattr(losses_module, name)
        monkeypatch.setattr(losses_module, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))

    def path(outputs, kind="kl", labels=None, **kwargs):
        calls.clear()
        t = torch.randn(6, outputs, dtype=torch.float64)
        s = torch.randn(6, outputs, dtype=torch.float64, requires_grad=True)
        labels = labels or topk_labels(t, 4, temperatures=(2.0,))
        TopKDistillationLoss(kind, 2.0, alpha=0.5, **kwargs)(s, labels, t.argmax(1))["loss"].backward()
        return calls[0] if calls else "plain"

    assert path(losses_module.FUSED_MIN_OUTPUTS) == "fused_bucket_loss"
    assert path(10) == "dense_bucket_loss"  # the forward KL over a classifier's outputs: no (P, C) autograd graph
    assert path(10, "jsd") == "plain"  # other divergences keep the plain path below FUSED_MIN_OUTPUTS
    assert path(10, tail=False) == "plain"
    assert path(10, fused=False) == "plain"
    padded = sampled_labels(torch.randn(6, 10), 12, temperatures=(2.0,), generator=torch.Generator().manual_seed(1))
    assert (padded.counts == 0).any() and path(10, labels=padded) == "plain"


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-9, 1e-12), (torch.float32, 2e-5, 1e-6)])
@pytest.mark.parametrize("case", [c for c in FUSED_CASES if c != "sampled-padding"])
@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.3), (2.0, 0.5), (2.0, 0.0), (1.0, 1.0), (1.5, 0.4)])
def test_the_dense_loss_equals_the_plain_one(dtype, rtol, atol, case, temperature, alpha):
    student, labels, hard = fused_inputs(case, dtype, v=24, k=6)
    (dense, g_dense), (plain, g_plain) = fused_and_plain(student, labels, hard, first=None, kind="kl",
                                                         temperature=temperature, alpha=alpha)
    assert_same_loss((dense, g_dense), (plain, g_plain), dtype, rtol, atol)


@pytest.mark.parametrize("k", [3, 10])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_dense_loss_passes_gradcheck_with_ignored_labels(k, temperature):
    labels = topk_labels(logits(4, 10, 3.0, 71).float(), k, temperatures=(2.0,))
    hard = torch.tensor([0, -100, 9, 4])
    loss = TopKDistillationLoss("kl", temperature, alpha=0.4)
    assert torch.autograd.gradcheck(lambda x: loss(x, labels, hard)["loss"], (logits(4, 10, 1.0, 72).requires_grad_(),))


def test_the_dense_loss_gives_bfloat16_logits_a_bfloat16_gradient_and_needs_none_without_grad():
    student, labels, hard = fused_inputs("random", torch.float32, v=24)
    (dense, g_dense), (plain, g_plain) = fused_and_plain(student.bfloat16(), labels, hard, first=None,
                                                         temperature=2.0, alpha=0.5)
    assert g_dense.dtype == torch.bfloat16 and dense["loss"].dtype == torch.float32
    torch.testing.assert_close(dense["loss"], plain["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_dense.float(), g_plain.float(), rtol=1e-2, atol=1e-4)
    with torch.no_grad():
        out = TopKDistillationLoss("kl", 2.0, 0.5)(student.requires_grad_(), labels, hard)
    assert not out["loss"].requires_grad
    torch.testing.assert_close(out["loss"], TopKDistillationLoss("kl", 2.0, 0.5, fused=False)(student, labels, hard)["loss"])


needs_a_compiler = pytest.mark.skipif(os.environ.get("DISTILL_NATIVE") == "0" or native.default_compiler() is None,
                                      reason="no C compiler, or DISTILL_NATIVE=0: the dense loss's torch path runs")


def _dense(student, labels, hard, temperature, alpha, compiled):
    """dense_bucket_loss on ``student`` (a leaf), and its gradient: ((loss, soft, ce), grad)."""
    x = student.clone().requires_grad_()
    lp, tail = labels.tempered(temperature)
    out = dense_bucket_loss(x, labels.topk_ids, lp, tail, temperature, alpha, hard, compiled=compiled)
    (grad,) = torch.autograd.grad(out[0], x)
    return out, grad


@needs_a_compiler
@pytest.mark.parametrize("case", [c for c in FUSED_CASES if c != "sampled-padding"])
@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.3), (2.0, 0.5), (2.0, 0.0), (1.0, 1.0), (1.5, 0.4)])
def test_the_compiled_dense_loss_matches_float64(case, temperature, alpha):
    """bucketloss.c on float32 logits against the torch path in float64 on the same values: loss, terms, gradient."""
    student, labels, hard = fused_inputs(case, torch.float32, v=24, k=6)
    (loss, soft, ce), grad = _dense(student, labels, hard, temperature, alpha, compiled=True)
    (loss64, soft64, ce64), grad64 = _dense(student.double(), labels, hard, temperature, alpha, compiled=False)
    for got, want in ((loss, loss64), (soft, soft64), (ce, ce64)):
        if want is not None:
            torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    assert (ce is None) == (ce64 is None) and grad.dtype == torch.float32 and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad.double(), grad64, rtol=2e-5, atol=1e-7)


@needs_a_compiler
@pytest.mark.parametrize("k", [4, 10])
def test_the_compiled_dense_loss_reads_masked_student_ids_and_ignored_labels_as_the_torch_path(k):
    labels = topk_labels(logits(5, 10, 2.0, 73).float(), k, temperatures=(2.0,))
    student = logits(5, 10, 1.0, 74).float().scatter(1, labels.topk_ids[:, :1], -math.inf)  # each row's top id
    student[1, :] = student[1].scatter(0, torch.arange(10)[~torch.isin(torch.arange(10), labels.topk_ids[1])],
                                       -math.inf)  # row 1: the whole tail masked
    hard = torch.tensor([1, 2, -100, 3, 4])
    (loss, soft, ce), grad = _dense(student, labels, hard, 2.0, 0.5, compiled=True)
    (loss0, soft0, ce0), grad0 = _dense(student, labels, hard, 2.0, 0.5, compiled=False)
    torch.testing.assert_close((loss, soft, ce), (loss0, soft0, ce0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad0, rtol=1e-5, atol=1e-7)


@needs_a_compiler
def test_the_compiled_dense_loss_leaves_bad_input_and_other_dtypes_to_the_torch_path():
    labels = topk_labels(logits(4, 10, 2.0, 75).float(), 3)
    student = logits(4, 10, 1.0, 76).float()
    lp, tail = labels.tempered(1.0)
    with pytest.raises((IndexError, RuntimeError)) as torch_path:  # a label past the outputs: torch's own error
        dense_bucket_loss(student, labels.topk_ids, lp, tail, 1.0, 0.5, torch.tensor([0, 1, 10, 2]), compiled=False)
    with pytest.raises(type(torch_path.value)):
        dense_bucket_loss(student, labels.topk_ids, lp, tail, 1.0, 0.5, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(RuntimeError, match="float32 logits on a CPU"):
        dense_bucket_loss(student.double(), labels.topk_ids, lp, tail, 1.0, 0.5, torch.tensor([0, 1, 2, 3]),
                          compiled=True)
    with torch.no_grad():  # no gradient asked: none computed, the same value
        got = dense_bucket_loss(student, labels.topk_ids, lp, tail, 1.0, 0.5, torch.tensor([0, 1, 2, 3]))[0]
    want = dense_bucket_loss(student, labels.topk_ids, lp, tail, 1.0, 0.5, torch.tensor([0, 1, 2, 3]), compiled=False)
    torch.testing.assert_close(got, want[0].detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [4, 10])
def test_the_dense_loss_reads_a_kept_id_the_student_masks_as_the_plain_loss_does(k):
    """A student logit of -inf where the teacher has mass: the bucket counts as float32's smallest mass, with no
    gradient, on both paths."""
    labels = topk_labels(logits(5, 10, 2.0, 73).float(), k, temperatures=(2.0,))
    student = logits(5, 10, 1.0, 74).scatter(1, labels.topk_ids[:, :1], -math.inf)  # each row's top id
    (dense, g_dense), (plain, g_plain) = fused_and_plain(student, labels, torch.tensor([1, 2, -100, 3, 4]),
                                                         first=None, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(dense["loss"], plain["loss"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_dense, g_plain, rtol=1e-9, atol=1e-12)
