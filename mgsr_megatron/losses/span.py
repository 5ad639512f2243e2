"""Span correlation consistency (method.md §3), exact for vocab-parallel logits.

For a pair of adjacent positions (i, i+1) inside a span, the correlation is the element-wise product
r = P_i * P_(i+1) (teacher) and r' = Q_i * Q_(i+1) (student), at the temperature.

    kl_normalised (default)  r^ = r / sum_v r  = softmax((z_i + z_(i+1)) / T): the normalised product is
                             the softmax of the summed logits, so KL(r^_t || r^_s) is the forward KL of
                             the "pair logits" z_i + z_(i+1); its gradient (r^_s - r^_t) / T goes to both
                             positions. 3 batched all-reduces per chunk ([pairs, 2] each), no backward
                             communication.
    l1                       sum_v |r_t - r_s|          (the paper-literal raw products)
    l2                       sum_v (r_t - r_s)^2        (squared Euclidean distance; project choice)

For l1/l2 with g = dD/dr_s (sign(r_s - r_t), resp. 2 (r_s - r_t)) and C = sum_v g_v r_s,v:
dD/ds_i = g r_s - Q_i C and dD/ds_(i+1) = g r_s - Q_(i+1) C (C is summed in the forward all-reduce).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mgsr_megatron.losses.divergences import forward_kl_owned, forward_kl_owned_grad
from mgsr_megatron.losses.vocab_parallel import NEG_LARGE, Shard, all_reduce, consecutive_runs, log_softmax_stats

SPAN_DISTANCES = ("kl_normalised", "l1", "l2")


class PairGrad(NamedTuple):
    """The row tensors of one chunk of pairs in the backward (`span_pairs_grad`)."""

    first: torch.Tensor  # [pairs] row of each pair's first position in the flattened [tokens, V/TP] logits
    weight: torch.Tensor  # [pairs] the weight of each pair's distance in the loss
    out: torch.Tensor  # [tokens, V/TP] the gradient buffer: rows out_first and out_second are added to
    out_first: torch.Tensor  # [pairs] the buffer row of position first (first itself in a b-major buffer)
    out_second: torch.Tensor  # [pairs] the buffer row of position first + 1


def pair_rows(rows: torch.Tensor, first: torch.Tensor, temperature: float) -> torch.Tensor:
    """(z_first + z_(first+1)) / T as a fresh float32 tensor, -inf replaced by NEG_LARGE."""
    out = torch.empty(first.shape[0], rows.shape[1], dtype=torch.float32, device=rows.device)
    for at, row, n in consecutive_runs(first.tolist()):  # a span of n tokens: a run of n - 1 pairs
        if rows.dtype == torch.float32:
            torch.add(rows[row:row + n], rows[row + 1:row + 1 + n], out=out[at:at + n])
        else:  # add in float32, not in the logits' dtype
            out[at:at + n] = rows[row:row + n]
            out[at:at + n] += rows[row + 1:row + 1 + n]
    if temperature != 1.0:
        out.div_(temperature)
    return out.clamp_(min=NEG_LARGE)


def _raw_products(student, teacher, first, temperature, shard):
    second = first + 1
    s_t = teacher.index_select(0, torch.cat([first, second])).float() / temperature
    s_s = student.index_select(0, torch.cat([first, second])).float() / temperature
    (lse_t, lse_s), _ = log_softmax_stats([s_t, s_s], shard)
    n = first.shape[0]
    log_p = s_t - lse_t.float()[:, None]
    log_q = s_s - lse_s.float()[:, None]
    r_t = (log_p[:n] + log_p[n:]).exp()
    r_s = (log_q[:n] + log_q[n:]).exp()
    return r_t, r_s, log_q[:n].exp(), log_q[n:].exp()


def span_pairs(student, teacher, first, distance, temperature, shard: Shard):
    """Distance per pair for pairs (first, first+1) of rows of the flattened [tokens, V/TP] logits, and the
    per-pair state the backward reuses (the pair log-sum-exps for kl_normalised)."""
    if distance == "kl_normalised":
        return forward_kl_owned(pair_rows(teacher, first, temperature), pair_rows(student, first, temperature),
                                shard)
    r_t, r_s, _, _ = _raw_products(student, teacher, first, temperature, shard)
    local = (r_t - r_s).abs().sum(-1) if distance == "l1" else (r_t - r_s).square().sum(-1)
    return all_reduce(local, shard.group), None


def span_pairs_grad(student, teacher, pairs: PairGrad, distance, temperature, shard: Shard, state):
    """Add d(sum_pairs pairs.weight * distance)/d student into `pairs.out` (rows first and first+1)."""
    first, pair_weight, grad_out, out_first, out_second = pairs
    if distance == "kl_normalised":
        s_t, s_s = pair_rows(teacher, first, temperature), pair_rows(student, first, temperature)
        grad_first = grad_second = forward_kl_owned_grad(s_t, s_s, state, pair_weight / temperature)
    else:
        r_t, r_s, q_first, q_second = _raw_products(student, teacher, first, temperature, shard)
        g = torch.sign(r_s - r_t) if distance == "l1" else 2.0 * (r_s - r_t)
        g_r = g * r_s
        scalar = all_reduce(g_r.sum(-1), shard.group)[:, None]
        scale = pair_weight[:, None] / temperature
        grad_first = (g_r - q_first * scalar) * scale
        grad_second = (g_r - q_second * scalar) * scale
    grad_out.index_add_(0, out_first, grad_first.to(grad_out.dtype))
    grad_out.index_add_(0, out_second, grad_second.to(grad_out.dtype))
    return grad_out
