"""A fused top-k distillation loss: one pass over the student's logits per chunk of positions.

The plain loss (``distill.pipeline.losses.TopKDistillationLoss`` with ``fused=False``) takes
the student's log-softmax for the soft term, again for the hard cross-entropy, copies the
logits to mask the kept ids for the tail's logsumexp, and autograd keeps each of those (P, V)
intermediates for the backward pass. Here, for each chunk of positions:

1. gather the kept ids' logits (and the drawn tail ids', and the hard labels'), then mask the kept
   ids to -inf in place, in a chunk-sized buffer reused from step to step on the CPU;
2. one max and one in-place exp over what is left give e = exp(z - max) on the tail, so the tail's
   logsumexp is ``max + log sum e`` exactly (no cancellation and no underflow however small the
   tail, unlike ``log(1 - sum of the kept q)``) and r = e / sum e is the softmax *within the tail*;
   the full normaliser is ``logaddexp(logsumexp(kept), tail)``, so the bucket log-probs come from
   that one pass. The cross-entropy does too: at T = 1 directly, at T = 2 through the square
   (the untempered softmax is q^2 / sum q^2, and sum r^2 is a norm, not another exp); any other
   T takes its own softmax;
3. the divergence over the K+1 buckets (and the tail draws' term) runs on the small (n, K+1)
   tensors under autograd, which gives its gradient w.r.t. the buckets' log-probs;
4. the chain rule through the log-softmax and the tail's logsumexp is applied by hand: on the
   tail the gradient is r times a per-position weight, on the kept ids a scatter; it is
   written straight into the one (P, V) gradient (the dtype of the logits).

The forward pass computes the gradient, and backward only scales it (in place, no second
(P, V)): peak memory is that gradient (what ``F.cross_entropy``'s backward produces anyway)
plus one or two chunk-sized float32 buffers (two when T is not 1 or 2: the cross-entropy's own softmax).
No step reads a value back to the host (no ``.item()``, ``nonzero`` or masks of data-dependent
size). The gradient is not differentiable again (no double backward); a second backward with
``retain_graph`` gets the right scale, but a gradient returned earlier shares the buffer.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from distill.storage import native

__all__ = ["CHUNK_ELEMENTS", "LOG_FLOOR", "dense_bucket_loss", "fused_bucket_loss"]

CHUNK_ELEMENTS = 1 << 21  # positions x vocabulary per chunk: 8 MiB of float32 per buffer
_NEG_INF = float("-inf")
# A float32 store cannot tell a mass below ~1e-38 from 0 (the teacher's tail underflows there): the divergences
# (here and in distill.pipeline.losses) read such a bucket as this log-mass rather than as an infinite penalty
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)
BUCKET_LOSS = Path(__file__).with_name("bucketloss.c")  # dense_bucket_loss compiled, for float32 on a CPU
# up to this many logits; above it torch's vectorised operations on 2 threads were as fast (4,096 x 10: 0.91 ms each)
COMPILED_DENSE_ELEMENTS = 1 << 14

# divergence(student_lp (n, K), student_tail (n,), within (n, M) or None, *target rows) -> (n,)
Divergence = Callable[..., Tensor]


def fused_bucket_loss(
    student_logits: Tensor, ids: Tensor, kept: Tensor | None, divergence: Divergence, targets: tuple[Tensor, ...], *,
    temperature: float, alpha: float, hard_labels: Tensor | None, ignore_index: int, tail_ids: Tensor | None = None,
    chunk_positions: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Hinton's mix ``alpha * CE(student, hard) + (1 - alpha) * T^2 * mean_P divergence`` in chunks.

    student_logits: (P, V) any float dtype (math in float32, float64 stays float64). ids: (P, K)
    int64 kept ids; kept: (P, K) bool, False on padding slots (which repeat a kept id), or None.
    divergence: called on each chunk of n positions as ``divergence(student_lp (n, K),
    student_tail (n,), within (n, M) or None, *rows of targets)`` -> (n,), differentiable in the
    first three (the student's tempered bucket log-probs, -inf on padding slots, and the
    log-probabilities of ``tail_ids`` within its tail). targets: tensors with P rows (the
    teacher's side), sliced per chunk. hard_labels: (P,) int64 or None (only with alpha == 0).
    Returns ``(loss, soft, ce)``: loss a scalar differentiable w.r.t. the logits; soft (the mean
    divergence) and ce (mean over labelled positions, None when alpha == 0) are detached values.
    """
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    spec = _Spec(ids, kept, divergence, targets, float(temperature), float(alpha), hard_labels, ignore_index,
                 tail_ids, chunk_positions, need_grad)
    loss, soft, ce = _FusedBucketLoss.apply(student_logits, spec)
    return loss, soft, (ce if alpha > 0 else None)


