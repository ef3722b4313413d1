"""The distillation losses of stage two: the student against the teacher's stored soft labels.

Top-k labels give the teacher's exact distribution over K+1 *buckets* (the K stored ids and
the tail, the mass of every other id); the student's full-vocabulary softmax is folded onto
the same buckets and the two compared with a divergence (``TopKDistillationLoss``). Sampled
labels give ids drawn from the teacher with their counts; the count-weighted cross-entropy is
an unbiased estimate of the full cross-entropy (``SampledDistillationLoss``). Both mix in the
hard-label cross-entropy as Hinton et al. (2015) do:

    loss = alpha * CE(student, hard) + (1 - alpha) * T^2 * soft

Math runs in float32 whatever the student's dtype (float64 stays float64, for gradcheck).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ConfigError
from distill.pipeline.fused import LOG_FLOOR, dense_bucket_loss, fused_bucket_loss
from distill.pipeline.models import LoadedModel
from distill.pipeline.runtime import module_device, to_device
from distill.pipeline.tasks import IGNORE_INDEX, position_logits
from distill.storage import METHODS
from distill.storage.labels import SoftLabels

__all__ = [
    "FUSED_MIN_OUTPUTS",
    "LOSSES",
    "LOSS_NAMES",
    "OnlineDistillationLoss",
    "PseudoLabelLoss",
    "SampledDistillationLoss",
    "TopKDistillationLoss",
    "bucket_divergence",
    "make_loss",
    "renormalised",
    "student_buckets",
    "tail_cross_entropy",
]

LOSSES = ("kl", "reverse-kl", "jsd", "skew-kl")  # divergences over the buckets
LOSS_NAMES = (*LOSSES, "argmax")  # what train-student --loss takes: argmax is the hard pseudo-label baseline

_NEG_INF = float("-inf")


def _math_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 / fp16 logits are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _logsumexp(x: Tensor) -> Tensor:
    """logsumexp over the last dim, -inf for an all -inf row, and a zero (not NaN) gradient there."""
    m = x.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    s = (x - m).exp().sum(-1)  # >= 1 unless the row is all -inf
    empty = s == 0
    out = torch.where(empty, 1.0, s).log() + m[..., 0]
    return torch.where(empty, _NEG_INF, out)


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp a + exp b) with -inf (and a zero gradient, not NaN) where both are -inf."""
    both = (a == _NEG_INF) & (b == _NEG_INF)
    out = torch.logaddexp(torch.where(both, 0.0, a), torch.where(both, 0.0, b))
    return torch.where(both, _NEG_INF, out)


