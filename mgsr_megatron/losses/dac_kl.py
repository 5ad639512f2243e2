"""DAC-KL: KL on the teacher's semantically dense band, with bounds predicted by ClipNet (method.md §2).

Per token, with P the teacher's and Q the student's distribution at the temperature:

    sort P descending (global top-K, K = max(K_band, K_feat)): p_(1) >= p_(2) >= ...,  c_k = p_(1) + ... + p_(k)
    phi    = [ log p_(1..K_feat) clamped at -20,  H(P),  c_K_feat ]
    (a, b) = ClipNet(phi)            l = (1 - rho) sigmoid(a)       u = l + rho + (1 - l - rho) sigmoid(b)
    m_k    = sigmoid((u - c_(k-1)) / kappa) * sigmoid((c_k - l) / kappa)          k = 1..K_band
    tail_bucket:  KL(P~||Q~) = sum_k p_k m_k log(p_k / q_k) + P_t log(P_t / Q_t),
                  P_t = 1 - sum_k p_k m_k,  Q_t = 1 - sum_k q_k m_k
    renormalize:  P~ = p m / sum(p m), Q~ = q m / sum(q m):
                  KL = sum_k P~_k log(p_k / q_k) + log sum(q m) - log sum(p m)

q_k is the student's probability at the teacher's k-th token id. Modes: `learned` (ClipNet), `fixed`
(constant l, u), `off` (the full forward KL, handled by the objective).

Vocab-parallel: the teacher's top-K comes from a local top-K, one all-gather of (value, id) packets and
a merge; the student's logits at those ids from the owning ranks by one SUM all-reduce. Everything
after that is a [n, K] computation REPLICATED on every TP rank: l, u, the band and the loss are
bitwise identical across the TP group, hence so is ClipNet's gradient (no extra collective is
needed to keep ClipNet in sync inside a TP group; the trainer all-reduces it over DP with the
student's gradients). The student's gradient on its shard follows locally from w_k = dL/dlog q_k:
dL/ds_v = sum_{k: id_k = v} w_k - q_v sum_k w_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from mgsr_megatron.errors import UserError
from mgsr_megatron.losses.vocab_parallel import (
    Shard,
    gather_at_ids,
    global_topk,
    log_softmax_stats,
    scatter_add_at_ids,
)

FEATURE_LOGP_FLOOR = -20.0
BAND_NORMS = ("tail_bucket", "renormalize")
DAC_MODES = ("learned", "fixed", "off")


@dataclass(frozen=True, kw_only=True)
class DacSettings:
    """The token-level distillation term's settings, built once from the config (`from_config(cfg.mgsr)`)
    and passed whole. DAC-KL (`mode` learned | fixed) reads the band fields; `mode` off replaces it by
    the divergence `kd_divergence` (with `kd_beta`, `kd_alpha`) over the whole vocabulary."""

    mode: str = "learned"  # learned | fixed | off (mgsr.dac_mode)
    k_feat: int = 64
    k_band: int = 256
    rho: float = 0.8
    kappa: float = 0.01
    band_norm: str = "tail_bucket"
    fixed_l: float = 0.0
    fixed_u: float = 0.95
    temperature: float = 1.0
    kd_divergence: str = "forward_kl"
    kd_beta: float = 0.5
    kd_alpha: float = 0.1

    @classmethod
    def from_config(cls, cfg) -> DacSettings:
        """From an MGSRConfig (the `mgsr` section)."""
        return cls(mode=cfg.dac_mode, k_feat=cfg.k_feat, k_band=cfg.k_band, rho=cfg.rho, kappa=cfg.kappa,
                   band_norm=cfg.band_norm, fixed_l=cfg.fixed_l, fixed_u=cfg.fixed_u,
                   temperature=float(cfg.temperature), kd_divergence=cfg.kd_divergence, kd_beta=cfg.kd_beta,
                   kd_alpha=cfg.kd_alpha)

    @property
    def k_top(self) -> int:
        """Candidates of the teacher's global top-K: the band's, and ClipNet's features when learned."""
        return max(self.k_band, self.k_feat if self.mode == "learned" else 0)

    @property
    def fused_kd(self) -> bool:
        """Whether the term shares the student's softmax with SFT: DAC-KL and the forward KL do, the
        other divergences do not."""
        return self.mode != "off" or self.kd_divergence == "forward_kl"


class GradRows(NamedTuple):
    """The row tensors of one chunk's backward (`dac_backward_rows`, the objective's dac_mode off path)."""

    student: torch.Tensor  # [n, V/TP] the student's logits shard of the chunk
    row_weight: torch.Tensor  # [n] the weight of each row's term in the loss
    out: torch.Tensor  # [n, V/TP] float32: the gradient is written here
    sft: tuple[torch.Tensor, torch.Tensor] | None = None  # (labels [n], weight [n]): fuse SFT's gradient


def _logit(x: float) -> float:
    return math.log(x / (1.0 - x))