class _Spec:
    """Everything but the logits, handed through ``autograd.Function.apply`` as one object."""

    def __init__(self, ids, kept, divergence, targets, temperature, alpha, hard_labels, ignore_index, tail_ids,
                 chunk_positions, need_grad):
        self.ids, self.kept, self.divergence, self.targets = ids, kept, divergence, targets
        self.temperature, self.alpha, self.hard, self.ignore_index = temperature, alpha, hard_labels, ignore_index
        self.tail_ids, self.chunk_positions, self.need_grad = tail_ids, chunk_positions, need_grad


class _FusedBucketLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, spec: _Spec):
        p, v = logits.shape
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        dev = logits.device
        t, alpha = spec.temperature, spec.alpha
        hard = None if alpha == 0.0 else spec.hard.to(dev)
        labelled = None if hard is None else (hard != spec.ignore_index).sum().clamp_min(1)
        grad = torch.empty_like(logits) if spec.need_grad else None
        soft_sum = torch.zeros((), dtype=dtype, device=dev)
        ce_sum = torch.zeros((), dtype=dtype, device=dev)
        step = spec.chunk_positions or max(1, CHUNK_ELEMENTS // max(v, 1))
        for lo in range(0, p, step):
            rows = slice(lo, min(p, lo + step))
            out = None if grad is None or grad.dtype != dtype else grad[rows]  # written in place where it can be
            div, ce, dz = _chunk(logits[rows], spec, rows, dtype, hard, labelled, p, out)
            soft_sum += div.sum()
            if ce is not None:
                ce_sum += ce
            if grad is not None and dz is not out:
                grad[rows] = dz
        soft = soft_sum / max(p, 1)
        ce = ce_sum / labelled if labelled is not None else ce_sum
        loss = (1.0 - alpha) * t * t * soft + (alpha * ce if alpha > 0 else 0.0)
        ctx.mark_non_differentiable(soft, ce)
        ctx.has_grad = grad is not None
        if grad is not None:  # saved, so autograd frees it with the graph (or keeps it for retain_graph)
            ctx.save_for_backward(grad, torch.ones((), dtype=grad.dtype, device=dev))  # and the scale it holds
        return loss, soft, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_soft, _grad_ce):
        if not ctx.has_grad:
            return None, None
        grad, scale = ctx.saved_tensors
        # a scaled loss (gradient accumulation, AMP): rescale in place, with no second (P, V) and no host
        # read of grad_loss; .data, as the saved tensors' version counters must not see it
        want = grad_loss.to(grad.dtype)
        if grad.device.type == "cpu" and bool(want == scale):  # on the CPU a host read is free and a (P, V) pass is not
            return grad, None
        grad.data.mul_(want / scale)
        scale.data.copy_(want)
        return grad, None


