"""The MGSR objective: L = w_sft * L_SFT + w_dac * L_DAC-KL + w_span * L_span (method.md, top).

Reduction (each term is a mean over its OWN mask, within this micro-batch):
    L_SFT   = sum_i sft_mask_i * CE_i / sum_i sft_mask_i                 (0 when sft_mask is empty)
    L_DAC   = sum_i kd_mask_i * KL(P~_i||Q~_i) / sum_i kd_mask_i          (dac_mode off: the full forward KL)
    L_span  = sum over pairs (i, i+1) with span_pair_mask_i of D_i / number of pairs   (0 without pairs)
Averaging over data-parallel ranks and micro-batches is the trainer's business.

Memory: one autograd.Function runs the whole objective in chunks of `loss_chunk_tokens` rows (only the
rows with a positive sft_mask or kd_mask: prompt and padding rows cost one read, the NaN/Inf check). The
forward keeps per-row log-sum-exps and DAC-KL's [rows, K] band candidates (~5 KB per token at K=256);
the backward rebuilds each chunk's [chunk, V/TP] tensors from the logits (without communication, except
Megatron's SFT re-run at temperature != 1 and the l1/l2 span options) and writes its gradient straight
into the one [tokens, V/TP] gradient buffer, so the extra memory beyond that buffer is a few
[chunk, V/TP] temporaries whatever the number of tokens. Terms whose weight is 0 are not computed
(reported as 0). Teacher logits may be bf16 (cast per chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from mgsr_megatron.config import MGSRConfig
from mgsr_megatron.errors import UserError
from mgsr_megatron.losses import dac_kl as dac
from mgsr_megatron.losses.dac_kl import DacSettings
from mgsr_megatron.losses.divergences import (
    check_divergence_args,
    divergence_rows,
    divergence_rows_grad,
    forward_kl_owned,
)
from mgsr_megatron.losses.sft import megatron_tp_active, sft_rows, sft_rows_grad
from mgsr_megatron.losses.span import SPAN_DISTANCES, PairGrad, span_pairs, span_pairs_grad
from mgsr_megatron.losses.vocab_parallel import (
    Shard,
    all_reduce,
    check_k,
    check_same_shape,
    chunks,
    comm_tag,
    consecutive_runs,
    gather_at_ids,
    mean_entropy,
    scaled_rows,
    shard_of,
)

MIN_SLICE_ROWS = 64  # shorter runs of loss rows are gathered together (see _row_plan)
STAT_NAMES = ("mean_l", "mean_u", "band_size", "kept_mass", "teacher_entropy_t")  # the last: see mgsr_objective


@dataclass(frozen=True, kw_only=True)
class ObjectiveSettings:
    """The objective's settings, built once from the config (`ObjectiveSettings.from_config(cfg.mgsr)`) and
    passed whole to `mgsr_objective`. Field names follow the config keys (`chunk_tokens`:
    mgsr.loss_chunk_tokens; `dac`: the DAC-KL / token-level divergence term, with the temperature)."""

    w_sft: float = 1.0
    w_dac: float = 1.0
    w_span: float = 1.0
    chunk_tokens: int = 1024
    span_distance: str = "kl_normalised"
    dac: DacSettings = field(default_factory=DacSettings)

    @classmethod
    def from_config(cls, cfg: MGSRConfig) -> ObjectiveSettings:
        return cls(w_sft=float(cfg.w_sft), w_dac=float(cfg.w_dac), w_span=float(cfg.w_span),
                   chunk_tokens=int(cfg.loss_chunk_tokens), span_distance=cfg.span_distance,
                   dac=DacSettings.from_config(cfg))

    @property
    def temperature(self) -> float:
        """The distillation temperature (of DAC-KL, the divergences and the span loss)."""
        return self.dac.temperature


class LossTargets(NamedTuple):
    """What the objective scores the logits against, each [b, s] (see `mgsr_objective`)."""

    labels: torch.Tensor  # global next-token ids
    sft_mask: torch.Tensor  # weights of the SFT positions
    kd_mask: torch.Tensor  # weights of the DAC-KL positions
    span_pair_mask: torch.Tensor  # bool: (i, i+1) lie in the same span

    @classmethod
    def from_batch(cls, batch: dict) -> LossTargets:
        """The fields of a collated micro-batch (training/data.py) of the same names."""
        return cls(*(batch[name] for name in cls._fields))

    def first_column(self) -> int:
        """The first position any term reads in any row (an SFT or DAC-KL weight, or a span pair (i, i+1)):
        the logits of the columns before it are never read, so a forward may skip them
        (models.pipeline.logits_from) and score the targets `from_column(first)`. 0 when nothing is read."""
        read = (self.sft_mask != 0) | (self.kd_mask != 0) | self.span_pair_mask.bool()
        columns = read.reshape(-1, read.shape[-1]).any(0).nonzero()
        return int(columns[0]) if columns.numel() else 0

    def from_column(self, first: int) -> LossTargets:
        """The targets of columns [first, s): those of logits computed from `first` on."""
        return LossTargets(*(field[..., first:] for field in self))


def check_settings(settings: ObjectiveSettings, shard, clipnet) -> None:
    """One-line errors for settings the losses cannot honour (names are the config keys)."""
    d = settings.dac
    if not d.temperature > 0:
        raise UserError(f"mgsr.temperature={d.temperature} must be > 0")
    if d.mode not in dac.DAC_MODES:
        raise UserError(f"mgsr.dac_mode={d.mode!r} must be one of {', '.join(dac.DAC_MODES)}")
    if d.band_norm not in dac.BAND_NORMS:
        raise UserError(f"mgsr.band_norm={d.band_norm!r} must be one of {', '.join(dac.BAND_NORMS)}")
    if settings.span_distance not in SPAN_DISTANCES:
        raise UserError(f"mgsr.span_distance={settings.span_distance!r} must be one of {', '.join(SPAN_DISTANCES)}")
    if settings.chunk_tokens < 1:
        raise UserError(f"mgsr.loss_chunk_tokens={settings.chunk_tokens} must be at least 1")
    if not d.kappa > 0:
        raise UserError(f"mgsr.kappa={d.kappa} must be > 0")
    if settings.w_dac and d.mode == "off":
        check_divergence_args(d.kd_divergence, d.temperature, d.kd_beta, d.kd_alpha, "mgsr.kd_")
    if settings.w_dac and d.mode != "off":
        check_k(d.k_band, "mgsr.k_band", shard)
        if d.mode == "learned":
            check_k(d.k_feat, "mgsr.k_feat", shard)
            if not 0.0 < d.rho < 1.0:
                raise UserError(f"mgsr.rho={d.rho} must lie in (0, 1)")
            if clipnet is None:
                raise UserError("clipnet is None but mgsr.dac_mode='learned' needs a ClipNet")
            if clipnet.k_feat != d.k_feat:
                raise UserError(f"clipnet was built for k_feat={clipnet.k_feat} but mgsr.k_feat={d.k_feat}")
        elif not 0.0 <= d.fixed_l < d.fixed_u <= 1.0:
            raise UserError(f"mgsr.fixed_l={d.fixed_l}, mgsr.fixed_u={d.fixed_u}: need 0 <= l < u <= 1")


def check_masks(shape, labels, sft_mask, kd_mask, span_pair_mask, vocab: int) -> None:
    """Shapes, an empty response mask, spans outside the response or past the sequence, bad labels."""
    for name, mask in (("labels", labels), ("sft_mask", sft_mask), ("kd_mask", kd_mask),
                       ("span_pair_mask", span_pair_mask)):
        if mask is None:
            raise UserError(f"{name} is required")
        if tuple(mask.shape) != tuple(shape):
            raise UserError(f"{name} has shape {tuple(mask.shape)} but the logits are {tuple(shape)} x V/TP")
    if labels.is_floating_point():
        raise UserError(f"labels must be integer token ids, got {labels.dtype}")
    if not bool((kd_mask > 0).any()):
        raise UserError("kd_mask has no valid token (no response position in this micro-batch)")
    if bool((sft_mask < 0).any()) or bool((kd_mask < 0).any()):
        raise UserError("sft_mask and kd_mask must be non-negative weights")
    bad_label = (sft_mask > 0) & ((labels < 0) | (labels >= vocab))
    if bool(bad_label.any()):
        where = bad_label.nonzero()[0].tolist()
        raise UserError(f"labels at position {where} (an sft_mask position) is {labels[tuple(where)].item()}, "
                        f"outside the vocabulary [0, {vocab})")
    pairs = span_pair_mask.bool()
    if bool(pairs[..., -1].any()):
        where = pairs[..., -1].nonzero()[0].tolist()
        raise UserError(f"span_pair_mask is True at the last position of row {where} (a span runs past the "
                        f"end of the sequence)")
    response = kd_mask > 0
    outside = pairs[..., :-1] & ~(response[..., :-1] & response[..., 1:])
    if bool(outside.any()):
        where = outside.nonzero()[0].tolist()
        raise UserError(f"span_pair_mask pairs position {where} with the next one, but kd_mask is 0 at one of "
                        f"them: a span leaves the response")


class _Rows(NamedTuple):
    """The flattened inputs of `_MGSRObjective` besides the student's logits (none needs a gradient)."""

    teacher: torch.Tensor  # [N, V/TP]
    labels: torch.Tensor  # [N]
    sft_w: torch.Tensor  # [N]
    kd_w: torch.Tensor  # [N]
    pair_first: torch.Tensor  # LongTensor of pair starts
    counts: torch.Tensor  # [3]: SFT weight, KD weight, pairs
    entropy: torch.Tensor | None = None  # [N] the teacher's true H(P) (a top-K cache), else None


