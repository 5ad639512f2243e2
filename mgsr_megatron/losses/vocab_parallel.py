"""Vocab-parallel building blocks shared by every loss in this package.

Each tensor-parallel (TP) rank holds a contiguous shard of V/TP vocabulary columns; global id
`offset + j` lives at local column j of rank `offset // (V/TP)`. The losses never differentiate
through a collective: every loss is a `torch.autograd.Function` whose forward runs the collectives
on detached statistics, and whose backward is computed locally on each shard from per-row
quantities that are identical on every rank (the pattern of Megatron's `_VocabParallelCrossEntropy`).
That is why no gradient can be lost in a differentiable all-reduce, and why the backward of most
losses needs no communication at all.

Row statistics used everywhere, for a row x of scaled logits:
    m   = max_v x_v                                 (all-reduce MAX; a shift only, never differentiated)
    S   = sum_v exp(x_v - m)                        (all-reduce SUM)
    lse = m + log S,      log softmax(x)_v = x_v - lse
    H   = log S - sum_v exp(x_v - m) (x_v - m) / S   (entropy; same all-reduce as S)
Columns that hold -inf (padded vocabulary) give exp(.) = 0 and are excluded from every product, so
they produce finite values and exactly zero gradient.

Every collective of the package, and the tensor-parallel collectives of generation/ (sampling, the
KV-cached decode), goes through `all_reduce` / `all_gather` / `all_gather_last` here: plain in-place
collectives over a process group (None: one process, no communication), never differentiated. They
count the payload bytes when a `count_communication()` block is active (used by tools/bench_losses.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mgsr_megatron.errors import UserError

# Global ids travel inside float32 packets next to the top-K values; float32 holds integers exactly
# up to 2**24, far above any real vocabulary. Larger vocabularies fall back to float64 packets.
_FLOAT32_EXACT_IDS = 2 ** 24


# --------------------------------------------------------------------------------------------------
# Process group and shard layout.

@dataclass(frozen=True)
class Shard:
    """Where this rank's logits columns sit in the global vocabulary."""

    group: object | None  # the TP process group, None for a single process
    world: int  # TP size
    rank: int  # this rank's index inside the TP group
    local_vocab: int  # columns held here (V/TP, padding included)

    @property
    def offset(self) -> int:
        return self.rank * self.local_vocab

    @property
    def vocab(self) -> int:
        return self.local_vocab * self.world


def resolve_tp_group(tp_group=None):
    """The explicit group, else Megatron's TP group when parallel_state is initialised, else None."""
    if tp_group is not None:
        return tp_group
    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_tensor_model_parallel_group()
    return None


def shard_of(local_vocab: int, tp_group=None) -> Shard:
    group = resolve_tp_group(tp_group)
    if group is None:
        return Shard(None, 1, 0, local_vocab)
    return Shard(group, dist.get_world_size(group), dist.get_rank(group), local_vocab)


# --------------------------------------------------------------------------------------------------
# Instrumented collectives.

class CommCounter:
    """Payload bytes and calls of the collectives issued inside `count_communication()`.

    all-reduce: the reduced tensor's size; all-gather: the gathered (output) size. Per rank.
    """

    def __init__(self):
        self.active = 0
        self.bytes = 0
        self.calls = 0
        self.by_tag: dict[str, int] = {}
        self.tag = "other"

    def add(self, nbytes: int) -> None:
        if self.active:
            self.bytes += nbytes
            self.calls += 1
            self.by_tag[self.tag] = self.by_tag.get(self.tag, 0) + nbytes


COMM = CommCounter()


@contextlib.contextmanager
def count_communication():
    """Reset and enable the byte counter for the block: `with count_communication() as c: ...; c.bytes`."""
    COMM.active += 1
    COMM.bytes, COMM.calls, COMM.by_tag = 0, 0, {}
    try:
        yield COMM
    finally:
        COMM.active -= 1


@contextlib.contextmanager
def comm_tag(tag: str):
    """Attribute the collectives of the block to `tag` in `COMM.by_tag`."""
    previous, COMM.tag = COMM.tag, tag
    try:
        yield
    finally:
        COMM.tag = previous


