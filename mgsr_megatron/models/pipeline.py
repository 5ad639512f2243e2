"""Forward-only passes through Megatron's pipeline schedule (teacher logits, evaluation, tests)."""

from __future__ import annotations

import torch


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def forward_logits(model, micro_batches: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Run token micro-batches [b, s] through every stage without grad.

    Returns the vocab-parallel logits [b, s, V_padded/TP] of each micro-batch on the last pipeline
    stage and None on the others (padded vocabulary columns are NOT masked here).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = iter(micro_batches)

    def step(_iterator, chunk):
        tokens = next(batches)
        return chunk(tokens, position_ids_like(tokens), None), None

    b, s = micro_batches[0].shape
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=None, model=[model], num_microbatches=len(micro_batches),
            seq_length=s, micro_batch_size=b, forward_only=True)
    return outputs if parallel_state.is_pipeline_last_stage() else None