class _Call(NamedTuple):
    """The non-tensor inputs of `_MGSRObjective`: the settings and what this call adds to them."""

    settings: ObjectiveSettings
    shard: Shard
    megatron: bool  # SFT through Megatron's vocab_parallel_cross_entropy (losses/sft.py)
    clipnet: dac.ClipNet | None
    grad_seq_first: bool = False  # the student's gradient in [s, b, V/TP] memory order (see mgsr_objective)


class _MGSRObjective(torch.autograd.Function):
    """Chunked forward and backward of all three terms (see the module docstring).

    Inputs: student [N, V/TP]; rows (`_Rows`: teacher [N, V/TP]; labels, sft_w, kd_w [N]; pair_first;
    counts [3]; entropy [N] or None); call (`_Call`: settings, shard, clipnet); *params (ClipNet's, for
    the gradient). Outputs: the three term means [3] (differentiable) and the statistics [6] = (mean l,
    mean u, band size, kept mass, teacher H(P) at T, nonfinite). The forward keeps, per chunk, what the
    backward cannot cheaply recompute: per-row log-sum-exps and DAC-KL's [rows, K] band candidates; the
    backward rebuilds the [chunk, V/TP] tensors from the logits.
    """

    @staticmethod
    def forward(ctx, student_logits, rows_in: _Rows, call: _Call, *params):
        teacher, labels, sft_w, kd_w, pair_first, counts, entropy = rows_in
        settings, shard, clipnet = call.settings, call.shard, call.clipnet
        student = student_logits.reshape(-1, student_logits.shape[-1])
        d, temperature = settings.dac, settings.temperature
        sums = student.new_zeros(3, dtype=torch.float32)
        stats = student.new_zeros(len(STAT_NAMES) + 1, dtype=torch.float32)
        nonfinite = torch.zeros((), dtype=torch.bool, device=student.device)
        row_chunks, idle = _row_plan(sft_w, kd_w, settings.chunk_tokens, student_logits.shape[1])
        nonfinite |= _any_nonfinite(student, idle, shard) | _any_nonfinite(teacher, idle, shard)
        saved = []
        for rows in row_chunks:
            rows_s, rows_t = _take(student, rows), _take(teacher, rows)
            state = {}
            lse_s = None
            if settings.w_dac:
                weight = kd_w[rows]
                with comm_tag("dac_kl"):
                    if d.mode == "off":
                        if d.fused_kd:  # forward KL: the lean path, its student lse serves SFT
                            kl, state["dac"] = forward_kl_owned(scaled_rows(rows_t, temperature),
                                                                scaled_rows(rows_s, temperature), shard)
                            lse_t, lse_s = state["dac"]
                            lse_check = lse_s
                        else:
                            kl, state["dac"] = divergence_rows(rows_s, rows_t, d.kd_divergence, temperature,
                                                               d.kd_beta, d.kd_alpha, shard)
                            lse_t, lse_check = state["dac"][:2]
                        extra = [torch.zeros_like(kl), torch.ones_like(kl), torch.full_like(kl, shard.vocab),
                                 torch.ones_like(kl), torch.zeros_like(kl)]
                    else:
                        kl, low, up, size, kept, lse_t, lse_s, state["dac"] = dac.dac_forward_rows(
                            rows_s, rows_t, d, clipnet, shard, None if entropy is None else entropy[rows])
                        lse_check = lse_s
                        # the teacher's H(P) at T comes with DacState's lse (float64): the entropy
                        # metric reads it instead of a second pass over the teacher's logits
                        extra = [low, up, size, kept, state["dac"].entropy.float()]
                sums[1] += (kl * weight).sum()
                stats[:-1] += torch.stack([(x * weight).sum() for x in extra])
                nonfinite |= ~(torch.isfinite(lse_t).all() & torch.isfinite(lse_check).all())
            if settings.w_sft:
                if lse_s is not None and temperature == 1.0:
                    # CE = log-sum-exp - logit at the label; DAC-KL already has the student's global lse
                    # (float64), so the [rows, V/TP] pass of a separate cross entropy is not needed
                    at_label = gather_at_ids(rows_s, labels[rows].clamp(min=0)[:, None], shard)[:, 0]
                    ce = (lse_s - at_label.double()).float()
                else:
                    ce = sft_rows(rows_s, labels[rows], call.megatron)
                sums[0] += (ce * sft_w[rows]).sum()
                nonfinite |= ~torch.isfinite(ce).all()
            saved.append(state)
        span_states = []
        if settings.w_span:
            for start, end in chunks(pair_first.shape[0], settings.chunk_tokens):
                with comm_tag("span"):
                    value, state = span_pairs(student, teacher, pair_first[start:end], settings.span_distance,
                                              temperature, shard)
                sums[2] += value.sum()
                nonfinite |= ~torch.isfinite(value).all()
                span_states.append(state)
        stats[:-1] /= counts[1]
        stats[-1] = nonfinite.float()
        ctx.save_for_backward(student_logits, *rows_in)
        ctx.call, ctx.n_params = call, len(params)
        ctx.row_chunks, ctx.idle, ctx.chunk_states, ctx.span_states = row_chunks, idle, saved, span_states
        ctx.mark_non_differentiable(stats)
        return torch.where(counts > 0, sums / counts.clamp(min=1), sums.new_zeros(())), stats

    @staticmethod
    def backward(ctx, grad_terms, _grad_stats):
        student_logits, teacher, labels, sft_w, kd_w, pair_first, counts, _entropy = ctx.saved_tensors
        student = student_logits.reshape(-1, student_logits.shape[-1])
        call = ctx.call
        settings, shard, clipnet = call.settings, call.shard, call.clipnet
        d, temperature = settings.dac, settings.temperature
        params = list(clipnet.parameters())[:ctx.n_params] if ctx.n_params else []
        coef = torch.where(counts > 0, grad_terms.float() / counts.clamp(min=1), grad_terms.new_zeros(()).float())
        with_sft = bool(settings.w_sft) and bool(counts[0] > 0)
        # At temperature 1 the SFT gradient softmax - onehot (the formula of Megatron's backward) shares
        # DAC-KL's student softmax and is formed in the same pass; otherwise Megatron's function re-runs.
        fuse_sft = with_sft and bool(settings.w_dac) and temperature == 1.0 and d.fused_kd
        # written whole: loss rows by their terms, the other rows zeros
        grad = _GradLayout(torch.empty(student.shape, dtype=torch.float32, device=student.device),
                           student_logits.shape, call.grad_seq_first)
        for rows in ctx.idle:
            grad.rows(rows).zero_()
        param_grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        # Pass 1: the per-row terms write each chunk's rows of the gradient buffer (rows without a
        # loss term keep their zeros).
        for rows, state in zip(ctx.row_chunks, ctx.chunk_states):
            rows_s = _take(student, rows)
            grad_rows = grad.rows(rows) if isinstance(rows, slice) else torch.empty_like(rows_s, dtype=torch.float32)
            sft = (labels[rows], sft_w[rows] * coef[0]) if fuse_sft else None
            if settings.w_dac:
                row_weight = kd_w[rows] * coef[1]
                if not d.fused_kd:
                    grad_rows.copy_(divergence_rows_grad(rows_s, _take(teacher, rows), d.kd_divergence, temperature,
                                                         d.kd_beta, d.kd_alpha, state["dac"], row_weight))
                elif d.mode == "off":
                    _off_grad_into(dac.GradRows(rows_s, row_weight, grad_rows, sft), _take(teacher, rows),
                                   state["dac"], temperature, shard)
                else:
                    chunk_param_grads = dac.dac_backward_rows(dac.GradRows(rows_s, row_weight, grad_rows, sft),
                                                              state["dac"], d, clipnet, params, shard)
                    for total, part in zip(param_grads, chunk_param_grads):
                        total += part
            else:
                grad_rows.zero_()
            if with_sft and not fuse_sft:
                grad_rows += sft_rows_grad(rows_s, labels[rows], sft_w[rows] * coef[0], call.megatron)
            if not isinstance(rows, slice):
                grad.flat.index_copy_(0, grad.index(rows), grad_rows)
        # Pass 2: span pairs add to rows i and i+1.
        if settings.w_span and bool(counts[2] > 0):
            for (start, end), state in zip(chunks(pair_first.shape[0], settings.chunk_tokens), ctx.span_states):
                first = pair_first[start:end]
                with comm_tag("span"):
                    span_pairs_grad(student, teacher, PairGrad(first, coef[2].expand(first.shape[0]), grad.flat,
                                                               grad.index(first), grad.index(first + 1)),
                                    settings.span_distance, temperature, shard, state)
        ctx.chunk_states = ctx.span_states = ctx.row_chunks = ctx.idle = None
        grad_student = grad.result() if student.dtype == torch.float32 else grad.result().to(student.dtype)
        return (grad_student, None, None, *[g.to(p.dtype) for g, p in zip(param_grads, params)])