class ClipNet(nn.Module):
    """MLP (K_feat + 2 -> hidden -> 2, GELU) giving the raw band parameters (a, b) per token.

    Parameters are drawn from a private generator seeded with `seed`, so every rank that builds
    ClipNet with the same arguments holds identical parameters (the global RNG is not touched).
    The output layer starts near zero with biases chosen so that, for the given `rho`, the initial
    bounds are l ~ init_l and u ~ init_u (method.md: l ~ 0, u ~ 0.95).
    """

    def __init__(self, k_feat: int = 64, hidden: int = 128, seed: int = 1234, *, rho: float = 0.8,
                 init_l: float = 1e-3, init_u: float = 0.95):
        super().__init__()
        if not 0.0 < init_l < 1.0 - rho < 1.0 or not init_l + rho < init_u < 1.0:
            raise UserError(f"ClipNet: need 0 < init_l < 1 - rho and init_l + rho < init_u < 1 "
                             f"(init_l={init_l}, rho={rho}, init_u={init_u})")
        self.k_feat, self.hidden = k_feat, hidden
        generator = torch.Generator().manual_seed(seed)
        n_in = k_feat + 2
        bound = 1.0 / math.sqrt(n_in)
        self.fc1_weight = nn.Parameter(torch.empty(hidden, n_in).uniform_(-bound, bound, generator=generator))
        self.fc1_bias = nn.Parameter(torch.empty(hidden).uniform_(-bound, bound, generator=generator))
        self.fc2_weight = nn.Parameter(torch.empty(2, hidden).normal_(0.0, 0.01 / math.sqrt(hidden),
                                                                      generator=generator))
        self.fc2_bias = nn.Parameter(torch.tensor([_logit(init_l / (1.0 - rho)),
                                                   _logit((init_u - init_l - rho) / (1.0 - init_l - rho))]))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = nn.functional.gelu(nn.functional.linear(features, self.fc1_weight, self.fc1_bias))
        out = nn.functional.linear(hidden, self.fc2_weight, self.fc2_bias)
        return out[..., 0], out[..., 1]


