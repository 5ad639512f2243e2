"""Token choice on vocab-parallel or gathered logits: greedy, temperature, top-k, top-p (Gumbel-max).

Every function takes logits whose last dimension is a contiguous slice of the padded vocabulary
starting at global id `vocab_start` (the whole padded vocabulary when `vocab_start=0` and
`tp_group=None`: gathered logits). With a TP group the functions reduce over it and return the
same result on every rank of the group, and the same result as on the gathered logits:

    greedy    t = argmax_v l_v                              (ties: the smallest global id)
    sampled   t = argmax_v ( l_v / T + g(seed, step, row, v) )       over the kept set

where g = -log(-log u) is Gumbel noise with u drawn by a counter-based hash of
(seed, step, row, GLOBAL vocabulary id): the noise at a vocabulary entry does not depend on which
shard holds it, so the sample is identical at TP = 1, 2, 4 and between vocab-parallel and gathered
logits. By the Gumbel-max trick, P(t = v) = softmax(l / T)_v restricted to the kept set.

Kept set (HF's order: temperature, then top-k, then top-p; padded ids >= vocab_size never kept):
    top-k     l_v >= the k-th largest logit (ties at the k-th value are all kept)
    top-p     p = softmax(l / T over the top-k set); v kept iff sum_{u: p_u > p_v} p_u < top_p
              (the smallest head of the distribution whose mass reaches top_p). Vocab-parallel this
              is found by bisection on the probability threshold: one all-reduce of [rows] numbers
              per iteration, never the vocabulary.
Communication per call under TP: greedy/sampled one all-gather of (value, id) per row; top-k one
all-gather of k values per row; top-p two all-reduces plus one per bisection step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mgsr_megatron.errors import UserError
from mgsr_megatron.losses.vocab_parallel import all_gather_last, all_reduce, group_size
from mgsr_megatron.models.vocab import mask_padded_logits

_MASK32 = 0xFFFFFFFF
TOP_P_BISECTION_STEPS = 52  # resolution 2^-52 of the top probability: below float32's spacing


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """How responses are sampled: one object from the caller through generate / scrg / regenerate /
    decode down to `sample` (which reads greedy, temperature, top_k, top_p, seed and row_ids). A request for
    responses (generate, scrg, regenerate) also needs `max_new_tokens` and `eos_id`; `pad_id` (default:
    eos_id) fills the positions after a row's end. `row_ids` are the numbers the noise knows the request's
    rows by (default 0..n-1): rows gathered from several requests into one batch keep their own noise.
    Invalid token-choice values raise UserError here."""

    max_new_tokens: int | None = None
    eos_id: int | None = None
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    pad_id: int | None = None
    row_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.greedy and not self.temperature > 0:
            raise UserError(f"generation temperature must be > 0 (got {self.temperature}); use greedy=True")
        if self.top_k < 0:
            raise UserError(f"generation top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"generation top_p must be in (0, 1], got {self.top_p}")

    @property
    def pad(self) -> int | None:
        """The id after a row's end: pad_id, else eos_id."""
        return self.eos_id if self.pad_id is None else self.pad_id


