"""Dense single-process references for the losses, written from the formulas of method.md.

float64, the full (unsharded) vocabulary restricted to the true `vocab` columns (so padding is handled
by never looking at it, not by -inf arithmetic), plain torch autograd for the gradients. Shares no
code with mgsr_megatron.losses.
"""

from __future__ import annotations

import copy

import torch


def _dists(student, teacher, temperature, vocab):
    log_q = torch.log_softmax(student[..., :vocab].double() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher[..., :vocab].double() / temperature, dim=-1)
    return log_p, log_q


def kl(p, log_p, log_r):
    return (p * (log_p - log_r)).sum(-1)


def divergence(student, teacher, kind, temperature=1.0, beta=0.5, alpha=0.1, vocab=None):
    vocab = vocab or student.shape[-1]
    log_p, log_q = _dists(student, teacher, temperature, vocab)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return kl(p, log_p, log_q)
    if kind == "reverse_kl":
        return kl(q, log_q, log_p)
    if kind == "symmetric_kl":
        return kl(p, log_p, log_q) + kl(q, log_q, log_p)
    if kind == "jsd":
        log_m = (beta * p + (1 - beta) * q).log()
        return beta * kl(p, log_p, log_m) + (1 - beta) * kl(q, log_q, log_m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_forward_kl":
        return kl(p, log_p, (alpha * p + (1 - alpha) * q).log())
    if kind == "skew_reverse_kl":
        return kl(q, log_q, (alpha * q + (1 - alpha) * p).log())
    raise ValueError(kind)


def sft(student, labels, mask, vocab):
    logits = student[..., :vocab].double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1).clamp(min=0),
                                           reduction="none").reshape(labels.shape)
    mask = mask.double()
    return (ce * mask).sum() / mask.sum() if mask.sum() > 0 else ce.sum() * 0


def dac(student, teacher, kd_mask, clipnet, cfg, vocab):
    """Exact sorted-band DAC-KL: sort the WHOLE teacher distribution, keep the first k_band."""
    log_p, log_q = _dists(student, teacher, cfg.temperature, vocab)
    log_p, log_q = log_p.reshape(-1, vocab), log_q.reshape(-1, vocab)
    p_sorted, order = log_p.exp().sort(dim=-1, descending=True)
    q_sorted = log_q.exp().gather(-1, order)
    cum = p_sorted.cumsum(-1)
    if cfg.dac_mode == "learned":
        k = cfg.k_feat
        head = p_sorted[:, :k]
        if head.shape[1] < k:  # fewer true tokens than K_feat: the rest are padded ids (p = 0)
            head = torch.cat([head, head.new_zeros(head.shape[0], k - head.shape[1])], dim=1)
        entropy = -(p_sorted * p_sorted.log()).nan_to_num(0.0).sum(-1)
        features = torch.cat([head.log().clamp(min=-20.0), entropy[:, None], head.sum(-1, keepdim=True)], dim=-1)
        a, b = clipnet(features)
        lower = (1 - cfg.rho) * torch.sigmoid(a)
        upper = lower + cfg.rho + (1 - lower - cfg.rho) * torch.sigmoid(b)
    else:
        lower = torch.full_like(cum[:, 0], cfg.fixed_l)
        upper = torch.full_like(cum[:, 0], cfg.fixed_u)
    k = min(cfg.k_band, vocab)
    p_b, q_b, c_b = p_sorted[:, :k], q_sorted[:, :k], cum[:, :k]
    c_before = c_b - p_b
    member = torch.sigmoid((upper[:, None] - c_before) / cfg.kappa) * torch.sigmoid((c_b - lower[:, None]) / cfg.kappa)
    pm, qm = p_b * member, q_b * member
    if cfg.band_norm == "tail_bucket":
        tail_p, tail_q = 1 - pm.sum(-1), 1 - qm.sum(-1)
        value = (pm * (pm.log() - qm.log())).sum(-1) + tail_p * (tail_p.log() - tail_q.log())
    else:
        pt, qt = pm / pm.sum(-1, keepdim=True), qm / qm.sum(-1, keepdim=True)
        value = (pt * (pt.log() - qt.log())).sum(-1)
    weight = kd_mask.reshape(-1).double()
    stats = [(x * weight).sum() / weight.sum() for x in (lower, upper, member.sum(-1), pm.sum(-1))]
    return (value * weight).sum() / weight.sum(), stats


def span(student, teacher, pair_mask, cfg, vocab):
    log_p, log_q = _dists(student, teacher, cfg.temperature, vocab)
    log_p, log_q = log_p.reshape(-1, vocab), log_q.reshape(-1, vocab)
    first = pair_mask.reshape(-1).nonzero()[:, 0]
    if first.numel() == 0:
        return (log_q.sum() * 0)
    r_t = log_p[first].exp() * log_p[first + 1].exp()
    r_s = log_q[first].exp() * log_q[first + 1].exp()
    if cfg.span_distance == "kl_normalised":
        rt, rs = r_t / r_t.sum(-1, keepdim=True), r_s / r_s.sum(-1, keepdim=True)
        values = (rt * (rt.log() - rs.log())).sum(-1)
    elif cfg.span_distance == "l1":
        values = (r_t - r_s).abs().sum(-1)
    else:
        values = ((r_t - r_s) ** 2).sum(-1)
    return values.mean()


def objective(student, teacher, labels, sft_mask, kd_mask, pair_mask, clipnet, cfg, vocab):
    """(loss, {term: value}, dac stats) in float64; gradients by autograd on `student` and `clipnet`."""
    terms = {"sft": sft(student, labels, sft_mask, vocab)}
    if cfg.dac_mode == "off":
        weight = kd_mask.double()
        per_token = divergence(student, teacher, cfg.kd_divergence, cfg.temperature, cfg.kd_beta, cfg.kd_alpha,
                               vocab=vocab)
        terms["dac_kl"] = (per_token * weight).sum() / weight.sum()
        stats = None
    else:
        terms["dac_kl"], stats = dac(student, teacher, kd_mask, clipnet, cfg, vocab)
    terms["span"] = span(student, teacher, pair_mask, cfg, vocab)
    loss = cfg.w_sft * terms["sft"] + cfg.w_dac * terms["dac_kl"] + cfg.w_span * terms["span"]
    return loss, terms, stats


def double_clipnet(clipnet):
    return copy.deepcopy(clipnet).double()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (relative to the tensor's scale)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-30)
    return ((actual - expected).abs().max() / scale).item()
