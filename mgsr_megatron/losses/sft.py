"""The supervised term (method.md §4): token cross-entropy of the student on response tokens.

    CE_i = log sum_v exp(z_iv) - z_i,label_i          (temperature 1, no label smoothing)

computed with Megatron's `tensor_parallel.vocab_parallel_cross_entropy` (label_smoothing=0: its
smoothing path is wrong for TP>1 upstream). Megatron's function always uses parallel_state's TP group
and edits its input in place, so it is called on a per-chunk copy, and the objective requires the TP
group of the losses to be that group. In a plain single process (no torch.distributed, no
parallel_state) the same formula is evaluated densely instead.

Gradient: softmax - onehot (Megatron's backward formula). The objective forms it inside DAC-KL's
backward pass at temperature 1 (that pass already holds the student softmax); otherwise
`sft_rows_grad` re-runs Megatron's function on the chunk under autograd.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mgsr_megatron.errors import UserError
from mgsr_megatron.losses.vocab_parallel import Shard


def megatron_tp_active(shard: Shard) -> bool:
    """True when Megatron's cross entropy can serve this shard's group; raises when it cannot."""
    from megatron.core import parallel_state

    if dist.is_available() and dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        megatron_group = parallel_state.get_tensor_model_parallel_group()
        if shard.group is not None and shard.group is not megatron_group and (
                dist.get_process_group_ranks(shard.group) != dist.get_process_group_ranks(megatron_group)):
            raise UserError("tp_group differs from Megatron's tensor-model-parallel group; the SFT term uses "
                            "Megatron's vocab_parallel_cross_entropy, which only works on that group")
        return True
    if shard.world > 1:
        raise UserError("tp_group spans several ranks but megatron.core.parallel_state is not initialised; "
                        "the SFT term (Megatron's vocab_parallel_cross_entropy) needs it")
    return False


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, use_megatron: bool) -> torch.Tensor:
    if use_megatron:
        from megatron.core import tensor_parallel

        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels, label_smoothing=0.0)
    inside = (labels >= 0) & (labels < logits.shape[-1])
    picked = logits.gather(-1, labels.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
    return torch.logsumexp(logits, dim=-1) - torch.where(inside, picked, picked.new_zeros(()))


def sft_rows(student: torch.Tensor, labels: torch.Tensor, use_megatron: bool) -> torch.Tensor:
    """Per-row cross-entropy [n] of a chunk (no autograd)."""
    with torch.no_grad():
        return _cross_entropy(student.float().clone(), labels, use_megatron)


def sft_rows_grad(student: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor,
                  use_megatron: bool) -> torch.Tensor:
    """d(sum_rows row_weight * CE)/d student for the chunk, by recomputing through Megatron's function."""
    logits = student.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = (_cross_entropy(logits, labels, use_megatron) * row_weight).sum()
        (grad,) = torch.autograd.grad(loss, [logits])
    return grad