def _row_plan(sft_w: torch.Tensor, kd_w: torch.Tensor, size: int, seq_length: int):
    """(chunks, idle): chunks of at most `size` of the rows that carry a loss term, and the other rows
    (prompt, padding) as slices, none across two sequences of the [b * seq_length] rows (a slice is a view
    of both gradient layouts, see _GradLayout). A run of at least MIN_SLICE_ROWS consecutive loss rows (a
    response) becomes slices, views that cost no copy; shorter runs are pooled into chunks of row ids,
    gathered (a copy of their rows, but few chunks however fragmented the rows are). Two device syncs."""
    active = (sft_w > 0) | (kd_w > 0)
    chunk_list, pooled = [], []
    for first, n in _runs_within_sequences(active.nonzero()[:, 0].tolist(), seq_length):
        if n < MIN_SLICE_ROWS:
            pooled.extend(range(first, first + n))
            continue
        chunk_list.extend(slice(first + start, first + end) for start, end in chunks(n, size))
    for start, end in chunks(len(pooled), size):
        chunk_list.append(torch.tensor(pooled[start:end], dtype=torch.long, device=sft_w.device))
    idle = [slice(first, first + n) for first, n in _runs_within_sequences((~active).nonzero()[:, 0].tolist(),
                                                                            seq_length)]
    return chunk_list, idle


