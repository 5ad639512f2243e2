"""The baseline token-level divergences (the paper's Table 3c), exact for vocab-parallel logits.

With s = logits / temperature, p = softmax(s_teacher) and q = softmax(s_student) over the whole
(global) vocabulary, per token:

    forward_kl       KL(p||q)             = sum_v p (log p - log q)
    reverse_kl       KL(q||p)             = sum_v q (log q - log p)
    symmetric_kl     KL(p||q) + KL(q||p)
    jsd              beta KL(p||m) + (1-beta) KL(q||m),    m = beta p + (1-beta) q        (GKD)
    tvd              0.5 sum_v |p - q|
    skew_forward_kl  KL(p||m),    m = alpha p + (1-alpha) q                              (DistiLLM)
    skew_reverse_kl  KL(q||m),    m = alpha q + (1-alpha) p

True KL, not the cross-entropy; no T^2 factor. Gradients flow to the student only (the teacher is a
constant). Writing g_v = dL/dq_v, the softmax chain rule gives dL/ds_v = q_v (g_v - sum_w q_w g_w);
the one global scalar C = sum_w q_w g_w is summed in the forward's all-reduce, so the backward is
local to the shard:

    forward_kl       dL/ds = q - p
    reverse_kl       dL/ds = q (log q - log p - L)
    symmetric_kl     the sum of the two, with C = KL(q||p)
    jsd              dL/ds = (1-beta) q (log q - log m - KL(q||m))
    tvd              dL/ds = 0.5 q (sign(q - p) - sum_w q_w sign(q_w - p_w))
    skew_forward_kl  g = -(1-alpha) p/m,             dL/ds = q (g - sum q g)
    skew_reverse_kl  dL/ds = q (log q - log m - alpha q/m - L + alpha sum q^2/m)

Collectives per chunk of rows: all-reduce MAX [n, 2], SUM [n, 2] (log-sum-exp of both), SUM [n, 2]
(value and C). Backward: none.
"""

from __future__ import annotations

import math

import torch

from mgsr_megatron.errors import UserError
from mgsr_megatron.losses.vocab_parallel import (
    Shard,
    _xlogx_free,
    all_reduce,
    check_same_shape,
    chunks,
    log_softmax_stats,
    shard_of,
)