def _chunk(x: Tensor, spec: _Spec, rows: slice, dtype: torch.dtype, hard: Tensor | None, labelled: Tensor | None,
           p_total: int, out: Tensor | None):
    """(divergence (n,), summed CE or None, gradient (n, V) or None, written into ``out`` if given) for one chunk
    of n positions."""
    t, alpha, dev = spec.temperature, spec.alpha, x.device
    ids = spec.ids[rows].to(dev)
    kept = None if spec.kept is None else spec.kept[rows].to(dev)
    tail_ids = None if spec.tail_ids is None else spec.tail_ids[rows].to(dev)
    y = None if hard is None else hard[rows]
    labelled_rows = None if y is None else y != spec.ignore_index
    y_safe = None if y is None else torch.where(labelled_rows, y, 0)[:, None]  # (n, 1)

    z = _workspace(x.shape, dtype, dev)  # (n, V) masked and exponentiated in place below
    torch.div(x, t, out=z) if t != 1.0 else z.copy_(x)
    at = _Flat(ids, x.shape[1])  # the kept ids' places in a contiguous (n, V)
    head_z = at.take(z)  # (n, K), padding slots too (they repeat a kept id)
    head_x = head_z if kept is None else torch.where(kept, head_z, _NEG_INF)
    draw_z = None if tail_ids is None else z.gather(1, tail_ids)  # (n, M)
    shared_ce = t in (1.0, 2.0)  # the cross-entropy comes from the tail's softmax (at T = 2 through its square)
    y_z = None if y is None or not shared_ce else z.gather(1, y_safe)[:, 0]
    at.put(z, torch.full((), _NEG_INF, dtype=z.dtype, device=dev))  # the tail alone
    m = z.amax(1, keepdim=True)  # (n, 1) the tail's largest logit (amax: max with indices is ~20x slower on CPU)
    empty = torch.isneginf(m)  # (n, 1) every id kept: no tail
    # exp(z - m) on the tail (its max is 1), 0 on the kept ids. They are 0 before the exp and 0 again after it,
    # not -inf through it: on the CPU an exp over vectors holding -inf takes a slow path (1.5 ms at (512, 4,096)
    # with 64 ids a row set to -inf, against 0.35 ms)
    zero = torch.zeros((), dtype=z.dtype, device=dev)
    z.sub_(torch.where(empty, 0.0, m))
    at.put(z, zero)
    e = z.exp_()
    at.put(e, zero)
    del z  # r, the softmax within the tail, is e / e_sum: the division is folded into the weights below
    e_sum = torch.where(empty[:, 0], 1.0, e.sum(1))  # (n,) >= 1 (1 on an empty tail, where e is all 0)
    tail_lse = torch.where(empty[:, 0], _NEG_INF, m[:, 0] + e_sum.log())  # (n,) exact: no cancellation, no underflow
    head_lse = torch.logsumexp(head_x, 1)  # (n,)
    lse = torch.logaddexp(head_lse, tail_lse)  # (n,) the full normaliser
    head_lp, tail_lp = head_x - lse[:, None], tail_lse - lse
    log_sq = None
    if y is not None and t == 2.0:  # log sum_j q_j^2 over the tempered q: the untempered softmax is q^2 / sum q^2
        r_norm = torch.linalg.vector_norm(e, 2, 1) / e_sum  # (n,) sqrt(sum r^2) >= 1 / V, with no (n, V) temporary
        log_sq = torch.logaddexp(2.0 * (tail_lp + r_norm.log()), torch.logsumexp(2.0 * head_lp, 1))
    within = None if draw_z is None else draw_z - torch.where(torch.isfinite(tail_lse), tail_lse, 0.0)[:, None]

    targets = tuple(a[rows].to(dev) for a in spec.targets)
    leaves = [None if a is None else a.detach().requires_grad_(spec.need_grad) for a in (head_lp, tail_lp, within)]
    with torch.enable_grad():
        div = spec.divergence(*leaves, *targets)  # (n,)
        if spec.need_grad:
            live = [a for a in leaves if a is not None]
            grads = torch.autograd.grad(div.sum(), live, allow_unused=True)
    div = div.detach()
    ce, ce_w, ce_grad = None, None, None
    if y is not None:
        ce_w = torch.where(labelled_rows, alpha / labelled.to(dtype), 0.0)  # (n,) d loss / d CE of each row
        if t == 1.0:  # the soft term's softmax is the cross-entropy's: share it
            ce = torch.where(labelled_rows, lse - y_z, 0.0).sum()
        elif t == 2.0:  # log p_y = 2 log q_y - log sum q^2
            ce = torch.where(labelled_rows, log_sq - 2.0 * (y_z - lse), 0.0).sum()
        else:
            ce, ce_grad = _cross_entropy(x, y_safe, labelled_rows, ce_w, dtype, spec.need_grad)
    if not spec.need_grad:
        return div, ce, None

    ks = (1.0 - alpha) * t / p_total  # d loss / d divergence row ((1 - alpha) T^2 / P) times d z / d x (1 / T)
    g = [torch.zeros_like(a) if d is None else d * ks for a, d in zip(live, grads)]
    g_head, g_tail = g[0], g[1]  # (n, K), (n,)
    if kept is not None:
        g_head = torch.where(kept, g_head, 0.0)
    c = g[2] if within is not None else None  # (n, M)
    # d/dz_j = a0 q_j + g_k [j = id_k] + (g_t - sum_m c_m) r_j [j in the tail] + c_m [j = t_m], a0 = -(sum_k g_k + g_t),
    # q the softmax, r the softmax within the tail. On the tail q_j = q_t r_j, and the weight of r_j,
    # g_t (1 - q_t) - sum c + (a0 + g_t) q_t, takes 1 - q_t as the kept mass itself: no cancellation when q_t ~ 1
    a0 = -(g_head.sum(1) + g_tail)  # (n,) weight of q
    if ce_w is not None and t == 1.0:
        a0 = a0 + ce_w
    w_r = g_tail * torch.exp(head_lse - lse) + (a0 + g_tail) * torch.exp(tail_lp)  # (n,) weight of r
    if c is not None:
        w_r = w_r - c.sum(1)
    w_r = torch.where(empty[:, 0], 0.0, w_r)
    head_q = torch.exp(head_z - lse[:, None])  # (n, K) the kept ids' tempered q, padding slots too
    head_dz = head_q * a0[:, None]
    w_e = w_r / e_sum  # (n,) weight of e
    if log_sq is None:
        dz = torch.mul(e, w_e[:, None], out=e if out is None else out)  # (n, V), 0 on the kept ids
    else:  # + ce_w (p - onehot), p = q^2 / sum q^2: on the tail q^2 = exp(2 tail_lp) r^2 (a tiny r's square
        # underflows only where p < V^2 r^2 ~ 1e-35), on the kept ids from their q; out= must not alias e
        w_sq = torch.where(empty[:, 0], 0.0, ce_w * torch.exp(2.0 * (tail_lp - e_sum.log()) - log_sq))  # of e^2
        # (w_e + w_sq e) e in three in-place passes: addcmul with a broadcast (n, 1) input took 1.5x as long
        dz = torch.mul(e, w_sq[:, None], out=torch.empty_like(e) if out is None else out).add_(w_e[:, None]).mul_(e)
        head_dz = head_dz + ce_w[:, None] * torch.exp(2.0 * head_z.sub(lse[:, None]) - log_sq[:, None])
    if kept is None:  # distinct ids: one write of both terms
        at.put(dz, head_dz + g_head)
    else:
        at.put(dz, head_dz)  # a padding slot writes its kept id's value (the same value: its q and a0 are the kept id's)
        dz.scatter_add_(1, ids, g_head)  # 0 on padding slots
    if c is not None:
        dz.scatter_add_(1, tail_ids, c)
    if ce_w is not None and shared_ce:
        dz.scatter_add_(1, y_safe, -ce_w[:, None])
    if ce_grad is not None:
        dz += ce_grad
    return div, ce, dz