def _runs_within_sequences(ids: list[int], seq_length: int):
    """(first id, length) of each run of consecutive ids, cut where a sequence of seq_length rows ends."""
    for _, first, n in consecutive_runs(ids):
        while n:
            part = min(n, seq_length - first % seq_length)
            yield first, part
            first, n = first + part, n - part


class _GradLayout:
    """The student's gradient [b * s, V/TP] as the backward writes it, by the logits' row ids (b-major),
    into `buffer` in b-major order, or with seq_first in [s, b] order; `result()` is the [b, s, V/TP]
    gradient (with seq_first a transposed view of the buffer)."""

    def __init__(self, buffer: torch.Tensor, shape, seq_first: bool):
        self.flat, self.shape, self.seq_first = buffer, tuple(shape), seq_first

    def rows(self, rows: slice) -> torch.Tensor:
        """The [n, V/TP] view of the rows of one slice within one sequence (strided with seq_first)."""
        if not self.seq_first:
            return self.flat[rows]
        b, s, vocab = self.shape
        sequence, start = divmod(rows.start, s)
        return self.flat.view(s, b, vocab)[start:start + rows.stop - rows.start, sequence]

    def index(self, rows: torch.Tensor) -> torch.Tensor:
        """The buffer rows of the row ids `rows`."""
        if not self.seq_first:
            return rows
        b, s, _ = self.shape
        return rows % s * b + rows // s

    def result(self) -> torch.Tensor:
        b, s, vocab = self.shape
        return self.flat.view(s, b, vocab).transpose(0, 1) if self.seq_first else self.flat.view(b, s, vocab)


