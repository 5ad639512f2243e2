"""The student's training engine (Megatron-Core's DDP + optimizer), the ClipNet's AdamW, the LR schedule.

The student is wrapped in Megatron's `DistributedDataParallel` (gradients accumulate in a contiguous
fp32 buffer, `grad_reduce_in_fp32`) and stepped by `get_megatron_optimizer`:
  * float32 parameters: `FP32Optimizer` (AdamW on the parameters themselves);
  * bfloat16 / float16 parameters: `Float16OptimizerWithFloat16Params`, i.e. fp32 main weights and
    gradients, AdamW on the fp32 copies, the model's low-precision weights re-cast after each step;
    float16 adds a loss scaler (constant or dynamic);
  * `use_distributed_optimizer`: Megatron's `DistributedOptimizer` (main weights and Adam moments
    sharded over DP, gradients reduce-scattered, parameters all-gathered after the step).

Gradient flow per step (identical on CPU/gloo and CUDA/NCCL; on CPU the collectives gloo lacks are
supplied by platform/cpu.py):
  1. `finalize_model_grads`: DP all-reduce (or reduce-scatter) of the grad buffers, tied embeddings under
     PP summed over Megatron's embedding group; the ClipNet's gradients are averaged over DP here too;
  2. the Megatron optimizer copies the gradients into its fp32 main gradients (and unscales them, fp16);
  3. ONE global L2 norm: Megatron's norm of the student's main gradients (TP duplicates and the tied
     output copy counted once) combined with the ClipNet's (counted on TP rank 0 of the last stage);
  4. one clip coefficient for the student's main gradients and the ClipNet's, then both steps.
The ClipNet keeps its own fp32 `torch.optim.AdamW` (same hyper-parameters and LR schedule).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mgsr_megatron import platform
from mgsr_megatron.config import OptimizerConfig, ScheduleConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_optimizer(module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """Plain fp32 AdamW for one small replicated module (the ClipNet). No weight decay on 1-D tensors."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def megatron_optimizer_config(cfg: OptimizerConfig, params_dtype: str):
    """Megatron's OptimizerConfig for our settings (clipping is done here, over student + ClipNet)."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    dtype = _DTYPES[params_dtype]
    return MegatronOptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16, params_dtype=dtype,
        loss_scale=cfg.loss_scale,
        initial_loss_scale=cfg.initial_loss_scale if cfg.initial_loss_scale is not None else 2.0 ** 32,
        min_loss_scale=cfg.min_loss_scale, loss_scale_window=cfg.loss_scale_window,
        hysteresis=cfg.hysteresis, use_distributed_optimizer=cfg.use_distributed_optimizer,
        overlap_param_gather=cfg.overlap_param_gather, clip_grad=0.0)


def build_student_optimizer(student, opt_cfg: OptimizerConfig, params_dtype: str):
    """Wrap the student in Megatron's DDP and build its Megatron optimizer. Returns (ddp, optimizer).

    The bare student stays usable (generation, checkpoints): DDP only adds gradient hooks and buffers
    (and, with the distributed optimizer, makes the parameters views into one contiguous buffer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=opt_cfg.grad_reduce_in_fp32, overlap_grad_reduce=opt_cfg.overlap_grad_reduce,
        overlap_param_gather=opt_cfg.overlap_param_gather,
        use_distributed_optimizer=opt_cfg.use_distributed_optimizer, check_for_nan_in_grad=False)
    ddp = DistributedDataParallel(config=student.config, ddp_config=ddp_config, module=student)
    optimizer = get_megatron_optimizer(megatron_optimizer_config(opt_cfg, params_dtype), [ddp])
    config = student.config
    config.no_sync_func = ddp.no_sync
    if opt_cfg.overlap_grad_reduce:
        config.grad_sync_func = ddp.start_grad_sync
    if opt_cfg.overlap_param_gather:
        config.param_sync_func = ddp.start_param_sync
    if _DTYPES[params_dtype] is torch.float16 or opt_cfg.loss_scale:
        config.grad_scale_func = optimizer.scale_loss  # the schedule scales the loss before backward
    return ddp, optimizer