def _word(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of int64 values, as an int32 tensor (two's complement)."""
    x = x.to(torch.int64) & _MASK32
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _signed32(constant: int) -> int:
    return constant - (1 << 32) if constant >= 1 << 31 else constant


_LOWBIAS = (_signed32(0x7FEB352D), _signed32(0x846CA68B))
_SEED_WORD, _SECOND_WORD = _signed32(0x9E3779B9), _signed32(0x85EBCA6B)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" finaliser), in place on an int32 tensor of 32-bit words:
    products wrap modulo 2^32, and each shift is masked to make it logical. Half the memory of int64
    words and no allocations (the [rows, V] part of the noise: 2x faster at [8, 32000] on CPU)."""
    x ^= (x >> 16) & 0xFFFF
    x *= _LOWBIAS[0]
    x ^= (x >> 15) & 0x1FFFF
    x *= _LOWBIAS[1]
    x ^= (x >> 16) & 0xFFFF
    return x


def uniform_noise(seed: int, step: int, rows: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """u in (0, 1) as float64, shape [len(rows), len(vocab_ids)], a pure function of its arguments.

    `step` may also be a tensor of shape [rows] (one step per row, as in whole-sequence scoring).
    """
    rows = _word(rows).unsqueeze(-1)
    step = _word(torch.as_tensor(step, device=rows.device))
    if step.dim() == 1:
        step = step.unsqueeze(-1)
    h = _mix32_(_word(torch.tensor(seed, device=rows.device)) ^ _SEED_WORD)
    h = _mix32_(h ^ step)
    h = _mix32_(h ^ rows)
    # the [rows, V] words: mix32(h ^ id) and a second, independent word for 53 bits (float64 mantissa)
    word = _mix32_(h ^ _word(vocab_ids).unsqueeze(0))
    second = _mix32_(word ^ _SECOND_WORD)
    bits53 = (word.to(torch.int64) & _MASK32) << 21
    bits53 |= ((second >> 11) & 0x1FFFFF).to(torch.int64)
    return bits53.to(torch.float64).add_(0.5).div_(float(1 << 53))


def gumbel_noise(seed: int, step, rows: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    return uniform_noise(seed, step, rows, vocab_ids).log_().neg_().log_().neg_()


def parallel_argmax(scores: torch.Tensor, vocab_start: int, tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (max value, smallest global id reaching it) over the last dimension. [..., V/TP] -> [...]."""
    local_value, local_index = scores.max(dim=-1)  # first occurrence of the max on this shard
    global_index = local_index + vocab_start
    if group_size(tp_group) == 1:
        return local_value, global_index
    values = all_gather_last(local_value.unsqueeze(-1), tp_group)  # [..., TP], rank order = id order
    indices = all_gather_last(global_index.unsqueeze(-1), tp_group)
    best_value, best_rank = values.max(dim=-1)  # first rank with the max: its ids are the smallest
    return best_value, indices.gather(-1, best_rank.unsqueeze(-1)).squeeze(-1)


def _top_k_filter(scores: torch.Tensor, top_k: int, tp_group) -> torch.Tensor:
    """Keep entries >= the k-th largest value of the row (over all shards)."""
    local_k = min(top_k, scores.shape[-1])
    candidates = all_gather_last(scores.topk(local_k, dim=-1).values, tp_group)
    kth = candidates.topk(min(top_k, candidates.shape[-1]), dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p_filter(scores: torch.Tensor, top_p: float, tp_group) -> torch.Tensor:
    """Keep v iff the mass of strictly more probable entries is < top_p (bisection, see module doc)."""
    scores64 = scores.to(torch.float64)
    row_max = all_reduce(scores64.max(dim=-1, keepdim=True).values, tp_group, dist.ReduceOp.MAX)
    exp = torch.exp(scores64 - row_max)
    probs = exp / all_reduce(exp.sum(dim=-1, keepdim=True), tp_group, dist.ReduceOp.SUM)
    # invariant: mass(p > lo) >= top_p, mass(p > hi) < top_p. hi = top probability: mass above is 0.
    lo = torch.zeros_like(row_max)
    hi = all_reduce(probs.max(dim=-1, keepdim=True).values, tp_group, dist.ReduceOp.MAX)
    for _ in range(TOP_P_BISECTION_STEPS):
        mid = (lo + hi) / 2
        mass = all_reduce(torch.where(probs > mid, probs, 0.0).sum(dim=-1, keepdim=True),
                          tp_group, dist.ReduceOp.SUM)
        reaches = mass >= top_p
        lo = torch.where(reaches, mid, lo)
        hi = torch.where(reaches, hi, mid)
    # {t : mass(p > t) < top_p} = [p*, inf) where p* is the probability of the last kept entry, so
    # lo < p* <= hi. Keep p_v > lo: exact unless another entry lies in (lo, p*), i.e. within 2^-52 of
    # the top probability below p* -- closer than float32 logits can put two entries.
    return scores.masked_fill(probs <= lo, float("-inf"))


@functools.lru_cache(maxsize=8)
def _row_id_tensor(row_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """options.row_ids as a tensor, built once per request rather than on every decode step."""
    return torch.tensor(row_ids, dtype=torch.int64, device=device)


def sample(logits: torch.Tensor, options: SamplingOptions, *, vocab_size: int, vocab_start: int = 0,
           tp_group=None, step=0, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Choose one token per row. logits [rows, V_slice] (any float dtype) -> global token ids [rows].

    `options` gives greedy, temperature, top_k, top_p, the seed and row_ids. `step` (int, or a tensor
    [rows]) and `rows` (the rows' indices in the request, default 0..rows-1; the noise uses
    options.row_ids[rows] where row_ids are given) index the noise; the generator passes the absolute
    position of the token being sampled as `step`, so a sample does not depend on how many forward
    passes (cache or not) led to it.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample expects logits [rows, vocab], got shape {tuple(logits.shape)}")
    scores = mask_padded_logits(logits.float(), vocab_size, vocab_start=vocab_start)
    if options.greedy:
        return parallel_argmax(scores, vocab_start, tp_group)[1]
    scores = scores / options.temperature
    if options.top_k > 0:
        scores = _top_k_filter(scores, options.top_k, tp_group)
    if options.top_p < 1.0:
        scores = _top_p_filter(scores, options.top_p, tp_group)
    if rows is None:
        rows = torch.arange(scores.shape[0], device=scores.device)
    if options.row_ids is not None:
        rows = _row_id_tensor(options.row_ids, scores.device)[rows]
    vocab_ids = torch.arange(vocab_start, vocab_start + scores.shape[-1], device=scores.device)
    perturbed = scores.to(torch.float64) + gumbel_noise(options.seed, step, rows, vocab_ids)
    return parallel_argmax(perturbed, vocab_start, tp_group)[1]