def _take(rows_of: torch.Tensor, rows) -> torch.Tensor:
    return rows_of[rows] if isinstance(rows, slice) else rows_of.index_select(0, rows)


def _any_nonfinite(logits: torch.Tensor, idle: list[slice], shard) -> torch.Tensor:
    """NaN or +inf in the rows without a loss term, or such a row that is -inf on every shard (-inf
    alone marks padded ids): a NaN at a prompt position still poisons the parameter gradients. (The
    loss rows are checked through their log-sum-exps.) A read of those rows and one all-reduce, so
    every TP rank takes the same skip decision."""
    if not idle:
        return torch.zeros((), dtype=torch.bool, device=logits.device)
    row_max = torch.cat([logits[rows].amax(-1) for rows in idle]).float()
    row_max = row_max.masked_fill(row_max.isnan(), float("inf"))
    row_max = all_reduce(row_max, shard.group, op=torch.distributed.ReduceOp.MAX)
    return ~torch.isfinite(row_max).all()


def _off_grad_into(rows: dac.GradRows, rows_t, lse, temperature, shard) -> None:
    """dac_mode off: rows.out <- (q - p) * row_weight / T  [+ sft_w * (q - onehot) at T = 1]."""
    lse_t, lse_s = lse
    sft = rows.sft
    scale = rows.row_weight / temperature
    q = dac.student_softmax_into(rows.out, rows.student, lse_s, temperature)
    p = scaled_rows(rows_t, temperature).sub_(lse_t.float()[:, None]).exp_().mul_(scale[:, None])
    q.mul_((scale if sft is None else scale + sft[1])[:, None]).sub_(p)
    if sft is not None:
        dac.subtract_label_onehot(rows.out, sft[0], sft[1], shard)