KINDS = ("forward_kl", "reverse_kl", "symmetric_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
CHUNK_TOKENS = 1024  # rows per step of the public divergence(): bounds the forward/backward temporaries


def check_divergence_args(kind: str, temperature: float, beta: float, alpha: float, prefix: str = "") -> None:
    """One-line errors; `prefix` names the config keys (\"mgsr.kd_\" -> mgsr.kd_divergence, mgsr.kd_beta)."""
    name = f"{prefix}divergence" if prefix else "kind"
    if kind not in KINDS:
        raise UserError(f"{name}={kind!r} is not a known divergence (choose from {', '.join(KINDS)})")
    if not temperature > 0:
        raise UserError(f"temperature={temperature} must be > 0")
    if not 0.0 <= beta <= 1.0:
        raise UserError(f"{prefix}beta={beta} must lie in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"{prefix}alpha={alpha} must lie in [0, 1]")


def _log_weight(w: float) -> float:
    return math.log(w) if w > 0 else float("-inf")


def _mixture_log(weight_first: float, log_first: torch.Tensor, log_second: torch.Tensor) -> torch.Tensor:
    """log(w a + (1-w) b) from log a and log b."""
    return torch.logaddexp(log_first + _log_weight(weight_first), log_second + _log_weight(1.0 - weight_first))


def _terms(s_t, s_s, lse_t, lse_s, kind, beta, alpha):
    """Per-row local partials of (value, C) and the per-element tensors the gradient needs."""
    log_p = s_t - lse_t[:, None]
    log_q = s_s - lse_s[:, None]
    p, q = log_p.exp(), log_q.exp()
    zero = p.new_zeros(())
    if kind == "forward_kl":
        return _xlogx_free(p, log_p - log_q).sum(-1), None, (p, q, log_p, log_q)
    if kind == "reverse_kl":
        return _xlogx_free(q, log_q - log_p).sum(-1), None, (p, q, log_p, log_q)
    if kind == "symmetric_kl":
        reverse = _xlogx_free(q, log_q - log_p).sum(-1)
        return _xlogx_free(p, log_p - log_q).sum(-1) + reverse, reverse, (p, q, log_p, log_q)
    if kind == "jsd":
        log_m = _mixture_log(beta, log_p, log_q)
        kl_qm = _xlogx_free(q, log_q - log_m).sum(-1)
        value = beta * _xlogx_free(p, log_p - log_m).sum(-1) + (1 - beta) * kl_qm
        return value, kl_qm, (p, q, log_p, log_q, log_m)
    if kind == "tvd":
        sign = torch.sign(q - p)
        return 0.5 * (p - q).abs().sum(-1), (q * sign).sum(-1), (p, q, sign)
    if kind == "skew_forward_kl":
        log_m = _mixture_log(alpha, log_p, log_q)
        q_g = torch.where(p > 0, -(1 - alpha) * (log_q + log_p - log_m).exp(), zero)  # q * dL/dq
        return _xlogx_free(p, log_p - log_m).sum(-1), q_g.sum(-1), (p, q, q_g)
    if kind == "skew_reverse_kl":
        log_m = _mixture_log(alpha, log_q, log_p)
        q2_m = torch.where(q > 0, (2 * log_q - log_m).exp(), zero)
        return _xlogx_free(q, log_q - log_m).sum(-1), q2_m.sum(-1), (p, q, log_q, log_m, q2_m)
    raise AssertionError(kind)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits / T; no copy of float32 logits at T = 1 (the terms never write into it)."""
    return logits.float() if temperature == 1.0 else logits.float() / temperature


def divergence_rows(student, teacher, kind, temperature, beta, alpha, shard: Shard):
    """Forward for [n, V/TP] rows: (value [n], per-row state for `divergence_rows_grad`). 3 all-reduces."""
    s_t, s_s = _scaled(teacher, temperature), _scaled(student, temperature)
    (lse_t, lse_s), _ = log_softmax_stats([s_t, s_s], shard)
    lse_t, lse_s = lse_t.float(), lse_s.float()
    value, scalar, _ = _terms(s_t, s_s, lse_t, lse_s, kind, beta, alpha)
    packed = torch.stack([value, scalar if scalar is not None else torch.zeros_like(value)], dim=-1)
    all_reduce(packed, shard.group)
    return packed[:, 0], (lse_t, lse_s, packed[:, 0], packed[:, 1])


def divergence_rows_grad(student, teacher, kind, temperature, beta, alpha, state, grad_rows) -> torch.Tensor:
    """d(sum_rows grad_rows * value)/d student for the local shard; recomputes, no communication."""
    lse_t, lse_s, value, scalar = state
    s_t, s_s = _scaled(teacher, temperature), _scaled(student, temperature)
    _, _, parts = _terms(s_t, s_s, lse_t, lse_s, kind, beta, alpha)
    zero = s_s.new_zeros(())
    if kind == "forward_kl":
        p, q = parts[0], parts[1]
        grad = q - p
    elif kind == "reverse_kl":
        p, q, log_p, log_q = parts
        grad = _xlogx_free(q, log_q - log_p - value[:, None])
    elif kind == "symmetric_kl":
        p, q, log_p, log_q = parts
        grad = (q - p) + _xlogx_free(q, log_q - log_p - scalar[:, None])
    elif kind == "jsd":
        p, q, log_p, log_q, log_m = parts
        grad = (1 - beta) * _xlogx_free(q, log_q - log_m - scalar[:, None])
    elif kind == "tvd":
        p, q, sign = parts
        grad = 0.5 * q * (sign - scalar[:, None])
    elif kind == "skew_forward_kl":
        p, q, q_g = parts
        grad = q_g - q * scalar[:, None]
    elif kind == "skew_reverse_kl":
        p, q, log_q, log_m, q2_m = parts
        grad = torch.where(q > 0, q * (log_q - log_m - value[:, None] + alpha * scalar[:, None]) - alpha * q2_m,
                           zero)
    else:
        raise AssertionError(kind)
    return grad * (grad_rows[:, None] / temperature)


def forward_kl_owned(s_t: torch.Tensor, s_s: torch.Tensor, shard: Shard):
    """KL(p||q) per row of two scaled float32 tensors the caller owns (from `scaled_rows`: no -inf); both
    are overwritten. The lean path of the objective (dac_mode off, span). Returns (value, (lse_t, lse_s))."""
    (lse_t, lse_s), _ = log_softmax_stats([s_t, s_s], shard)
    log_p = s_t.sub_(lse_t.float()[:, None])
    p = log_p.exp()
    partial = p.mul_(log_p.sub_(s_s.sub_(lse_s.float()[:, None]))).sum(-1)
    return all_reduce(partial, shard.group), (lse_t, lse_s)


def forward_kl_owned_grad(s_t: torch.Tensor, s_s: torch.Tensor, lse, row_scale: torch.Tensor) -> torch.Tensor:
    """(q - p) * row_scale[:, None], built in s_s's memory (both inputs overwritten; no communication)."""
    lse_t, lse_s = lse
    p = s_t.sub_(lse_t.float()[:, None]).exp_()
    return s_s.sub_(lse_s.float()[:, None]).exp_().sub_(p).mul_(row_scale[:, None])


class _VocabParallelDivergence(torch.autograd.Function):
    """Per-row divergence of [n, V/TP] shards, computed and differentiated CHUNK_TOKENS rows at a time."""

    @staticmethod
    def forward(ctx, student, teacher, kind, temperature, beta, alpha, shard):
        values, states = [], []
        for start, end in chunks(student.shape[0], CHUNK_TOKENS):
            value, state = divergence_rows(student[start:end], teacher[start:end], kind, temperature, beta,
                                           alpha, shard)
            values.append(value)
            states.append(torch.stack(state, dim=-1))
        ctx.save_for_backward(student, teacher, torch.cat(states) if states else student.new_zeros(0, 4))
        ctx.settings = (kind, temperature, beta, alpha)
        return torch.cat(values) if values else student.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_values):
        student, teacher, states = ctx.saved_tensors
        kind, temperature, beta, alpha = ctx.settings
        grad = torch.empty_like(student)
        for start, end in chunks(student.shape[0], CHUNK_TOKENS):
            state = states[start:end].unbind(-1)
            grad[start:end] = divergence_rows_grad(student[start:end], teacher[start:end], kind, temperature,
                                                   beta, alpha, state, grad_values[start:end].float())
        return grad, None, None, None, None, None, None


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, *, temperature: float = 1.0,
               beta: float = 0.5, alpha: float = 0.1, tp_group=None) -> torch.Tensor:
    """Per-token divergence between the teacher's and the student's distributions (module docstring).

    Logits are vocab-parallel shards [..., V/TP] (padded columns already -inf in both); the result has
    the logits' shape without the last dimension, float32, not reduced. Exact for any TP with the given
    group (default: Megatron's TP group when initialised, else a single process). Differentiable with
    respect to `student_logits`; `teacher_logits` is treated as a constant and may be bf16.
    """
    check_divergence_args(kind, temperature, beta, alpha)
    check_same_shape(student_logits, teacher_logits)
    shard = shard_of(student_logits.shape[-1], tp_group)
    lead = student_logits.shape[:-1]
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    values = _VocabParallelDivergence.apply(student, teacher, kind, float(temperature), float(beta),
                                            float(alpha), shard)
    return values.reshape(lead)
