"""Helpers shared by distributed checks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mgsr_megatron.config import ModelConfig

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP) for world size 4


def tiny(arch: str, **overrides) -> ModelConfig:
    base = dict(arch=arch, num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=250,
                make_vocab_size_divisible_by=64, max_position_embeddings=64)
    if arch == "llama":
        base.update(num_query_groups=2, ffn_hidden_size=96)
    base.update(overrides)
    return ModelConfig(**base)


def gather_vocab(shard: torch.Tensor) -> torch.Tensor:
    """All-gather a vocab-parallel tensor along its last dimension over the TP group."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def broadcast_from_last_stage(tensor: torch.Tensor | None, shape, dtype=torch.float32) -> torch.Tensor:
    """Send the last pipeline stage's tensor to every stage of this pipeline."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty(shape, dtype=dtype)
    ranks = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(tensor, src=ranks, group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    err = (actual - expected).abs().max().item()
    if not err <= atol:
        raise AssertionError(f"{what}: max abs error {err:.3g} > {atol}")
