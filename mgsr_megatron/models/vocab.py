"""Vocabulary padding and the vocab-parallel shard layout.

Megatron pads the vocabulary to a multiple of `make_vocab_size_divisible_by * TP`, so the padded size
(and every embedding/output matrix) changes with TP, and padded columns take part in its softmax:
a run resumed at another TP then trains differently. We pad to a multiple of
`make_vocab_size_divisible_by` alone (TP-independent; TP must divide it) and mask the padded columns
to -inf before every loss and sampler, so the numbers are identical for every layout.
"""

from __future__ import annotations

import torch

from mgsr_megatron.errors import UserError


def padded_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    padded = -(-vocab_size // divisible_by) * divisible_by
    if padded % tp:
        raise UserError(f"padded vocabulary {padded} (vocab_size={vocab_size} rounded up to a multiple of "
                        f"make_vocab_size_divisible_by={divisible_by}) is not divisible by TP={tp}")
    return padded


def vocab_shard_range(padded_vocab: int, tp_rank: int, tp: int) -> tuple[int, int]:
    """[start, end) of the global vocabulary ids held by `tp_rank`."""
    per_rank = padded_vocab // tp
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


def mask_padded_logits(logits_shard: torch.Tensor, vocab_size: int, tp_rank: int = 0, *,
                       vocab_start: int | None = None) -> torch.Tensor:
    """Set columns with global id >= vocab_size to -inf (out of place; gradient 0 there).

    Column j holds global id `vocab_start + j`; by default `vocab_start = tp_rank * width`, the shard of
    `tp_rank` in an even split (the whole padded vocabulary at tp_rank 0 for gathered logits).
    """
    shard = logits_shard.shape[-1]
    start = tp_rank * shard if vocab_start is None else vocab_start
    if start + shard <= vocab_size:
        return logits_shard
    ids = torch.arange(start, start + shard, device=logits_shard.device)
    return logits_shard.masked_fill(ids >= vocab_size, float("-inf"))