class _Flat:
    """Reads and writes of one chunk's kept ids (n, K) in an (n, V) tensor through flat indices where it is contiguous.

    On the CPU ``scatter_`` over (512, 64) ids of a (512, 4096) tensor took 0.29-0.34 ms,
    ``index_put_`` on the flat view 0.15-0.17 ms and ``put_`` 0.05 (2 threads: the whole loss at
    that size 6.96 against 7.19 ms with ``index_put_``, bitwise the same); ``take`` 0.12 against
    ``gather``'s 0.15. A non-contiguous tensor goes through ``gather``/``scatter_``.
    """

    def __init__(self, ids: Tensor, v: int):
        self.ids = ids
        self.flat = (ids + torch.arange(len(ids), device=ids.device)[:, None] * v).view(-1)  # (n K,)

    def take(self, t: Tensor) -> Tensor:
        return t.take(self.flat).view(self.ids.shape) if t.is_contiguous() else t.gather(1, self.ids)

    def put(self, t: Tensor, values: Tensor) -> None:
        """t[i, ids[i, k]] = values[i, k] (or a 0-dim value everywhere); on repeated ids, one of their values."""
        if t.is_contiguous():
            flat_values = values.reshape(-1) if values.dim() else values.expand(self.flat.shape)
            if torch.are_deterministic_algorithms_enabled():  # put_ refuses to run then; index_put_ is deterministic
                t.view(-1).index_put_((self.flat,), flat_values)
            else:
                t.put_(self.flat, flat_values)
        else:
            t.scatter_(1, self.ids, values.expand(self.ids.shape))


