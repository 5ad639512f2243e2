"""AdamW over the student and the ClipNet, gradient sync, global-norm clipping and the LR schedule.

Gradient flow per step (identical on CPU/gloo and CUDA/NCCL):
  1. tied word embeddings under PP: the first stage's embedding and the last stage's output copy
     sum their gradients over Megatron's embedding group (Megatron's finalize_model_grads rule);
  2. every gradient is averaged over the data-parallel group (one flattened all-reduce per dtype);
  3. the global L2 norm counts each parameter once — tensor-parallel duplicates (norms, biases of
     row-parallel layers) only on TP rank 0, the tied output copy not at all, the replicated ClipNet
     only on TP rank 0 of the last stage — summed over the model-parallel group;
  4. one clip coefficient for everything, then AdamW.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mgsr_megatron import platform
from mgsr_megatron.config import OptimizerConfig, ScheduleConfig


def build_optimizer(module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW for one module (the student and the ClipNet each get their own, so the student's state can
    be checkpointed sharded like its parameters). No weight decay on 1-D tensors (biases, norms)."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def learning_rate(step: int, opt: OptimizerConfig, sched: ScheduleConfig) -> float:
    """Linear warm-up to `lr` over `lr_warmup_iters`, then cosine (or constant) decay to `min_lr`."""
    if sched.lr_warmup_iters and step < sched.lr_warmup_iters:
        return opt.lr * (step + 1) / sched.lr_warmup_iters
    if sched.lr_decay_style == "constant":
        return opt.lr
    span = max(1, sched.train_iters - sched.lr_warmup_iters)
    progress = min(1.0, (step - sched.lr_warmup_iters) / span)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))


def _allreduce_flat(grads: list[torch.Tensor], group, average: bool) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if average:
        flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_gradients(student, clipnet) -> None:
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        tied = [p.grad for p in student.parameters() if getattr(p, "shared_embedding", False) and p.grad is not None]
        if tied:
            _allreduce_flat(tied, parallel_state.get_embedding_group(), average=False)
    dp_group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(dp_group) > 1:
        grads = [p.grad for m in (student, clipnet) for p in m.parameters() if p.grad is not None]
        for dtype in {g.dtype for g in grads}:
            _allreduce_flat([g for g in grads if g.dtype == dtype], dp_group, average=True)


def clip_gradients(student, clipnet, max_norm: float) -> float:
    """Clip all gradients by their global L2 norm; returns the norm before clipping."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    tp_rank0 = parallel_state.get_tensor_model_parallel_rank() == 0
    counted = [p.grad for p in student.parameters() if p.grad is not None and not getattr(p, "shared", False)
               and param_is_not_tensor_parallel_duplicate(p)]
    if tp_rank0 and parallel_state.is_pipeline_last_stage():
        counted += [p.grad for p in clipnet.parameters() if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float32, device=platform.device())
    for g in counted:
        squares += g.detach().float().pow(2).sum()
    dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
    norm = squares.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for m in (student, clipnet):
            for p in m.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
    return norm