def mgsr_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: LossTargets, *,
                   clipnet: dac.ClipNet | None, settings: ObjectiveSettings, tp_group=None,
                   teacher_entropy: torch.Tensor | None = None, grad_seq_first: bool = False):
    """The MGSR loss of one micro-batch and its metrics.

    student_logits, teacher_logits: vocab-parallel shards [b, s, V/TP] (teacher may be bf16), padded
    vocabulary columns already -inf. targets (`LossTargets`): labels [b, s] global next-token ids;
    sft_mask / kd_mask [b, s] weights of the SFT and DAC-KL positions; span_pair_mask [b, s] bool, True at
    i when (i, i+1) lie in the same span. settings: `ObjectiveSettings.from_config(cfg.mgsr)`.
    teacher_entropy [b, s] (optional): the teacher's own H(P) at the temperature per position, for
    teacher_logits that are a rebuild of it (the top-K cache's, training/teacher_cache.py): DAC-KL's
    learned mode feeds it to ClipNet instead of the rebuild's entropy, so that ClipNet's features
    phi = [log p_(1..k_feat), H(P), c_k_feat] are the teacher's own (the rebuild keeps the top-K log p
    and c exactly); per position, hence the same on every TP rank. Nothing else reads it. grad_seq_first:
    the student's gradient is written in [s, b, V/TP] memory order and handed back as a [b, s, V/TP] view
    of it. Megatron's GPTModel returns `logits.transpose(0, 1).contiguous()` of its [s, b, V/TP] output
    layer; that copy's backward transposes the gradient back, so this one reaches the output layer
    contiguous, where a b-major one is copied there (by its matmul and again for the weight gradient). Returns
    (loss, metrics) with metrics: loss, sft, dac_kl, span, mean_l, mean_u, band_size, kept_mass (0-dim
    tensors), teacher_entropy (the kd_mask-weighted mean of the teacher's H(P) at temperature 1, a
    diagnostic: read off DAC-KL's statistics when they have it, 0 when no KD term is on), rows_without_sft
    ([b] bool), nonfinite (bool: NaN/Inf in the logits the terms read; the loss and gradients are then
    meaningless and the step should be skipped).
    """
    check_same_shape(student_logits, teacher_logits)
    shard = shard_of(student_logits.shape[-1], tp_group)
    check_settings(settings, shard, clipnet)
    check_masks(student_logits.shape[:-1], *targets, shard.vocab)
    if teacher_entropy is not None and tuple(teacher_entropy.shape) != tuple(student_logits.shape[:-1]):
        raise UserError(f"teacher_entropy has shape {tuple(teacher_entropy.shape)} but the logits are "
                        f"{tuple(student_logits.shape[:-1])} x V/TP")
    labels, sft_mask, kd_mask, span_pair_mask = targets
    call = _Call(settings, shard, megatron_tp_active(shard) if settings.w_sft else False, clipnet, grad_seq_first)
    vocab_local = student_logits.shape[-1]
    teacher = teacher_logits.detach().reshape(-1, vocab_local)
    sft_w = sft_mask.reshape(-1).float()
    kd_w = kd_mask.reshape(-1).float()
    pair_first = span_pair_mask.reshape(-1).bool().nonzero()[:, 0]
    counts = torch.stack([sft_w.sum(), kd_w.sum(), sft_w.new_tensor(float(pair_first.numel()))])
    params = list(clipnet.parameters()) if (settings.w_dac and settings.dac.mode == "learned") else []
    entropy = None if teacher_entropy is None else teacher_entropy.detach().reshape(-1)
    terms, stats = _MGSRObjective.apply(student_logits.reshape(-1, student_logits.shape[-2], vocab_local),
                                        _Rows(teacher, labels.reshape(-1), sft_w, kd_w, pair_first, counts, entropy),
                                        call, *params)
    loss = settings.w_sft * terms[0] + settings.w_dac * terms[1] + settings.w_span * terms[2]
    metrics = {"loss": loss.detach(), "sft": terms[0].detach(), "dac_kl": terms[1].detach(),
               "span": terms[2].detach(), **{name: stats[i] for i, name in enumerate(STAT_NAMES)},
               "rows_without_sft": (sft_mask.reshape(sft_mask.shape[0], -1) > 0).sum(-1) == 0,
               "nonfinite": bool(stats[-1] > 0)}
    metrics["teacher_entropy"] = _teacher_entropy(metrics.pop("teacher_entropy_t"), teacher, entropy, kd_w, settings,
                                                  shard)
    return loss, metrics


def _teacher_entropy(band_entropy, teacher, entropy, kd_w, settings: ObjectiveSettings, shard) -> torch.Tensor:
    """The metric teacher_entropy: the kd_mask-weighted mean of the teacher's H(P) at temperature 1. DAC-KL's
    band modes computed it at the temperature (from the given entropy where set); otherwise the given
    entropy is read, and only without either does the teacher's logits get a pass of their own."""
    if not (settings.w_dac or settings.w_span):  # no KD term reads the teacher (an SFT step: it may be absent)
        return torch.zeros((), dtype=torch.float64, device=kd_w.device)
    band_ran = settings.w_dac and settings.dac.mode != "off"
    if settings.temperature == 1.0 and band_ran:
        return band_entropy
    if settings.temperature == 1.0 and entropy is not None:
        return (entropy.double() * kd_w).sum() / kd_w.sum()
    return mean_entropy(teacher, kd_w, shard.group, settings.chunk_tokens)
