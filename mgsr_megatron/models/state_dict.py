"""Full (dense, TP=1/PP=1, global layer numbers) state dicts <-> this rank's TP/PP shard of a GPTModel.

Used by tests and small-model tooling. Large checkpoints go through `dist_checkpointing`, which never
materialises the full model on one rank.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_name(model, name: str) -> str:
    match = _LAYER.match(name)
    if not match:
        return name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]


def _is_glu_fc1(model, name: str) -> bool:
    return model.config.gated_linear_unit and ".mlp.linear_fc1." in name


def _local_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of this rank, by local name (no `_extra_state`)."""
    return {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()
            if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state")}


def _tp_shard(full: torch.Tensor, dim: int, rank: int, tp: int, glu: bool) -> torch.Tensor:
    if glu:  # Megatron keeps [gate_shard; up_shard] per rank, the full layout is [gate; up]
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[rank], up.chunk(tp, dim=dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def _tp_unshard(shards: list[torch.Tensor], dim: int, glu: bool) -> torch.Tensor:
    if glu:
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim),
                          torch.cat([h[1] for h in halves], dim=dim)], dim=dim)
    return torch.cat(shards, dim=dim)


def load_full_state_dict(model, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slices of a full state dict into `model` (strict: every tensor must be there)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, tensor in _local_tensors(model).items():
        key = _global_name(model, name)
        if key == "output_layer.weight" and key not in full:  # tied embeddings on the last stage
            key = "embedding.word_embeddings.weight"
        if key not in full:
            raise KeyError(f"full state dict has no tensor '{key}'")
        source = full[key]
        if getattr(tensor, "tensor_model_parallel", False) and tp > 1:
            source = _tp_shard(source, tensor.partition_dim, rank, tp, _is_glu_fc1(model, name))
        if source.shape != tensor.shape:
            raise ValueError(f"'{key}': expected shape {tuple(tensor.shape)}, found {tuple(source.shape)}")
        with torch.no_grad():
            tensor.copy_(source)


def gather_full_state_dict(model) -> dict[str, torch.Tensor]:
    """The full state dict on every rank (gathered over TP, then merged over PP). CPU tensors."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    local = {}
    for name, param in _local_tensors(model).items():
        tensor = param.detach()
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(shards, tensor.contiguous(), group=tp_group)
            tensor = _tp_unshard(shards, param.partition_dim, _is_glu_fc1(model, name))
        local[_global_name(model, name)] = tensor.cpu()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, local, group=parallel_state.get_pipeline_model_parallel_group())
        local = {}
        for stage in stages:
            local.update(stage)
    if model.share_embeddings_and_output_weights:
        local.pop("output_layer.weight", None)
    return local