_WORKSPACE = threading.local()  # per thread: {(dtype, device): a flat buffer of the largest chunk so far}


def _workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised (n, V) buffer, reused from chunk to chunk and step to step on the CPU: a fresh 8 MiB
    buffer costs as much in page faults as a pass over it. CUDA's caching allocator reuses memory itself."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    cache = _WORKSPACE.__dict__.setdefault("buffers", {})
    n = shape[0] * shape[1]
    buf = cache.get(dtype)
    if buf is None or buf.numel() < n:
        buf = cache[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _cross_entropy(x: Tensor, y: Tensor, labelled: Tensor, weight: Tensor, dtype: torch.dtype, need_grad: bool):
    """Summed untempered CE of a chunk (x (n, V), y (n, 1)), and its weighted gradient (n, V) or None."""
    logp = x.to(dtype).log_softmax(1)  # (n, V) one fused kernel
    ce = torch.where(labelled, -logp.gather(1, y)[:, 0], 0.0).sum()
    if not need_grad:
        return ce, None
    return ce, logp.exp_().mul_(weight[:, None]).scatter_add_(1, y, -weight[:, None])


# --- the forward KL over a classifier's few outputs -------------------------------------------------------

def dense_bucket_loss(student_logits: Tensor, ids: Tensor, teacher_lp: Tensor, teacher_tail: Tensor, temperature: float,
                      alpha: float = 0.0, hard_labels: Tensor | None = None, ignore_index: int = -100,
                      compiled: bool | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Hinton's mix with the forward KL over the K+1 buckets, for a few outputs (a classifier's C).

    Returns ``(loss, soft, ce)``: ``loss = alpha * ce + (1 - alpha) * T^2 * soft`` carries the
    gradient; ``soft`` (the mean KL) and ``ce`` (the untempered cross-entropy on ``hard_labels``, mean
    over positions not ``ignore_index``; None when alpha is 0) are detached values. The same values
    and gradient as the plain loss's with ``kind="kl"``, with no padding slots and no tail draws, in
    about thirty whole-tensor operations whose gradient is written in closed form, with no autograd
    graph: at (256, 10) the plain loss's forty small operations and their backward cost more than
    the student's own step. The gradient w.r.t. the tempered logits of the soft term is
    ``(s q - target) / P``, q the student's softmax, s the teacher's total mass on the buckets (1 up to
    the store's rounding) and target the teacher's p on the kept ids and ``p_tail * q_j / q_tail``
    on the tail's ids; the cross-entropy's is ``(q - onehot) / n`` at T = 1.

    On a CPU with a C compiler (``distill.storage.native``; not with ``DISTILL_NATIVE=0``), float32
    logits of up to ``COMPILED_DENSE_ELEMENTS`` take ``bucketloss.c`` instead: one pass per position,
    the same values to float32 rounding (forward and backward 0.12 against 0.24 ms at (256, 10));
    ``compiled`` False never takes it, True requires it (RuntimeError where it does not apply).
    Elsewhere the work runs outputs-major, on (C, P) copies: each softmax, max and sum over a few
    outputs is then a pass over rows of P values, not P passes over C values (on a CPU, a
    log-softmax over 10 outputs of 256 positions took 26 us in the positions-major layout and 3 us
    in this one).

    student_logits: (P, C) any float dtype (math in float32, float64 stays float64); ids: (P, K) distinct
    kept ids; teacher_lp (P, K), teacher_tail (P,): the teacher's tempered log-probs; hard_labels (P,).
    """
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if alpha > 0 and hard_labels is None:
        raise ValueError(f"alpha = {alpha} mixes in the cross-entropy: pass hard_labels")
    loss, soft, ce = _DenseBucketLoss.apply(student_logits, ids, teacher_lp, teacher_tail, hard_labels,
                                            float(temperature), float(alpha), ignore_index, need_grad, compiled)
    return loss, soft, ce if alpha > 0 else None


def _compiled_dense(logits: Tensor, ids: Tensor, teacher_lp: Tensor, teacher_tail: Tensor, hard: Tensor | None,
                    t: float, alpha: float, ignore_index: int, need_grad: bool) -> tuple[Tensor, ...] | None:
    """(loss, soft, ce, gradient or None) from ``bucketloss.c``, or None where it does not apply (not float32 on a
    CPU, no compiler, an id or label out of range: the torch path then says which)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or ids.device.type != "cpu":
        return None
    lib = native.compiled(BUCKET_LOSS)
    if lib is None:
        return None
    (p, c), k = logits.shape, ids.shape[1]
    x, ids, a, a_tail = (_plain(v, dtype) for v, dtype in ((logits.detach(), torch.float32), (ids, torch.int64),
                                                           (teacher_lp, torch.float32), (teacher_tail, torch.float32)))
    y = _plain(hard, torch.int64) if hard is not None and alpha > 0 else None
    grad = torch.empty_like(x) if need_grad else None
    out = torch.zeros(3, dtype=torch.float64)  # the KL summed, the cross-entropy summed, labelled positions
    status = lib.distill_dense_bucket_loss(x.data_ptr(), p, c, ids.data_ptr(), k, a.data_ptr(), a_tail.data_ptr(),
                                           None if y is None else y.data_ptr(), 1.0 / t, alpha, ignore_index,
                                           None if grad is None else grad.data_ptr(), out.data_ptr())
    if status:
        return None
    div, ce_sum, n = out.tolist()
    soft, ce = div / max(p, 1), ce_sum / max(n, 1.0) if alpha > 0 else 0.0
    loss, soft, ce = torch.tensor([soft * ((1.0 - alpha) * t * t) + alpha * ce, soft, ce]).unbind()  # float32
    return loss, soft, ce, grad


def _plain(v: Tensor, dtype: torch.dtype) -> Tensor:
    """``v`` as a contiguous CPU tensor of ``dtype`` (itself when it is one already)."""
    return v if v.dtype == dtype and v.device.type == "cpu" and v.is_contiguous() else v.to("cpu", dtype).contiguous()


class _DenseBucketLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, teacher_lp: Tensor, teacher_tail: Tensor, hard: Tensor | None,
                t: float, alpha: float, ignore_index: int, need_grad: bool, compiled: bool | None):
        done = None
        if compiled or (compiled is None and logits.numel() <= COMPILED_DENSE_ELEMENTS):
            done = _compiled_dense(logits, ids, teacher_lp, teacher_tail, hard, t, alpha, ignore_index, need_grad)
            if done is None and compiled:
                raise RuntimeError("the compiled dense loss needs float32 logits on a CPU with a C compiler, and ids "
                                   "and labels in range")
        if done is not None:
            loss, soft, ce, grad = done
            ctx.has_grad = need_grad
            if need_grad:
                ctx.save_for_backward(grad)
            ctx.mark_non_differentiable(soft, ce)
            return loss, soft, ce
        (p, c), k, dev = logits.shape, ids.shape[1], logits.device
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x = logits.t().to(dtype).contiguous()  # (C, P): outputs-major
        lq = (x * (1.0 / t) if t != 1.0 else x).log_softmax(0)  # (C, P) the student's tempered log q
        ids = ids.to(dev).t()  # (K, P)
        head_lq = lq.gather(0, ids)  # (K, P)
        # as the plain loss's _kl: a bucket the teacher leaves empty (-inf) adds 0; one the student leaves empty reads
        # as float32's smallest normal mass, a constant (no gradient)
        a = teacher_lp.to(dev, dtype).t().contiguous()  # (K, P)
        p_head = a.exp()
        live = head_lq > _NEG_INF
        div = a.nan_to_num_(neginf=0.0).sub_(head_lq.nan_to_num_(neginf=LOG_FLOOR)).mul_(p_head).sum()
        e = None
        if k < c:  # the tail: its log q exactly, however small (no log(1 - sum of the kept q))
            masked = lq.clone().scatter_(0, ids, _NEG_INF)  # (C, P) log q on the tail alone
            m = masked.amax(0).clamp_min_(-1e30)  # (P,) finite even where the tail is all -inf
            e = masked.sub_(m).exp_()  # (C, P) q_j / (q_max of the tail), 0 on the kept ids
            e_sum = e.sum(0)  # (P,) >= 1 unless the student's tail is empty
            tail_lq = e_sum.log().add_(m)  # (P,)
            a_t = teacher_tail.to(dev, dtype)
            p_tail = a_t.exp()  # (P,)
            live_t = tail_lq > _NEG_INF
            div = div + a_t.nan_to_num(neginf=0.0).sub_(tail_lq.nan_to_num_(neginf=LOG_FLOOR)).mul_(p_tail).sum()
        soft = div / max(p, 1)
        w_soft = (1.0 - alpha) * t * t
        loss = soft * w_soft
        ce = q1 = None
        if alpha > 0:
            y = hard.to(dev)
            labelled = y != ignore_index
            y = y.where(labelled, 0)[None]  # (1, P)
            n = labelled.sum().clamp_min_(1).to(dtype)
            lq1 = x.log_softmax(0) if t != 1.0 else lq  # (C, P) untempered
            ce = -torch.where(labelled, lq1.gather(0, y)[0], 0.0).sum() / n  # where: an ignored row may read -inf
            loss = loss + alpha * ce
            if need_grad:
                q1 = lq1.exp()  # before lq turns into q in place below
        ctx.has_grad = need_grad
        if need_grad:  # d KL / d z_j = s q_j - target_j: s the teacher's mass on live buckets, target its p on the
            # kept ids and p_tail q_j / q_tail on the tail
            p_live = p_head.mul_(live)
            s = p_live.sum(0)  # (P,)
            if e is not None:
                w_t = p_tail.mul_(live_t)
                s += w_t
            grad = lq.exp_().mul_(s)  # (C, P) s q, in place: lq is not needed any more
            if e is not None:
                grad.sub_(e.mul_(w_t / e_sum.clamp_min(1e-30)))
            grad = grad.scatter_add_(0, ids, p_live.neg_()).mul_(w_soft / (t * max(p, 1)))
            if q1 is not None:
                w = labelled.to(dtype).mul_(alpha).div_(n)[None]  # (1, P)
                grad.add_(q1.mul_(w)).scatter_add_(0, y, w.neg_())
            ctx.save_for_backward(grad.t().to(logits.dtype).contiguous())
        ce = soft.new_zeros(()) if ce is None else ce
        ctx.mark_non_differentiable(soft, ce)
        return loss, soft, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_soft, _grad_ce):
        if not ctx.has_grad:
            return (None,) * 10
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), *(None,) * 9
