"""The MGSR training step with the student under `deepspeed.initialize` (ZeRO-1/2/3).

One step on each data-parallel rank (ground-truth batches; method.md top and §2-§4):
  1. LR of the step (training/optimizer.py `learning_rate`, warm-up + cosine) into the student's and the
     ClipNet's AdamW;
  2. for each of the global_batch / (micro_batch x DP) micro-batches of this rank (training/data.py, the
     same sampler and collate as the Megatron engine): the frozen teacher's logits (replicated, or
     ZeRO-3-partitioned: `deepspeed.teacher_zero3`; with `teacher.cache`, ground-truth micro-batches take the
     cached distribution and its stored entropy instead, and ground_truth schedules never load the teacher),
     the student's logits, both cut to the tokenizer's vocabulary, `losses.mgsr_objective` on the dense path
     (no tensor parallelism), `engine.backward`, `engine.step` (DeepSpeed accumulates and steps at the
     boundary: gradients averaged over micro-batches and DP ranks, clipped at optimizer.clip_grad on the
     student's norm, AdamW on fp32 master weights);
  3. the ClipNet (DAC-KL's band net, replicated) is averaged over DP, clipped at optimizer.clip_grad on its
     own norm and stepped by its fp32 AdamW (training/optimizer.py `build_optimizer`).
The step's loss is the mean of the micro-batch losses over all micro-batches and DP ranks, as in the
Megatron engine. A step whose logits hold NaN/Inf on any rank is skipped by DeepSpeed (its gradient
norm is not finite) and by the ClipNet; more than schedule.max_nan_steps in a row stop the run. fp16: the
ClipNet's gradients are unscaled by DeepSpeed's loss scale, and a step whose gradients overflow under a finite
loss is skipped by both and counted in skipped_steps only (the loss scaler backs off), as in the Megatron engine.

Which rows a step trains on: the Megatron engine's data schedule (data/schedule.py; warm start of
mgsr.sft_warmup_iters ground-truth steps) and its generated-batch construction
(training/trainer.py `generate_step_batch`): SCRG by the student (on_policy, off_policy) or the teacher's
responses (seqkd), generated through generation/hf_stage.py's HfCausalLM, which runs ZeRO-3 models in lockstep.
off_policy pushes each rank's generated samples into its replay buffer, which replay steps sample; the
validation loss moves its threshold; checkpoint.py stores each rank's schedule state.

Differences to the Megatron engine: the student's and the ClipNet's gradients are clipped on their own
norms (the Megatron engine clips both by one joint norm); SCRG's teacher logits are not reused for the
loss pass (the teacher runs again on every generated row: teacher_recomputed = 1), and SCRG's teacher scores
every position in every round (no KV-cached suffix passes for Hugging Face teachers).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist

from mgsr_megatron import platform
from mgsr_megatron.config import check_batch_layout
from mgsr_megatron.deepspeed_engine import models, runtime, settings
from mgsr_megatron.training import optimizer as optim
from mgsr_megatron.training.trainer import StepBatch, count_nonfinite_step, generate_step_batch

METRIC_KEYS = ("loss", "sft", "dac_kl", "span", "mean_l", "mean_u", "band_size", "kept_mass", "teacher_entropy")


def student_optimizer(model, cfg, cpu_adam: bool = False):
    """AdamW over the student's parameters: weight decay on matrices, none on 1-D tensors (biases, norms),
    the Megatron engine's rule. Shapes are the full ones also for ZeRO-3-partitioned parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if len(models.parameter_shape(param)) == 1 else decay).append(param)
    opt = cfg.optimizer
    groups = [group for group in ({"params": decay, "weight_decay": opt.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}) if group["params"]]
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps,
                                adamw_mode=True)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps)


