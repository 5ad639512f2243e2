"""Forward-only passes through Megatron's pipeline schedule (teacher logits, evaluation, tests), and the
output layer restricted to the columns a loss reads (`logits_from`)."""

from __future__ import annotations

import contextlib

import torch


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (they keep it in `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def logits_from(model, first_column: int):
    """Inside the block, `model`'s forward returns the logits of columns [first_column, s) only:
    [b, s - first_column, V/TP]. The output layer is the largest product of a small model and the logits
    its largest activation, and a distillation loss reads response positions only, so the prompt's
    columns are skipped before the output layer (Megatron's inference path slices its hidden states there
    the same way for the last token's logits). The hidden states reaching the output layer are [s, b, h]:
    a slice along the first dimension is a view, and autograd gives the skipped columns zero gradient.
    With sequence parallelism the output layer gathers the sequence itself: the logits are computed in
    full and sliced after it (the same result, no saving). Stages without the output layer are unchanged."""
    gpt = unwrap(model)
    if first_column == 0 or not gpt.post_process:
        yield
        return
    if gpt.config.sequence_parallel:
        handle = gpt.output_layer.register_forward_hook(
            lambda _layer, _args, output: (output[0][first_column:], *output[1:]))
    else:
        handle = gpt.output_layer.register_forward_pre_hook(
            lambda _layer, args: (args[0][first_column:], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def forward_logits(model, micro_batches: list[torch.Tensor],
                   first_columns: list[int] | None = None) -> list[torch.Tensor] | None:
    """Run token micro-batches [b, s] through every stage without grad.

    Returns the vocab-parallel logits [b, s, V_padded/TP] of each micro-batch on the last pipeline
    stage and None on the others (padded vocabulary columns are NOT masked here). `first_columns`
    (one per micro-batch): micro-batch k's logits cover columns [first_columns[k], s) only (`logits_from`).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = iter(zip(micro_batches, first_columns or [0] * len(micro_batches), strict=True))

    def step(_iterator, chunk):
        tokens, first_column = next(batches)
        with logits_from(chunk, first_column):
            return chunk(tokens, position_ids_like(tokens), None), None

    b, s = micro_batches[0].shape
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=None, model=[model], num_microbatches=len(micro_batches),
            seq_length=s, micro_batch_size=b, forward_only=True)
    return outputs if parallel_state.is_pipeline_last_stage() else None