def set_learning_rate(optimizer, clipnet_optimizer, lr: float, cfg: OptimizerConfig) -> None:
    """This step's LR for both optimizers; Megatron's groups carry lr/wd multipliers (no decay on
    biases and 1-D tensors), applied the way Megatron's OptimizerParamScheduler does."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
    for group in clipnet_optimizer.param_groups:
        group["lr"] = lr


def zero_grads(ddp, optimizer, clipnet_optimizer) -> None:
    ddp.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)
    clipnet_optimizer.zero_grad(set_to_none=True)


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


def _clipnet_grads(clipnet) -> list[torch.Tensor]:
    return [p.grad for p in clipnet.parameters() if p.grad is not None]


def optimizer_step(ddp, optimizer, clipnet, clipnet_optimizer, max_norm: float) -> float:
    """Synchronise, clip (one global norm over student + ClipNet) and step both optimizers.

    Returns the global gradient norm before clipping, or NaN when fp16 loss scaling found inf/NaN
    gradients (the step is skipped on every rank and the scaler backs off)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    finalize_model_grads([ddp])
    grads = _clipnet_grads(clipnet)
    scale = float(optimizer.get_loss_scale().item())
    if scale != 1.0:  # the ClipNet's gradients came through the same scaled loss
        for g in grads:
            g.div_(scale)
    dp_group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(dp_group) > 1:
        _allreduce_flat(grads, dp_group, average=True)
    if optimizer.prepare_grads():  # found inf/NaN (fp16 loss scaling): skip the whole step
        return float("nan")
    student_norm = float(optimizer.get_grad_norm())
    clip_sq = torch.zeros((), dtype=torch.float32, device=platform.device())
    if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_last_stage():
        for g in grads:
            clip_sq += g.detach().float().pow(2).sum()
    dist.all_reduce(clip_sq, group=parallel_state.get_model_parallel_group())
    norm = math.sqrt(student_norm ** 2 + clip_sq.item())
    if max_norm > 0:
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):  # Megatron may chain them
            params = part.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm, norm)
        coeff = max_norm / (norm + 1e-6)  # Megatron's rule (clip_grad_by_total_norm_fp32)
        if coeff < 1.0:
            for g in grads:
                g.mul_(coeff)
    optimizer.step_with_ready_grads()
    clipnet_optimizer.step()
    return norm


def validate_settings(cfg, tp: int, pp: int) -> None:
    """One-line UserErrors for precision / optimizer / recomputation settings, before any model is built."""
    from mgsr_megatron.errors import UserError
    from mgsr_megatron.models.builder import resolve, transformer_config

    opt, student = cfg.optimizer, cfg.student
    if student.params_dtype == "float16" and opt.loss_scale is None and opt.initial_loss_scale is None:
        raise UserError("student.params_dtype=float16 needs loss scaling: set optimizer.loss_scale (constant) "
                        "or optimizer.initial_loss_scale (dynamic, e.g. 65536), or train in bfloat16")
    for name in ("loss_scale", "initial_loss_scale"):
        value = getattr(opt, name)
        if value is not None and not value > 0:
            raise UserError(f"optimizer.{name}={value} must be positive")
    if opt.overlap_param_gather and not opt.use_distributed_optimizer:
        raise UserError("optimizer.overlap_param_gather=true needs optimizer.use_distributed_optimizer=true "
                        "(only the distributed optimizer gathers parameters)")
    if (opt.overlap_grad_reduce or opt.overlap_param_gather) and not platform.cuda_available():
        raise UserError("optimizer.overlap_grad_reduce / overlap_param_gather overlap NCCL communication with "
                        "compute on CUDA streams; on CPU (gloo) set them to false")
    recompute = (student.recompute_granularity, student.recompute_method, student.recompute_num_layers)
    if any(value is not None for value in recompute):
        try:
            transformer_config(resolve(student), tp, pp)
        except (ValueError, AssertionError, TypeError) as exc:
            raise UserError(f"student recomputation settings (recompute_granularity={recompute[0]}, "
                            f"recompute_method={recompute[1]}, recompute_num_layers={recompute[2]}) are "
                            f"rejected by Megatron: {' '.join(str(exc).split())}") from None