def bounds(a: torch.Tensor, b: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(l, u) with u - l >= rho by construction."""
    lower = (1.0 - rho) * torch.sigmoid(a)
    upper = lower + rho + (1.0 - lower - rho) * torch.sigmoid(b)
    return lower, upper


def band_features(log_p_top: torch.Tensor, entropy: torch.Tensor, k_feat: int) -> torch.Tensor:
    """phi = [log p_(1..K_feat) clamped, H(P), c_K_feat] from the sorted top log-probs."""
    head = log_p_top[:, :k_feat]
    kept = head.exp().sum(-1, keepdim=True)
    return torch.cat([head.clamp(min=FEATURE_LOGP_FLOOR), entropy[:, None], kept], dim=-1)


def band_kl(log_p: torch.Tensor, log_q: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, kappa: float,
            band_norm: str):
    """KL(P~||Q~) per row from the sorted band candidates [n, K_band]; returns (kl, band size, kept mass).

    Band size = sum of the memberships of the candidates with p > 0 (padded ids never count).

    Differentiable in log_q, lower and upper. Entries with p = 0 (padded ids) contribute nothing.
    """
    p = log_p.exp()
    q = log_q.exp()
    cum = p.cumsum(-1)
    cum_before = torch.nn.functional.pad(cum[:, :-1], (1, 0))
    member = torch.sigmoid((upper[:, None] - cum_before) / kappa) * torch.sigmoid((cum - lower[:, None]) / kappa)
    p_band = p * member
    q_band = q * member
    kept_p = p_band.sum(-1)
    kept_q = q_band.sum(-1)
    log_ratio = torch.where(p > 0, log_p - log_q, p.new_zeros(()))
    head = (p_band * log_ratio).sum(-1)
    tiny = torch.finfo(p.dtype).tiny
    if band_norm == "tail_bucket":
        tail_p = 1.0 - kept_p
        tail_q = (1.0 - kept_q).clamp(min=tiny)
        tail = torch.where(tail_p > 0, tail_p * (tail_p.clamp(min=tiny).log() - tail_q.log()), p.new_zeros(()))
        kl = head + tail
    else:
        kl = head / kept_p + kept_q.clamp(min=tiny).log() - kept_p.log()
    return kl, torch.where(p > 0, member, p.new_zeros(())).sum(-1), kept_p


class DacState:
    """The replicated [n, K] quantities of one chunk of rows, kept from the forward for the backward
    (about 20 bytes per candidate token and row: ~5 KB per token at K=256, ~1-4% of a logits row).

    `entropy` [n]: the teacher's H(P) at the temperature when the caller knows it better than `teacher`
    does (a top-K cache, whose dense rebuild has a uniform tail and hence a larger entropy than the
    teacher's); it is then ClipNet's entropy feature as given. None: H(P) = lse_t - sum_v P_v s_v of
    `teacher` (float64 sums; computed either way, since they come with lse_t's float64 accumulation).
    Either way the value is per token and the same on every TP rank."""

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float, k_top: int,
                 shard: Shard, entropy: torch.Tensor | None = None):
        (self.lse_t, self.lse_s), (self.entropy,) = log_softmax_stats([teacher, student], shard, entropy_of=(0,),
                                                                      temperature=temperature)
        if entropy is not None:
            self.entropy = entropy.to(torch.float64)
        # The teacher's raw logits rank as their division by T does; the float64 division below is exact,
        # where a float32 division would move the band edges (amplified by 1/kappa).
        top_raw, ids = global_topk(teacher, k_top, shard)
        self.ids = ids.int() if shard.vocab < 2 ** 31 else ids
        self.log_p = top_raw.double() / temperature - self.lse_t[:, None]
        self.log_q = gather_at_ids(student.float(), ids, shard).double() / temperature - self.lse_s[:, None]


def dac_bounds(state: DacState, settings: DacSettings, clipnet: ClipNet | None):
    """(l, u) per row in float64. ClipNet runs on float64 copies of its parameters (a differentiable
    cast): the gradient to l and u sums many terms of both signs over the band, and in float32 that
    cancellation costs ~1e-4 relative accuracy in ClipNet's gradient. [n, K] work only, so it is cheap."""
    n = state.log_p.shape[0]
    if settings.mode == "learned":
        features = band_features(state.log_p, state.entropy, settings.k_feat)
        params = {name: p.double() for name, p in clipnet.named_parameters()}
        a, b = torch.func.functional_call(clipnet, params, (features,))
        return bounds(a, b, settings.rho)
    return (state.log_p.new_full((n,), settings.fixed_l, dtype=torch.float64),
            state.log_p.new_full((n,), settings.fixed_u, dtype=torch.float64))


def dac_forward_rows(student, teacher, settings: DacSettings, clipnet: ClipNet | None, shard: Shard,
                     entropy: torch.Tensor | None = None):
    """DAC-KL of a chunk of rows, no autograd: (kl [n], l, u, band size, kept mass, lse_t, lse_s, state).
    `entropy` [n]: the teacher's true H(P) where `teacher` is a rebuild (see DacState), else None."""
    state = DacState(student, teacher, settings.temperature, settings.k_top, shard, entropy)
    k_band = settings.k_band
    with torch.no_grad():
        lower, upper = dac_bounds(state, settings, clipnet)
        kl, size, kept = band_kl(state.log_p[:, :k_band], state.log_q[:, :k_band], lower, upper, settings.kappa,
                                 settings.band_norm)
    return kl.float(), lower.float(), upper.float(), size.float(), kept.float(), state.lse_t, state.lse_s, state


def subtract_label_onehot(out: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, shard: Shard) -> None:
    """out[r, labels[r]] -= weight[r] on the rank owning the label (the one-hot part of the CE gradient)."""
    scatter_add_at_ids(out, labels[:, None], -weight[:, None], shard)


def student_softmax_into(out: torch.Tensor, student: torch.Tensor, lse_s: torch.Tensor, temperature: float):
    """out <- softmax(student / T) on this shard (no communication; lse_s is the global log-sum-exp)."""
    if temperature == 1.0 and student.dtype == out.dtype:
        torch.sub(student, lse_s.to(out.dtype)[:, None], out=out)
    else:
        out.copy_(student)
        if temperature != 1.0:
            out.div_(temperature)
        out.sub_(lse_s.to(out.dtype)[:, None])
    return out.exp_()


def dac_backward_rows(rows: GradRows, state: DacState, settings: DacSettings, clipnet: ClipNet | None, params,
                      shard: Shard):
    """Write into `rows.out` [n, V/TP] the student's shard gradient of sum_rows row_weight * kl (plus, with
    rows.sft = (labels, weight) at temperature 1, the SFT gradient weight * (softmax - onehot), whose
    softmax is the same tensor); return ClipNet's parameter gradients. Only the [n, K] part is recomputed
    (with autograd); no communication."""
    k_band, temperature, sft = settings.k_band, settings.temperature, rows.sft
    log_q = state.log_q[:, :k_band].clone().requires_grad_(True)
    with torch.enable_grad():
        lower, upper = dac_bounds(state, settings, clipnet)
        kl, _, _ = band_kl(state.log_p[:, :k_band], log_q, lower, upper, settings.kappa, settings.band_norm)
        total = (kl * rows.row_weight.double()).sum()
        grads = torch.autograd.grad(total, [log_q, *params], allow_unused=True)
    weight = grads[0].float().div_(temperature)  # dL/ds at the band ids, before the softmax term
    q_scale = -weight.sum(-1, keepdim=True)  # d/ds_v = sum_{k: id_k = v} w_k - q_v sum_k w_k
    if sft is not None:
        q_scale = q_scale + sft[1][:, None]
    student_softmax_into(rows.out, rows.student, state.lse_s, temperature).mul_(q_scale)
    scatter_add_at_ids(rows.out, state.ids[:, :k_band].long(), weight, shard)
    if sft is not None:
        subtract_label_onehot(rows.out, sft[0], sft[1], shard)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[1:], params)]