def group_size(group) -> int:
    """Ranks in a process group; 1 for None (a single process: every collective below is a no-op)."""
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group` (no-op for None / one rank). Not differentiable on purpose."""
    if group_size(group) > 1:
        COMM.add(tensor.numel() * tensor.element_size())
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _gather_parts(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    world = group_size(group)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    COMM.add(tensor.numel() * tensor.element_size() * world)
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """[world, *tensor.shape] stack of every rank's tensor, in rank order (not differentiable)."""
    if group_size(group) == 1:
        return tensor.unsqueeze(0)
    return torch.stack(_gather_parts(tensor, group))


def all_gather_last(tensor: torch.Tensor, group) -> torch.Tensor:
    """[..., n] per rank -> [..., n * world], concatenated in rank order (not differentiable)."""
    if group_size(group) == 1:
        return tensor
    return torch.cat(_gather_parts(tensor, group), dim=-1)


# --------------------------------------------------------------------------------------------------
# Row statistics.

def _xlogx_free(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weights * values with 0 wherever weights is 0 (so 0 * -inf = 0, the convention of every KL)."""
    return torch.where(weights > 0, weights * values, weights.new_zeros(()))


NEG_LARGE = -1e30  # stands in for -inf in scaled copies: exp() gives exactly 0 and differences stay finite


def scaled_rows(rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh float32 copy of rows / temperature with -inf replaced by NEG_LARGE (NaN and +inf kept, so
    they still poison the statistics and get reported). The caller owns it and may edit it in place."""
    if rows.dtype == torch.float32 and temperature != 1.0:
        out = torch.div(rows, temperature)
    else:  # copy first: a bf16 input divided directly would be divided in bf16
        out = rows.to(torch.float32, copy=True)
        if temperature != 1.0:
            out.div_(temperature)
    return out.clamp_(min=NEG_LARGE)


def log_softmax_stats(rows: list[torch.Tensor], shard: Shard, entropy_of: tuple[int, ...] = (),
                      temperature: float = 1.0):
    """Global log-sum-exp of each [n, V/TP] tensor in `rows` divided by `temperature` (2 all-reduces for
    all of them together).

    Returns (lse list, entropy list aligned with `entropy_of`), float64 [n] each (a float32 lse of
    magnitude ~5 is only good to ~3e-7, which DAC-KL's band edges amplify by 1/kappa); the sum of the
    rows in `entropy_of` (DAC-KL's teacher) is also accumulated in float64. A row that is
    all -inf gets lse = -inf, a row with NaN or +inf gets NaN; callers report those as nonfinite.
    The rows are read, never copied or edited (any dtype; the work is float32 in two [n, V/TP] scratch
    buffers): (x - max) / T is formed once per tensor, so a caller needs no scaled copy of its own.
    """
    maxes = torch.stack([x.amax(dim=-1).float() for x in rows], dim=-1)
    all_reduce(maxes, shard.group, dist.ReduceOp.MAX)
    shift = maxes.masked_fill(maxes == float("-inf"), 0.0)
    partials = []
    scratch = exps = None
    for i, x in enumerate(rows):
        if scratch is None or scratch.shape != x.shape:
            scratch = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        centred = torch.sub(x, shift[:, i, None], out=scratch)
        if temperature != 1.0:
            centred.div_(temperature)
        if i in entropy_of:  # DAC-KL's teacher: its lse sets the band edges, accumulate in float64
            centred.clamp_(min=NEG_LARGE)  # -inf (padded ids) would make 0 * -inf = NaN in the vecdot
            exps = torch.exp(centred, out=exps if exps is not None and exps.shape == x.shape else None)
            partials.append(exps.sum(dim=-1, dtype=torch.float64))
            partials.append(torch.linalg.vecdot(exps, centred).double())
        else:
            partials.append(centred.exp_().sum(dim=-1).double())
    sums = torch.stack(partials, dim=-1)
    all_reduce(sums, shard.group)
    lse, entropy, column = [], [], 0
    for i in range(len(rows)):
        log_sum = sums[:, column].log()
        lse.append(shift[:, i].double() / temperature + log_sum)
        if i in entropy_of:
            entropy.append(log_sum - sums[:, column + 1] / sums[:, column])
            column += 1
        column += 1
    return lse, entropy


# --------------------------------------------------------------------------------------------------
# Top-K, gather and scatter at global vocabulary ids.

def global_topk(rows: torch.Tensor, k: int, shard: Shard, report: torch.Tensor | None = None):
    """The k largest entries of every row over the WHOLE vocabulary, sorted descending: (values, global ids).

    Local top-min(k, V/TP), one all-gather of (value, global id) packets, merge. Communication per row:
    2 * min(k, V/TP) * TP numbers, independent of V. Ties are broken arbitrarily (any order is a valid
    sort); tied tokens have equal teacher probability. With `report` (same shape as rows, ordered the
    same way) the returned values are report's entries at the selected ids instead of rows'.
    """
    local_k = min(k, shard.local_vocab)
    values, local_ids = rows.topk(local_k, dim=-1, sorted=True)
    if report is not None:
        values = report.gather(-1, local_ids).float()
    if shard.world == 1:
        return values, local_ids
    packet_dtype = torch.float32 if shard.vocab < _FLOAT32_EXACT_IDS else torch.float64
    packet = torch.stack([values.to(packet_dtype), (local_ids + shard.offset).to(packet_dtype)], dim=-1)
    gathered = all_gather(packet, shard.group)  # [world, n, local_k, 2]
    gathered = gathered.permute(1, 0, 2, 3).reshape(rows.shape[0], shard.world * local_k, 2)
    merged_values, position = gathered[..., 0].topk(k, dim=-1, sorted=True)
    merged_ids = gathered[..., 1].gather(-1, position).long()
    return merged_values.to(values.dtype), merged_ids


def _local_columns(ids: torch.Tensor, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    local = ids - shard.offset
    owned = (local >= 0) & (local < shard.local_vocab)
    return local.clamp(0, shard.local_vocab - 1), owned


def gather_at_ids(rows: torch.Tensor, ids: torch.Tensor, shard: Shard) -> torch.Tensor:
    """rows[:, ids] for global ids: the owning rank contributes the value, the others 0; one SUM all-reduce."""
    local, owned = _local_columns(ids, shard)
    picked = rows.gather(-1, local)
    picked = torch.where(owned, picked, picked.new_zeros(()))
    return all_reduce(picked, shard.group)


def scatter_add_at_ids(out: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shard: Shard) -> torch.Tensor:
    """out[:, ids] += weights for the ids this rank owns (local; no communication)."""
    local, owned = _local_columns(ids, shard)
    weights = torch.where(owned, weights, weights.new_zeros(()))
    if out.shape[0] == 0:
        return out
    # index_add_ on a flat view of the rows (contiguous rows that may lie apart: a gradient in [s, b] order):
    # much faster than scatter_add_ along a long last dimension on CPU
    row_stride = out.stride(0)
    flat = local + torch.arange(out.shape[0], device=out.device)[:, None] * row_stride
    rows_span = out.as_strided((row_stride * (out.shape[0] - 1) + out.shape[-1],), (1,))
    rows_span.index_add_(0, flat.reshape(-1), weights.reshape(-1))
    return out


# --------------------------------------------------------------------------------------------------
# Input checks shared by the losses.

def check_same_shape(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise UserError(f"teacher_logits shard has shape {tuple(teacher.shape)} but student_logits shard has "
                        f"shape {tuple(student.shape)}; both must be [..., V/TP] shards of the same vocabulary")
    if student.dim() < 2:
        raise UserError(f"student_logits must be [tokens, V/TP] or [b, s, V/TP], got shape {tuple(student.shape)}")
    if not student.is_floating_point() or not teacher.is_floating_point():
        raise UserError(f"logits must be floating point (student {student.dtype}, teacher {teacher.dtype})")


def check_k(k: int, name: str, shard: Shard) -> None:
    if k < 1:
        raise UserError(f"{name}={k} must be at least 1")
    if k > shard.vocab:
        raise UserError(f"{name}={k} is larger than the vocabulary ({shard.vocab} columns = "
                        f"{shard.local_vocab} per shard x TP={shard.world})")


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def consecutive_runs(ids: list[int]):
    """(index in ids, first id, length) of each run of consecutive values in a sorted id list, so
    that the rows of a run can be taken as one slice instead of a gathered copy."""
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            yield start, ids[start], i - start
            start = i


def mean_entropy(logits: torch.Tensor, mask: torch.Tensor, tp_group=None, chunk: int = 1024) -> torch.Tensor:
    """Mean entropy (nats) of the distributions softmax(logits) at the positions where `mask` > 0.

    logits [..., V/TP] vocab-parallel (padded columns -inf), mask [...]; a diagnostic (no autograd):
    2 all-reduces per chunk of `chunk` rows. Returns a float64 scalar (0 when the mask is empty).
    """
    with torch.no_grad():
        rows = logits.reshape(-1, logits.shape[-1])[mask.reshape(-1) > 0]
        shard = shard_of(rows.shape[-1], tp_group)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start, end in chunks(rows.shape[0], chunk):
            _, (entropy,) = log_softmax_stats([rows[start:end]], shard, entropy_of=(0,))
            total += entropy.sum()
        return total / max(rows.shape[0], 1)