def student_buckets(
    student_logits: Tensor, ids: Tensor, temperature: float = 1.0, kept: Tensor | None = None,
    tail_ids: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """The student's tempered log-probabilities over the teacher's K+1 buckets.

    student_logits: (P, V) any float dtype; the softmax of ``logits / temperature`` over the
        whole vocabulary is taken in float32 (float64 stays float64).
    ids: (P, K) int64 bucket ids. kept: (P, K) bool, False on padding slots (which repeat a
        kept id); None means all kept.
    Returns ``(log q of each id (P, K), log q of the tail (P,))``; padding slots get -inf.
    With ``tail_ids`` (P, M) (ids outside ``ids``) also, third, the student's log-probabilities
    of those ids *within its tail*, log s_j = log q_j - log q_tail (P, M).

    The tail is not ``log(1 - sum_k q_k)``: that cancels to -inf (and an infinite forward KL)
    whenever the student's mass outside the ids falls under float32's epsilon, which a peaked
    student reaches quickly. It is the logsumexp of the logits outside the ids, exact at any
    size; the full normaliser is then ``logaddexp(kept, tail)``, so the price is one (P, V)
    copy (the scatter), not a second pass.
    Never NaN; gradients are finite, also when the tail is empty (every id kept).
    """
    x = student_logits.to(_math_dtype(student_logits))
    if temperature != 1.0:
        x = x / temperature  # (P, V)
    ids = ids.to(x.device)
    kept_x = x.gather(1, ids)  # (P, K)
    if kept is not None:
        kept_x = torch.where(kept.to(x.device), kept_x, _NEG_INF)
    tail_x = _logsumexp(x.scatter(1, ids, _NEG_INF))  # (P,) padding slots repeat a kept id: harmless
    lse = _logaddexp(torch.logsumexp(kept_x, 1), tail_x)  # (P,) the full-vocabulary normaliser
    if tail_ids is None:
        return kept_x - lse[:, None], tail_x - lse
    within = x.gather(1, tail_ids.to(x.device)) - torch.where(torch.isfinite(tail_x), tail_x, 0.0)[:, None]  # (P, M)
    return kept_x - lse[:, None], tail_x - lse, within


def renormalised(lp: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probs (P, K) renormalised over the K ids alone (padding slots stay -inf), and an empty tail (P,)."""
    return lp - _logsumexp(lp)[:, None], torch.full_like(tail, _NEG_INF)


def _kl(a: Tensor, b: Tensor) -> Tensor:
    """KL(a || b) per row from log-probs (P, B); a bucket where a = 0 adds 0 and no NaN gradient.

    Where b = 0 but a > 0 the bucket reads b as float32's smallest normal mass (~1e-38): a float32
    store cannot tell less from 0 (a teacher tail underflows there), so the loss stays finite.
    Finite values of b are never clamped: a student at log q = -300 still gets its gradient.
    """
    has = a > _NEG_INF
    a0, b0 = torch.where(has, a, 0.0), torch.where(has & (b > _NEG_INF), b, LOG_FLOOR)
    return torch.where(has, a0.exp() * (a0 - b0), 0.0).sum(-1)


def bucket_divergence(
    kind: str, teacher_lp: Tensor, teacher_tail: Tensor, student_lp: Tensor, student_tail: Tensor,
    *, beta: float = 0.5, skew: float = 0.1,
) -> Tensor:
    """(P,) divergence between the teacher p and student q over K+1 buckets given as log-probs.

    teacher_lp, student_lp: (P, K); teacher_tail, student_tail: (P,). 0 * log 0 = 0: a bucket
    that is -inf on the weighting side adds 0 and no NaN gradient; one that is -inf only on the
    other side counts as float32's smallest normal mass (~1e-38), the least the store resolves,
    so every divergence stays finite.
      kl:         KL(p || q), forward (mass-covering).
      reverse-kl: KL(q || p), mode-seeking.
      jsd:        generalised Jensen-Shannon, beta * KL(p || m) + (1 - beta) * KL(q || m) with
                  m = beta * p + (1 - beta) * q: beta weights the *teacher* side (as TRL's GKD
                  ``generalized_jsd_loss``); beta = 0.5 is the symmetric JSD.
      skew-kl:    DistiLLM's skew KL (Ko et al. 2024), KL(p || skew * p + (1 - skew) * q); the
                  paper uses skew = 0.1.
    Computed in float32 (float64 if either side is float64).
    """
    dtype = _math_dtype(teacher_lp, student_lp)
    p = torch.cat([teacher_lp, teacher_tail[:, None]], 1).to(device=student_lp.device, dtype=dtype)  # (P, K+1)
    q = torch.cat([student_lp, student_tail[:, None]], 1).to(dtype)  # (P, K+1)
    if kind == "kl":
        return _kl(p, q)
    if kind == "reverse-kl":
        return _kl(q, p)
    if kind == "jsd":
        m = _logaddexp(p + math.log(beta), q + math.log1p(-beta))
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skew-kl":
        return _kl(p, _logaddexp(p + math.log(skew), q + math.log1p(-skew)))
    raise ConfigError(f"unknown loss {kind!r}: pass one of {', '.join(LOSSES)}")


def _fmt(t: float) -> str:
    return f"{t:g}"


def _teacher_tempered(labels: SoftLabels, temperature: float) -> tuple[Tensor, Tensor]:
    """labels.tempered(T), or a ConfigError naming the temperatures the store holds."""
    held = (1.0, *labels.temperatures)
    if temperature not in held:
        names = [_fmt(t) for t in held]
        choices = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise ConfigError(
            f"temperature {_fmt(temperature)} is not in the store (it holds {', '.join(names)}): "
            f"pass --temperature {choices}, or regenerate labels with --temperature {_fmt(temperature)}"
        )
    return labels.tempered(temperature)


def _hard_ce(student_logits: Tensor, hard_labels: Tensor, ignore_index: int) -> Tensor:
    """Mean cross-entropy of the untempered student over positions whose label != ignore_index (0 if none)."""
    hard_labels = hard_labels.to(student_logits.device)
    x = student_logits.to(_math_dtype(student_logits))
    total = F.cross_entropy(x, hard_labels, ignore_index=ignore_index, reduction="sum")
    return total / (hard_labels != ignore_index).sum().clamp_min(1)


class _HintonMix(nn.Module):
    """What both losses share: validation, the hard-label CE and the alpha / T^2 mix."""

    def __init__(self, temperature: float, alpha: float, ignore_index: int):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}: pass --alpha between 0 (pure distillation) and 1")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}: pass --temperature 1 or more")
        self.temperature, self.alpha, self.ignore_index = float(temperature), float(alpha), ignore_index

    def _mix(self, student_logits: Tensor, soft: Tensor, hard_labels: Tensor | None) -> dict[str, Tensor | None]:
        soft_part = (1.0 - self.alpha) * self.temperature**2 * soft
        if self.alpha == 0.0:
            return {"loss": soft_part, "soft": soft, "ce": None}
        self._check_hard(hard_labels)
        ce = _hard_ce(student_logits, hard_labels, self.ignore_index)
        return {"loss": self.alpha * ce + soft_part, "soft": soft, "ce": ce}

    def _check_hard(self, hard_labels: Tensor | None) -> None:
        if self.alpha > 0 and hard_labels is None:
            raise ConfigError(f"alpha = {self.alpha} mixes in hard labels but the data has none: pass --alpha 0")

    @staticmethod
    def _check_positions(student_logits: Tensor, labels: SoftLabels) -> None:
        if student_logits.dim() != 2 or student_logits.shape[0] != labels.num_positions:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} do not match {labels.num_positions} label positions"
            )


# From about this many outputs the fused loss is faster than the plain one (and it always holds less
# memory); below it (classifiers) its per-chunk bookkeeping costs more than the tiny (P, C) tensors it saves,
# and the forward KL takes the dense path instead.
FUSED_MIN_OUTPUTS = 1024


class TopKDistillationLoss(_HintonMix):
    """Hinton's mix over top-k labels:

        loss = alpha * CE(student, hard) + (1 - alpha) * T^2 * mean_P divergence(teacher_T, student_T)

    The divergence (one of ``LOSSES``) is taken over the K+1 buckets (stored ids + tail), with
    the teacher's exact tempered log-probs from the store. ``tail=False`` drops the tail bucket
    and renormalises both distributions over the K stored ids (what most offline tools do; kept
    for comparison: the tail carries the teacher's mass outside the top k, and its calibration).
    Works on sampled labels too (their padding slots are left out); their exact bucket
    distribution is as valid a target.

    **Tail draws.** When the labels also hold M ids drawn from the teacher's distribution
    restricted to its tail (``tail_ids``, ``tail_counts``; a store with ``tail_samples``), the
    forward KL gets the rest of the teacher. With p the teacher and q the student at
    temperature T, H the K stored ids, p_t and q_t the masses outside them, and r = p / p_t,
    s = q / q_t the two distributions *within* the tail, the full KL splits exactly into

        KL(p || q) = KL_buckets(p, q) + p_t * KL(r || s)
                   = KL_buckets(p, q) + p_t * (CE(r, s) - H(r)),   CE(r, s) = -sum_{j in tail} r_j log s_j.

    H(r) does not depend on the student, and the draws estimate CE(r, s) without bias:
    E[count_j] = M r_j for M draws from r (multinomial or systematic, see
    ``distill.storage.labels.draw``), so

        soft = KL_buckets(p, q) - p_t * sum_j (count_j / M) log s_j

    has E[soft] = KL(p || q) + p_t H(r) and E[grad soft] = grad KL(p || q): the gradient is
    unbiased over the whole vocabulary, while the head and the tail's total mass stay exact
    (they carry no sampling noise at all). log s_j = x_j - logsumexp of the student's logits
    outside H, so it costs a gather on top of the bucket loss. The draws estimate the
    cross-entropy at the temperature they were drawn at (the store's ``sample_temperature``),
    and only the forward KL decomposes this way: other temperatures and divergences are
    refused unless ``tail_samples=False`` (use the K+1 buckets alone).

    ``fused=True`` (the default, None, for outputs of FUSED_MIN_OUTPUTS or more: a language model's
    vocabulary) computes it with ``distill.pipeline.fused.fused_bucket_loss``: one
    softmax per chunk of positions, shared by both terms, and no (P, V) intermediates kept for
    backward beyond the gradient itself. Below that (a classifier), the default computes the
    forward KL without padding slots or tail draws with ``distill.pipeline.fused.dense_bucket_loss``:
    the soft and hard terms and their gradient in closed form over the few outputs, with no autograd
    graph of small operations. On the fused and dense paths ``soft`` and ``ce`` are detached values (only
    ``loss`` carries the gradient; ``soft`` is ``loss / T^2`` when alpha == 0, ``ce`` is ``loss`` when
    alpha == 1, so both keep theirs there). ``fused=False`` is the plain autograd path, kept as the
    reference both are tested against.

    forward(student_logits (P, V), labels (P positions), hard_labels (P,) int64 or None)
        -> {"loss": scalar, "soft": scalar mean divergence (unscaled), "ce": scalar or None}
    ``soft`` with tail draws is the estimate above (a cross-entropy in the tail: it exceeds the
    KL by p_t H(r) on average). ``ce`` is the untempered cross-entropy on the hard labels, mean
    over positions whose label is not ``ignore_index``; it is None (and hard labels may be
    None) when alpha == 0.
    """

    def __init__(self, kind: str = "kl", temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5,
                 skew: float = 0.1, ignore_index: int = IGNORE_INDEX, tail: bool = True, tail_samples: bool = True,
                 sample_temperature: float = 1.0, fused: bool | None = None, chunk_positions: int | None = None):
        super().__init__(temperature, alpha, ignore_index)
        self.tail, self.tail_samples, self.fused = bool(tail), bool(tail_samples), fused
        self.chunk_positions = chunk_positions  # the fused loss's positions per chunk; None: ~8 MiB of float32
        if kind not in LOSSES:
            raise ConfigError(f"unknown loss {kind!r}: pass --loss one of {', '.join(LOSSES)}")
        for name, value in (("beta", beta), ("skew", skew)):
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be strictly between 0 and 1, got {value}: pass --{name} 0.5 or 0.1")
        self.kind, self.beta, self.skew = kind, float(beta), float(skew)
        self.sample_temperature = float(sample_temperature)

    def forward(self, student_logits: Tensor, labels: SoftLabels, hard_labels: Tensor | None = None):
        self._check_positions(student_logits, labels)
        teacher_lp, teacher_tail = _teacher_tempered(labels, self.temperature)  # (P, K), (P,)
        kept = None if labels.counts is None else labels.counts > 0
        draws = self._tail_draws(labels)
        targets = (teacher_lp, teacher_tail) if draws is None else (teacher_lp, teacher_tail, draws[1])
        if self.fused or (self.fused is None and student_logits.shape[-1] >= FUSED_MIN_OUTPUTS):
            return self._fused(student_logits, labels.topk_ids, kept, targets, draws, hard_labels)
        if self.fused is None and self.kind == "kl" and self.tail and kept is None and draws is None:
            return self._dense(student_logits, labels.topk_ids, teacher_lp, teacher_tail, hard_labels)
        student = student_buckets(student_logits, labels.topk_ids, self.temperature, kept,
                                  None if draws is None else draws[0])
        div = self._divergence(student[0], student[1], student[2] if draws is not None else None, *targets)  # (P,)
        return self._mix(student_logits, div.mean(), hard_labels)

    def _divergence(self, student_lp: Tensor, student_tail: Tensor, within: Tensor | None, teacher_lp: Tensor,
                    teacher_tail: Tensor, tail_counts: Tensor | None = None) -> Tensor:
        """(n,) the soft term per position from both sides' bucket log-probs (and the tail draws' term)."""
        if not self.tail:
            teacher_lp, teacher_tail = renormalised(teacher_lp, teacher_tail)
            student_lp, student_tail = renormalised(student_lp, student_tail)
        div = bucket_divergence(self.kind, teacher_lp, teacher_tail, student_lp, student_tail,
                                beta=self.beta, skew=self.skew)  # (n,)
        if within is not None:
            div = div + teacher_tail.to(div.device, div.dtype).exp() * tail_cross_entropy(within, tail_counts)
        return div

    def _fused(self, student_logits: Tensor, ids: Tensor, kept: Tensor | None, targets: tuple, draws,
               hard_labels: Tensor | None) -> dict[str, Tensor | None]:
        self._check_hard(hard_labels)
        loss, soft, ce = fused_bucket_loss(
            student_logits, ids, kept, self._divergence, targets, temperature=self.temperature, alpha=self.alpha,
            hard_labels=hard_labels, ignore_index=self.ignore_index, tail_ids=None if draws is None else draws[0],
            chunk_positions=self.chunk_positions)
        return self._detached_terms(loss, soft, ce)

    def _dense(self, student_logits: Tensor, ids: Tensor, teacher_lp: Tensor, teacher_tail: Tensor,
               hard_labels: Tensor | None) -> dict[str, Tensor | None]:
        self._check_hard(hard_labels)
        loss, soft, ce = dense_bucket_loss(student_logits, ids, teacher_lp, teacher_tail, self.temperature,
                                           alpha=self.alpha, hard_labels=hard_labels, ignore_index=self.ignore_index)
        return self._detached_terms(loss, soft, ce)

    def _detached_terms(self, loss: Tensor, soft: Tensor, ce: Tensor | None) -> dict[str, Tensor | None]:
        """The fused and dense paths' output: where one term is the whole loss it is returned differentiable."""
        if self.alpha == 0.0:
            soft = loss / self.temperature**2  # the same value, and differentiable
        elif self.alpha == 1.0:
            ce = loss
        return {"loss": loss, "soft": soft, "ce": ce}

    def _tail_draws(self, labels: SoftLabels) -> tuple[Tensor, Tensor] | None:
        """(tail_ids, tail_counts) when the loss uses them, after checking that it can."""
        if labels.tail_ids is None or not self.tail_samples or not self.tail:
            return None
        self.check_tail_draws()
        return labels.tail_ids, labels.tail_counts

    def check_tail_draws(self) -> None:
        """Raise ConfigError if this loss would use labels' tail draws but cannot (another divergence or
        temperature than the draws'); call it up front when the store is known to hold draws."""
        if not self.tail_samples or not self.tail:
            return
        if self.kind != "kl":
            raise ConfigError(f"the store's tail draws estimate the forward KL only, not {self.kind!r}: pass --loss kl, "
                              "or --no-tail-samples to use its top-k and tail bucket alone")
        if self.temperature != self.sample_temperature:
            raise ConfigError(f"the store's tail draws were made at temperature {_fmt(self.sample_temperature)}: "
                              f"train at --temperature {_fmt(self.sample_temperature)}, or pass --no-tail-samples "
                              "to use its top-k and tail bucket alone")


def tail_cross_entropy(within: Tensor, counts: Tensor) -> Tensor:
    """-sum_j (count_j / M) log s_j per position (P,): the draws' estimate of CE(r, s) in the tail.

    within: (P, M) the student's log-probabilities of the drawn ids within its tail (finite);
    counts: (P, M) how often each was drawn (0 on padding slots; all 0 where the tail is empty,
    which gives 0).
    """
    counts = counts.to(within.device, within.dtype)
    total = counts.sum(1, keepdim=True)
    weights = counts / total.clamp_min(1.0)  # (P, M)
    return -(weights * torch.where(counts > 0, within, 0.0)).sum(1)


class SampledDistillationLoss(_HintonMix):
    """Hinton's mix over sampled labels, with the sampled cross-entropy of "Sparse Logit
    Sampling" (Anshumann et al. 2025) as the soft part:

        soft = mean_P  -sum_k w_k log q_T(id_k),   w_k = count_k / M,  M = sum_k count_k

    q_T is the student's full-vocabulary softmax at temperature T. When the draws came from the
    teacher at the same temperature (``sample_temperature == temperature``) its expectation over
    the draws is exactly the cross-entropy H(p_T, q_T), so its gradient is unbiased. ``soft`` is a
    cross-entropy: it exceeds the forward KL by the teacher's entropy (a constant to the student).

    For T != Ts (``sample_temperature``) the counts are reweighted by self-normalised importance
    weights, w_k ∝ count_k * exp(log p_k / T - log p_k / Ts) (p_T / p_Ts up to normalisers, which
    cancel). Self-normalisation makes that estimate biased by O(1/M), consistent as M grows.

    forward(student_logits (P, V), labels with counts (P positions), hard_labels (P,) or None)
        -> {"loss", "soft", "ce"} as for ``TopKDistillationLoss``.
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.5, sample_temperature: float = 1.0,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__(temperature, alpha, ignore_index)
        if not sample_temperature > 0:
            raise ConfigError(f"sample_temperature must be > 0, got {sample_temperature}")
        self.sample_temperature = float(sample_temperature)

    def weights(self, labels: SoftLabels) -> Tensor:
        """(P, K) float32 weights of the drawn ids, summing to 1 per position (0 on padding)."""
        if labels.counts is None:
            raise ConfigError("these soft labels have no draw counts (method 'topk'): use the top-k loss for them")
        counts = labels.counts.double()  # (P, K)
        kept = counts > 0
        shift = 1.0 / self.temperature - 1.0 / self.sample_temperature
        if shift == 0.0:
            return (counts / counts.sum(1, keepdim=True)).float()
        log_w = torch.where(kept, counts.log() + labels.topk_logprobs.double() * shift, _NEG_INF)
        return log_w.softmax(1).float()

    def forward(self, student_logits: Tensor, labels: SoftLabels, hard_labels: Tensor | None = None):
        self._check_positions(student_logits, labels)
        w = self.weights(labels).to(student_logits.device)  # (P, K)
        x = student_logits.to(_math_dtype(student_logits)) / self.temperature  # (P, V)
        log_q = x.gather(1, labels.topk_ids.to(x.device)) - x.logsumexp(1, keepdim=True)  # (P, K), finite
        soft = -(w.to(x.dtype) * log_q).sum(1).mean()
        return self._mix(student_logits, soft, hard_labels)


class PseudoLabelLoss(_HintonMix):
    """Hard pseudo-labels: cross-entropy on the teacher's top-1 id, the baseline soft targets are measured against.

        loss = alpha * CE(student, hard) + (1 - alpha) * CE(student, argmax teacher)

    No temperature (T = 1): a one-hot target has no dark knowledge to soften.
    """

    def __init__(self, alpha: float = 0.5, ignore_index: int = IGNORE_INDEX):
        super().__init__(1.0, alpha, ignore_index)

    def forward(self, student_logits: Tensor, labels: SoftLabels, hard_labels: Tensor | None = None):
        self._check_positions(student_logits, labels)
        top1 = labels.topk_ids.gather(1, labels.topk_logprobs.argmax(1, keepdim=True))[:, 0]  # (P,)
        soft = _hard_ce(student_logits, top1.to(student_logits.device), self.ignore_index)
        return self._mix(student_logits, soft, hard_labels)


class OnlineDistillationLoss(_HintonMix):
    """Online distillation, the reference the store is measured against: the teacher runs on every
    batch and the student matches its full-vocabulary distribution,

        loss = alpha * CE(student, hard) + (1 - alpha) * T^2 * mean_P KL(p_teacher,T || q_student,T)

    the top-k loss with k = V (an empty tail).

    forward(student_logits (P, V), batch (the collated examples the student ran on), hard_labels (P,) or None)
        -> {"loss", "soft", "ce"} as for ``TopKDistillationLoss``.
    """

    def __init__(self, teacher: LoadedModel, task: str, temperature: float = 1.0, alpha: float = 0.5,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__(temperature, alpha, ignore_index)
        self.teacher, self.task = teacher, task  # a plain attribute: the teacher's weights are not the loss's
        teacher.module.eval()

    def forward(self, student_logits: Tensor, batch: dict, hard_labels: Tensor | None = None):
        with torch.no_grad():  # the teacher runs where it is (it may sit on another device than the student)
            where = module_device(self.teacher.module)
            target = position_logits(self.teacher, to_device(batch, where), self.task)[0].to(student_logits.device)
        if target.shape != student_logits.shape:
            raise ConfigError(f"the teacher gives logits {tuple(target.shape)} but the student "
                              f"{tuple(student_logits.shape)}: use models of one vocabulary")
        t = self.temperature
        p_log = (target.float() / t).log_softmax(-1)  # (P, V)
        q_log = (student_logits.float() / t).log_softmax(-1)  # (P, V)
        soft = F.kl_div(q_log, p_log, log_target=True, reduction="sum") / max(1, len(q_log))
        return self._mix(student_logits, soft, hard_labels)


def make_loss(method: str, kind: str, temperature: float, alpha: float, *, beta: float = 0.5, skew: float = 0.1,
              sample_temperature: float = 1.0, ignore_index: int = IGNORE_INDEX, tail: bool = True,
              tail_samples: bool = True) -> nn.Module:
    """The loss for a store's label method: "topk" -> TopKDistillationLoss, "sample" -> SampledDistillationLoss;
    kind "argmax" -> PseudoLabelLoss (either method). ``tail=False`` (top-k only): renormalise over the k ids.
    ``tail_samples=False``: leave a top-k store's tail draws out (the K+1 buckets alone);
    ``sample_temperature``: the temperature the store's draws come from."""
    if kind == "argmax":
        return PseudoLabelLoss(alpha, ignore_index)
    if not tail and method != "topk":
        raise ConfigError(f"--no-tail renormalises top-k labels but this store holds {method!r} labels: "
                          "drop --no-tail, or use a store written with --method topk")
    if method == "topk":
        return TopKDistillationLoss(kind, temperature, alpha, beta, skew, ignore_index, tail, tail_samples,
                                    sample_temperature)
    if method == "sample":
        if kind != "kl":
            raise ConfigError(
                f"sampled labels support the cross-entropy (forward KL) objective only, not {kind!r}: "
                "pass --loss kl, or regenerate labels with --method topk"
            )
        return SampledDistillationLoss(temperature, alpha, sample_temperature, ignore_index)
    raise ConfigError(f"unknown label method {method!r}: the store's method must be one of {', '.join(METHODS)}")
