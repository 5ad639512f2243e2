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


_SUBWORLDS = [0]


def in_smaller_world(size: int, fn, rendezvous_dir):
    """Run `fn()` as a job of `size` processes: the default process group is torn down, ranks
    0..size-1 form a new world of `size` ranks (Megatron and the trainer see world size `size`, as in
    a torchrun launch of that size, without paying a second launch's imports), the other ranks wait,
    then all ranks form the launch's world again. Returns fn()'s value on ranks < size, None elsewhere."""
    import datetime

    from mgsr_megatron import parallel

    rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    _SUBWORLDS[0] += 1
    tag = f"{rendezvous_dir}/world_{_SUBWORLDS[0]}"
    timeout = datetime.timedelta(minutes=10)
    parallel.destroy()
    result, error = None, None
    if rank < size:
        dist.init_process_group(backend, init_method=f"file://{tag}_small", rank=rank, world_size=size,
                                timeout=timeout)
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised once the full world is back
            error = exc
        finally:
            parallel.destroy()
    dist.init_process_group(backend, init_method=f"file://{tag}_full", rank=rank, world_size=world,
                            timeout=timeout)
    if error is not None:
        raise error
    return result