class DeepSpeedTrainer:
    """Needs torch.distributed (runtime.init_distributed) and `settings.resolve_models(cfg)` done; `data` is a
    training/data.py TrainingData of this rank."""

    def __init__(self, cfg, data):
        from mgsr_megatron.losses import ClipNet, ObjectiveSettings
        from mgsr_megatron.training.teacher_cache import TeacherCache

        deepspeed = runtime.import_deepspeed()
        self.cfg = cfg
        self.data = data
        self.dp_size, self.dp_rank = dist.get_world_size(), dist.get_rank()
        self.uses_teacher = cfg.needs_teacher
        self.num_micro = check_batch_layout(cfg, self.dp_size,
                                            models=("teacher", "student") if cfg.loads_teacher else ("student",))
        self.vocab = cfg.student.vocab_size  # the tokenizer's (settings.resolve_models)
        self.device = platform.device()
        self.ds_config = settings.engine_config(cfg, self.dp_size)
        if cfg.deepspeed.cpu_adam:
            runtime.check_extension_lock(runtime.CPU_ADAM_OP)
        self.cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache and self.uses_teacher else None
        self.teacher = self._load_teacher(deepspeed) if cfg.loads_teacher else None
        self.zero3 = cfg.deepspeed.zero_stage == 3
        student = models.load_model(cfg.student.load, cfg.student.params_dtype,
                                    self.ds_config if self.zero3 else None, None if self.zero3 else self.device)
        self.student = student  # the bare HF model (export, logits); the engine wraps it
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=student, optimizer=student_optimizer(student, cfg, cfg.deepspeed.cpu_adam), config=self.ds_config,
            dist_init_required=False)
        m = cfg.mgsr
        clipnet = ClipNet(k_feat=m.k_feat, hidden=m.clipnet_hidden, seed=cfg.parallel.seed, rho=m.rho)
        self.clipnet = clipnet.to(self.device)
        self.clipnet_optimizer = optim.build_optimizer(self.clipnet, cfg.optimizer)
        self.objective = ObjectiveSettings.from_config(cfg.mgsr)
        self._build_generation()
        self.step = 0
        self.last_loss = None
        self.nan_steps_in_row = 0
        self.skipped_steps = 0
        self.fp16 = cfg.student.params_dtype == "float16"

    def _load_teacher(self, deepspeed):
        cfg = self.cfg
        if cfg.deepspeed.teacher_zero3:
            config = settings.teacher_config(cfg, self.dp_size)
            teacher = models.load_model(cfg.teacher.load, cfg.teacher.params_dtype, config)
            teacher.requires_grad_(False)
            teacher, *_ = deepspeed.initialize(model=teacher, config=config, dist_init_required=False)
        else:
            teacher = models.load_model(cfg.teacher.load, cfg.teacher.params_dtype, None, self.device)
            teacher.requires_grad_(False)
        teacher.eval()
        return teacher

    def _build_generation(self) -> None:
        """The data schedule and, for generating schedules, the models as generation adapters: ZeRO-3
        models generate in lockstep over the data-parallel ranks (every forward gathers parameters)."""
        from mgsr_megatron.data.schedule import DataSchedule
        from mgsr_megatron.generation import ScrgSettings
        from mgsr_megatron.generation.hf_stage import HfCausalLM

        cfg = self.cfg
        self.schedule = DataSchedule.from_config(cfg.mgsr, seed=cfg.parallel.seed) if self.uses_teacher else None
        self.scrg_settings = ScrgSettings.from_config(cfg.mgsr)
        self.generating_student = HfCausalLM(self.student, self.vocab, lockstep=self.zero3)
        self.generating_teacher = None if self.teacher is None else HfCausalLM(
            self.teacher, self.vocab, lockstep=bool(cfg.deepspeed.teacher_zero3))

    # ------------------------------------------------------------------------------------------ pieces
    def phase(self, name: str):
        """generate_step_batch's timing hook: this engine times no phases."""
        return contextlib.nullcontext()

    def next_batch(self) -> StepBatch:
        """This step's micro-batches (on the device): ground truth, fresh generations or a replay, as the
        data schedule decides (the same decision on every rank; ground truth during the warm start)."""
        warm = self.step < self.cfg.mgsr.sft_warmup_iters
        decision = "ground_truth" if self.schedule is None or warm else \
            self.schedule.decide(self.step, self.cfg.schedule.train_iters)
        if decision == "ground_truth":
            batch = StepBatch(self.data.next_micro_batches(self.num_micro), "ground_truth")
        elif decision == "replay":
            samples = self.schedule.replay(self.num_micro * self.cfg.schedule.micro_batch_size, self.step)
            batch = StepBatch(self.data.collate_generated(samples, self.num_micro), "replay")
        else:
            batch, _ = generate_step_batch(self, self.generating_student, self.generating_teacher)
            if self.schedule.use_scrg:
                batch.stats["teacher_recomputed"] = 1.0
        batch.micro_batches = self._to_device(batch.micro_batches)
        return batch

    def logits(self, model, tokens: torch.Tensor, position_ids: torch.Tensor, first_column: int = 0) -> torch.Tensor:
        """[b, s - first_column, V] logits of columns [first_column, s) over the tokenizer's vocabulary (wider
        embeddings are cut). Hugging Face causal LMs skip the other columns before their output layer
        (`logits_to_keep`, the last s - first_column columns); a model without it computes them and drops them."""
        keep = tokens.shape[1] - first_column
        if first_column and _accepts_logits_to_keep(model):
            out = model(input_ids=tokens, position_ids=position_ids, use_cache=False, logits_to_keep=keep).logits
        else:
            out = model(input_ids=tokens, position_ids=position_ids, use_cache=False).logits[:, first_column:]
        return out[..., :self.vocab] if out.shape[-1] > self.vocab else out

    def set_learning_rate(self, lr: float) -> None:
        for group in list(self.optimizer.param_groups) + list(self.clipnet_optimizer.param_groups):
            group["lr"] = lr

    def _to_device(self, micro_batches: list[dict]) -> list[dict]:
        return [{k: v.to(self.device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]

    def micro_batch_loss(self, mb: dict):
        """(loss, reported metrics [len(METRIC_KEYS) + 1]) of one micro-batch; the student's graph is kept."""
        from mgsr_megatron.losses import LossTargets, mgsr_objective

        targets = LossTargets.from_batch(mb)
        first = targets.first_column()  # both models' logits and the targets start at the loss's first column
        teacher_logits = entropy = None
        if self.cache is not None and "row_ids" in mb:  # ground truth: the cached distribution, no teacher forward
            teacher_logits, entropy = self.cache.dense_teacher_logits(mb["row_ids"], mb["loss_mask"][:, first:],
                                                                      self.vocab, 0, self.cfg.mgsr.temperature)
        elif self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.logits(self.teacher, mb["tokens"], mb["position_ids"], first)
        student_logits = self.logits(self.engine, mb["tokens"], mb["position_ids"], first)
        teacher = teacher_logits if teacher_logits is not None else student_logits.detach()
        loss, metrics = mgsr_objective(student_logits, teacher, targets.from_column(first), clipnet=self.clipnet,
                                       settings=self.objective, tp_group=None, teacher_entropy=entropy)
        reported = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).reshape(()).cpu()
                                for k in METRIC_KEYS] + [torch.tensor(float(metrics["nonfinite"]))])
        return loss, reported

    def _reduce(self, reported: list[torch.Tensor]) -> dict:
        """Mean over micro-batches and DP ranks; nonfinite if any micro-batch of any rank had NaN/Inf."""
        values = torch.stack(reported).mean(0)
        values[-1] = torch.stack(reported)[:, -1].max()
        values = values.to(self.device)
        nonfinite = values[-1:].clone()
        dist.all_reduce(values)
        values /= self.dp_size
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        metrics = dict(zip(METRIC_KEYS, values[:-1].tolist()))
        metrics["nonfinite"] = bool(nonfinite.item() > 0)
        return metrics

    def loss_scale(self) -> float:
        """DeepSpeed's current fp16 loss scale (1 without fp16); it changes at the optimizer step only."""
        return float(self.optimizer.loss_scale) if self.fp16 else 1.0

    def _clipnet_step(self, loss_scale: float = 1.0) -> float:
        """DP-average the ClipNet's gradients, unscale them (fp16: they came through DeepSpeed's scaled loss),
        clip at optimizer.clip_grad on their norm, step. Returns the norm."""
        grads = [p.grad for p in self.clipnet.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.dp_size > 1:
            dist.all_reduce(flat)
        flat /= self.dp_size * loss_scale
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        norm = float(flat.double().norm())
        clip = self.cfg.optimizer.clip_grad
        if clip > 0:
            coeff = clip / (norm + 1e-6)
            if coeff < 1.0:
                for g in grads:
                    g.mul_(coeff)
        self.clipnet_optimizer.step()
        return norm

    # ------------------------------------------------------------------------------------------ step
    def train_step(self) -> dict:
        start = time.time()
        lr = optim.learning_rate(self.step, self.cfg.optimizer, self.cfg.schedule)
        self.set_learning_rate(lr)
        batch = self.next_batch()
        micro_batches = batch.micro_batches
        self.engine.train()
        self.clipnet_optimizer.zero_grad(set_to_none=True)
        scale = self.loss_scale()  # the scale of this step's backward passes
        reported = []
        for mb in micro_batches:
            loss, values = self.micro_batch_loss(mb)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            reported.append(values)
        metrics = self._reduce(reported)
        applied = bool(self.engine.was_step_applied())
        finite = not metrics["nonfinite"] and math.isfinite(metrics["loss"])
        # fp16 gradients overflowing under a finite loss: DeepSpeed skipped the step and lowers the scale; skipped
        # and counted as in the Megatron engine, but not towards schedule.max_nan_steps
        overflow = self.fp16 and finite and not applied
        grad_norm = float("nan")
        if count_nonfinite_step(self, not finite or not (applied or overflow)):
            if overflow:
                self.skipped_steps += 1  # the ClipNet skips it too, staying in step with the student
            else:
                student_norm = self.engine.get_global_grad_norm()
                student_norm = float(student_norm) if student_norm is not None else float("nan")
                grad_norm = math.sqrt(student_norm ** 2 + self._clipnet_step(scale) ** 2)
        self.step += 1
        self.last_loss = metrics["loss"]
        tokens = sum(int(mb["loss_mask"].numel()) for mb in micro_batches) * self.dp_size
        elapsed = time.time() - start
        metrics.update(grad_norm=grad_norm, lr=lr, tokens_per_s=tokens / max(elapsed, 1e-9), step_seconds=elapsed,
                       source=batch.source, skipped_steps=self.skipped_steps,
                       mem_gib=platform.peak_memory_bytes() / 2 ** 30)
        if self.fp16:
            metrics["loss_scale"] = self.loss_scale()  # after this step's update: the next step's
        metrics.update(batch.stats)
        return metrics

    def validation_loss(self) -> dict | None:
        """The objective on the fixed validation micro-batches (no update), averaged over DP and reported to
        the data schedule (off_policy's threshold rule); None without a validation split, or with the teacher
        cache and no teacher (the cache holds the training split only)."""
        if self.teacher is None and self.cache is not None:
            return None
        micro_batches = self.data.validation_micro_batches(self.cfg.schedule.eval_iters, self.dp_rank, self.dp_size)
        count = torch.tensor([len(micro_batches)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        if count.item() == 0:
            return None
        self.engine.eval()
        with torch.no_grad():
            reported = [self.micro_batch_loss(mb)[1] for mb in self._to_device(micro_batches[:int(count.item())])]
        self.engine.train()
        metrics = self._reduce(reported)
        if self.schedule is not None:
            metrics["replay_threshold"] = self.schedule.report_validation_loss(metrics["loss"])
        return metrics


def _accepts_logits_to_keep(model) -> bool:
    """The Hugging Face model inside a DeepSpeed engine (or bare) takes `logits_to_keep` (transformers' causal
    LMs of the supported families do; remote or older code may not)."""
    import inspect

    module = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(module.forward).parameters
