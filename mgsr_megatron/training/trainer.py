"""The MGSR training loop.

One iteration (design.md §1):
  1. the data schedule picks ground truth, fresh SCRG samples or replay (same decision on every rank);
  2. the teacher runs forward-only through the pipeline; its vocab-parallel logits stay on the last stage;
  3. the student runs Megatron's forward-backward schedule over the micro-batches; the loss on the last
     stage is w_sft*SFT + w_dac*DAC-KL + w_span*span against the kept teacher logits;
  4. Megatron's DDP reduces the student's gradients (DP average, tied embeddings) into fp32 buffers, one
     global norm clips student + ClipNet, Megatron's optimizer steps the student (fp32 main weights for
     bf16/fp16, optionally sharded over DP) and an fp32 AdamW the ClipNet; the LR follows warm-up + cosine
     (training/optimizer.py).

The loss of a step is the mean of the micro-batch losses over all micro-batches of all DP ranks, each
micro-batch loss being a mean over its own tokens, so TP/PP/DP layouts give the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mgsr_megatron import platform
from mgsr_megatron.config import Config, check_batch_layout, generation_groups
from mgsr_megatron.errors import UserError
from mgsr_megatron.losses.objective import LossTargets, ObjectiveSettings
from mgsr_megatron.models import build_model, build_teacher, mask_padded_logits
from mgsr_megatron.models.builder import check_same_vocab
from mgsr_megatron.models.pipeline import forward_logits, logits_from
from mgsr_megatron.training import optimizer as optim

# The exit code of a run stopped by SIGTERM/SIGUSR1 after its checkpoint was written (SLURM requeue).
EXIT_PREEMPTED = 143 - 128 + 100  # 115: distinct from errors (1, 2) and from a kill (137, 143)
METRIC_KEYS = ("loss", "sft", "dac_kl", "span", "mean_l", "mean_u", "band_size", "kept_mass", "teacher_entropy")


@dataclass
class StepBatch:
    """The micro-batches of one step on this DP rank, plus where they came from."""

    micro_batches: list[dict]
    source: str  # ground_truth | generate | replay
    stats: dict = field(default_factory=dict)
    # SCRG steps with mgsr.reuse_scrg_teacher_logits: SCRG's teacher logits of each micro-batch's final rows
    # (this TP rank's vocabulary shard, on the last pipeline stage; None elsewhere) and whether they are the
    # loss pass's (False: the collated tokens are not the ones scored, the teacher runs again; identical on
    # every rank of the model replica). Held for this step only.
    teacher_logits: list | None = None
    teacher_reused: list[bool] | None = None


def generation_stats(responses: list[list[int]], eos_id: int) -> dict:
    """Diagnostics of this rank's generated responses: share without EOS (cut at max_new_tokens),
    mean length, distinct-2 over token ids (x100; repetition shows as a low value)."""
    bigrams = [tuple(r[i:i + 2]) for r in responses for i in range(len(r) - 1)]
    return {"gen_no_eos": sum(not r or r[-1] != eos_id for r in responses) / max(len(responses), 1),
            "gen_mean_len": sum(map(len, responses)) / max(len(responses), 1),
            "gen_distinct_2": 100.0 * len(set(bigrams)) / len(bigrams) if bigrams else 0.0}


GENERATED_LENGTH_MULTIPLE = 8  # generated micro-batches are padded to a multiple of this (or seq_length)


def generated_length(prompt_batches: list[list[list[int]]], max_new_tokens: int, seq_length: int) -> int:
    """The length every generated micro-batch of a step is collated to: the longest prompt of the step
    plus max_new_tokens (no row can be longer), rounded up to GENERATED_LENGTH_MULTIPLE, at most
    seq_length. Not seq_length itself: the padding after the longest row is wasted student and teacher
    work in every SCRG step (bench_step: 256 positions for rows of at most 192). One length per step
    (pipeline stages exchange one activation shape), known before generation (SCRG's detection scores
    rows at it, so its logits are the loss pass's); the multiple keeps GPU shapes few and divisible by TP."""
    longest = max(len(prompt) for prompts in prompt_batches for prompt in prompts) + max_new_tokens
    return min(seq_length, -(-longest // GENERATED_LENGTH_MULTIPLE) * GENERATED_LENGTH_MULTIPLE)


def first_loss_columns(micro_batches: list[dict]) -> list[int]:
    """Per micro-batch, the first column the objective reads (LossTargets.first_column): the student's and
    the teacher's logits are computed from there on (the prompt columns before it, never)."""
    return [LossTargets.from_batch(mb).first_column() for mb in micro_batches]


def generate_step_batch(trainer, student, teacher, keep_teacher_logits: bool = False):
    """The generated micro-batches of one step on this DP rank, for either engine's trainer: SCRG by the
    student, or the teacher's responses (SeqKD, `trainer.schedule.use_scrg` False), collated to
    `generated_length`. Returns (StepBatch with source "generate" and the generation statistics, kept):
    with `keep_teacher_logits`, `kept` holds per micro-batch SCRG's (teacher_logits, teacher_scored,
    teacher_recomputed, teacher_first_column) of the final rows scored as they are collated (scrg's
    keep_teacher_view), else nothing.

    `trainer` supplies cfg, data (training/data.py), schedule (data/schedule.py, which gets the samples
    pushed), scrg_settings, num_micro, dp_size, dp_rank, step and phase(name); `student` and `teacher`
    are the models generation runs on (Megatron GPTModels, or generation.GenerationModel adapters).
    Generation runs over groups of `generation_groups` micro-batches, one call each (decoding is bound by
    reading the weights, once per token for all rows of a call), with one seed per step and every row's
    noise numbered by its GLOBAL row: row i of micro-batch k of DP rank r is row i of global micro-batch
    k*DP + r (data/sampler.py), so every TP/PP/DP layout and grouping samples the same tokens for the same
    prompts (up to the rounding of other batch shapes).
    """
    from mgsr_megatron.generation import SamplingOptions, generate, scrg

    cfg, data, use_scrg = trainer.cfg, trainer.data, trainer.schedule.use_scrg
    samples, corrected, positions, changed, kept = [], [], [], [], []
    # the method's sampling (temperature 1, no top-k / top-p); the seed changes per step
    seed = (cfg.parallel.seed * 1_000_003 + trainer.step * 10_007) % (2 ** 31)
    options = SamplingOptions(max_new_tokens=cfg.mgsr.max_new_tokens, eos_id=data.eos_id, seed=seed)
    vocab_size, micro_batch = cfg.student.vocab_size, cfg.schedule.micro_batch_size
    with trainer.phase("generation"):
        prompt_batches = data.next_prompt_micro_batches(trainer.num_micro)
    length = generated_length(prompt_batches, cfg.mgsr.max_new_tokens, cfg.schedule.seq_length)
    teacher_input = (length, data.pad_id) if keep_teacher_logits else None
    for group in generation_groups(trainer.num_micro, cfg.mgsr.generation_micro_batches):
        prompts = [prompt for k in group for prompt in prompt_batches[k]]
        row_ids = tuple((k * trainer.dp_size + trainer.dp_rank) * micro_batch + i
                        for k in group for i in range(len(prompt_batches[k])))
        grouped = dataclasses.replace(options, row_ids=row_ids)
        if use_scrg:
            with trainer.phase("generation"):
                out, stats = scrg(student, teacher, prompts, grouped, settings=trainer.scrg_settings,
                                  vocab_size=vocab_size, keep_teacher_view=teacher_input)
            if teacher_input is not None:
                logits, scored = stats.pop("teacher_logits"), stats["teacher_scored"]
                start, share, first_column = 0, stats["teacher_recomputed"], stats["teacher_first_column"]
                for k in group:  # views of the group's tensors, one per micro-batch
                    end = start + len(prompt_batches[k])
                    kept.append((None if logits is None else logits[start:end],
                                 None if scored is None else scored[start:end], share, first_column))
                    start = end
            corrected.append(stats["corrected"])
            changed.append(stats["continuation_changed"][stats["corrected"]])
            positions.append(stats["j"][stats["corrected"]] - out.prompt_lengths[stats["corrected"]])
        else:
            with trainer.phase("generation"):
                out = generate(teacher, prompts, grouped, vocab_size=vocab_size)
        samples += list(zip(prompts, out.responses()))
    student.train()
    trainer.schedule.push(samples)
    batch_stats = generation_stats([response for _, response in samples], data.eos_id)
    if corrected:
        j, changed = torch.cat(positions), torch.cat(changed)
        batch_stats.update(scrg_corrected=float(torch.cat(corrected).float().mean()),
                           scrg_mean_j=float(j.float().mean()) if j.numel() else float("nan"),
                           scrg_changed=float(changed.float().mean()) if changed.numel() else float("nan"))
    return StepBatch(data.collate_generated(samples, trainer.num_micro, length), "generate", batch_stats), kept


def count_nonfinite_step(trainer, nonfinite: bool) -> bool:
    """Book a step's health on either engine's trainer: a non-finite loss or gradient is skipped and
    counted, and more than schedule.max_nan_steps of them in a row stop the run. True: the step may update."""
    if not nonfinite:
        trainer.nan_steps_in_row = 0
        return True
    trainer.nan_steps_in_row += 1
    trainer.skipped_steps += 1
    limit = trainer.cfg.schedule.max_nan_steps
    if trainer.nan_steps_in_row > limit:
        raise UserError(f"loss was NaN/Inf in {trainer.nan_steps_in_row} steps in a row (limit "
                        f"schedule.max_nan_steps={limit}); stopping")
    return False


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.raised = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def validate_batch_layout(cfg: Config, dp_size: int) -> int:
    """Number of micro-batches per step on each DP rank; clear errors for impossible settings
    (precision / optimizer settings, a resume that changed them, and config.check_batch_layout, the
    batch checks `mgsr plan` makes too)."""
    from mgsr_megatron.training.checkpoint import check_resume_optimizer

    optim.validate_settings(cfg, cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size)
    check_resume_optimizer(cfg)
    return check_batch_layout(cfg, dp_size)


class Trainer:
    def __init__(self, cfg: Config, data):
        """Needs Megatron's parallel_state set up (training/run.py does it). `data` is a
        training/data.py TrainingData (or anything with its methods)."""
        from megatron.core import parallel_state

        from mgsr_megatron.training.checkpoint import check_checkpoint_origins

        self.cfg = cfg
        self.data = data
        check_same_vocab(cfg.teacher, cfg.student)
        self.uses_teacher = cfg.loads_teacher  # False with teacher.cache and ground truth only
        self.cache = self._open_cache()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.num_micro = validate_batch_layout(cfg, self.dp_size)
        # every loaded checkpoint's tokenizer and the teacher's provenance, before any weights are read
        check_checkpoint_origins(cfg, getattr(data, "tokenizer", None), self.uses_teacher)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.student = build_model(cfg.student)
        if cfg.student.load:
            from mgsr_megatron.models.checkpoint import load_model

            load_model(self.student, cfg.student.load, verify=cfg.checkpoint.verify)
        self.teacher = self._load_teacher() if self.uses_teacher else None
        self.clipnet = self._build_clipnet()
        # Megatron's DDP wrapper + optimizer (fp32 main weights for bf16/fp16, optionally distributed);
        # self.student stays the bare GPTModel (generation, checkpoints), self.student_ddp is trained
        self.student_ddp, self.optimizer = optim.build_student_optimizer(
            self.student, cfg.optimizer, cfg.student.params_dtype)
        self.clipnet_optimizer = optim.build_optimizer(self.clipnet, cfg.optimizer)
        self.schedule = self._build_schedule() if self.uses_teacher else None
        # the loss's and SCRG's settings, built once from cfg.mgsr
        self.objective_settings = ObjectiveSettings.from_config(cfg.mgsr)
        self.scrg_settings = self._build_scrg_settings()
        # the trainer's own resumable state (state_dict / load_state_dict; training/checkpoint.py)
        self.step = 0
        self.last_loss = None  # the latest step's loss, recorded in checkpoints (provenance)
        self.nan_steps_in_row = 0
        self.skipped_steps = 0
        # wall seconds per phase of the latest train_step (filled by `_phase`; metrics "time/<phase>")
        self.phase_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ setup
    def _load_teacher(self):
        from mgsr_megatron.models.checkpoint import load_model

        if not self.cfg.teacher.load:
            raise UserError("teacher.load is not set: distillation needs the teacher's checkpoint directory")
        teacher = build_teacher(self.cfg.teacher)
        # one float64 sum per tensor, not a copy of the weights: a 13B teacher must not be held twice
        fingerprint = lambda: torch.stack([p.detach().double().sum() for p in teacher.parameters()])
        before = fingerprint()
        # a teacher's hashes are always checked when it has a manifest (--verify-checkpoint: it must)
        load_model(teacher, self.cfg.teacher.load, verify=True, require_manifest=self.cfg.checkpoint.verify)
        unchanged = torch.equal(before, fingerprint())
        flag = torch.tensor([1.0 if unchanged else 0.0], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 1.0:
            raise UserError(f"teacher checkpoint {self.cfg.teacher.load} left every weight at its random "
                            f"initialisation: refusing to distill from an untrained teacher")
        teacher.eval()
        return teacher

    def _open_cache(self):
        if not self.cfg.teacher.cache or not self.cfg.needs_teacher:
            return None
        from mgsr_megatron.training.teacher_cache import TeacherCache

        return TeacherCache(self.cfg.teacher.cache)

    def _build_clipnet(self):
        from mgsr_megatron.losses import ClipNet

        m = self.cfg.mgsr
        clipnet = ClipNet(k_feat=m.k_feat, hidden=m.clipnet_hidden, seed=self.cfg.parallel.seed, rho=m.rho)
        return clipnet.to(platform.device())

    def _build_schedule(self):
        from mgsr_megatron.data.schedule import DataSchedule

        return DataSchedule.from_config(self.cfg.mgsr, seed=self.cfg.parallel.seed)

    def _build_scrg_settings(self):
        from mgsr_megatron.generation import ScrgSettings

        return ScrgSettings.from_config(self.cfg.mgsr)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The trainer's own resumable state, everything a resume needs besides the student's weights and
        Megatron's optimizer state (training/checkpoint.py stores those sharded): step, skipped_steps,
        nan_steps_in_row, last_loss, ClipNet and its AdamW, the data position (the samplers of
        training/data.py) and this DP replica's data schedule (threshold, previous validation loss, seed
        of its RNG, replay buffer; None without a teacher). Tensors are not copied."""
        return {"step": self.step, "skipped_steps": self.skipped_steps, "nan_steps_in_row": self.nan_steps_in_row,
                "last_loss": self.last_loss, "clipnet": self.clipnet.state_dict(),
                "clipnet_optimizer": self.clipnet_optimizer.state_dict(), "data": self.data.state_dict(),
                "schedule": self.schedule.state_dict() if self.schedule is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned. step, clipnet, clipnet_optimizer and data are required; the
        others may be missing (checkpoints written before they were stored): skipped_steps and
        nan_steps_in_row then start at 0, last_loss at None, and the schedule keeps its fresh state (it is
        also ignored when this run has no schedule)."""
        self.clipnet.load_state_dict(state["clipnet"])
        self.clipnet_optimizer.load_state_dict(state["clipnet_optimizer"])
        self.data.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.last_loss = state.get("last_loss")
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nan_steps_in_row = int(state.get("nan_steps_in_row", 0))
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])

    # ------------------------------------------------------------------------------------------ batches
    def _tp_rank_masked(self, logits: torch.Tensor) -> torch.Tensor:
        return mask_padded_logits(logits, self.cfg.student.vocab_size, self.tp_rank)

    def next_batch(self) -> StepBatch:
        batch = self._next_batch_cpu()
        device = platform.device()
        batch.micro_batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()}
                               for mb in batch.micro_batches]
        return batch

    def _next_batch_cpu(self) -> StepBatch:
        warm = self.step < self.cfg.mgsr.sft_warmup_iters  # warm start: no generated rows yet
        decision = self.schedule.decide(self.step, self.cfg.schedule.train_iters) \
            if self.uses_teacher and not warm else "ground_truth"
        if decision == "ground_truth":
            return StepBatch(self.data.next_micro_batches(self.num_micro), "ground_truth")
        if decision == "replay":
            samples = self.schedule.replay(self.num_micro * self.cfg.schedule.micro_batch_size, self.step)
            return StepBatch(self.data.collate_generated(samples, self.num_micro), "replay")
        return self._generate_batch()

    def _generate_batch(self) -> StepBatch:
        """Fresh responses for this rank's prompts (`generate_step_batch`), with SCRG's teacher logits of
        the final sequences attached for the loss pass (mgsr.reuse_scrg_teacher_logits)."""
        reuse = self.schedule.use_scrg and self.cfg.mgsr.reuse_scrg_teacher_logits
        # the teacher scores SCRG's samples exactly as the loss pass will see them (collate_generated)
        batch, kept = generate_step_batch(self, self.student, self.teacher, keep_teacher_logits=reuse)
        if reuse:
            self._attach_scrg_teacher_logits(batch, kept)
        elif self.schedule.use_scrg:
            batch.stats["teacher_recomputed"] = 1.0
        return batch

    def _attach_scrg_teacher_logits(self, batch: StepBatch, kept: list) -> None:
        """Keep SCRG's teacher logits of a micro-batch when its collated tokens are the ones the teacher
        scored (always, as the collation is known before generation; checked, as a wrong logit would train
        silently). They are kept from the loss's first column on, as `teacher_forward` returns them (SCRG's
        start at the shortest prompt's last position, no later). `teacher_recomputed`: the share of the loss
        pass's teacher positions computed after SCRG's last detection (1 for a micro-batch that runs the
        teacher again)."""
        batch.teacher_logits, batch.teacher_reused, recomputed = [], [], []
        firsts = first_loss_columns(batch.micro_batches)
        for mb, first, (logits, scored, share, scored_from) in zip(batch.micro_batches, firsts, kept, strict=True):
            tokens = mb["tokens"]
            usable = (scored is not None and scored.shape == tokens.shape and first >= scored_from
                      and torch.equal(scored.cpu(), tokens))
            batch.teacher_logits.append(logits[:, first - scored_from:] if usable and logits is not None else None)
            batch.teacher_reused.append(usable)
            recomputed.append(share if usable else 1.0)
        batch.stats["teacher_recomputed"] = sum(recomputed) / len(recomputed)

    # ------------------------------------------------------------------------------------------ step
    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the wall time of the block to `phase_seconds[name]` (the device is synchronised at both
        ends so that GPU work lands in its phase: a few synchronisations per step). Only with
        logging.time_phases; otherwise the block just runs."""
        if not self.cfg.logging.time_phases:
            yield
            return
        platform.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            platform.synchronize()
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - start

    def time_loss_backward(self, logits: torch.Tensor, loss: torch.Tensor) -> None:
        """Phase `loss_backward`: from the loss's gradient to the student logits' gradient (two tensor
        hooks that leave the gradients unchanged; nothing without autograd)."""
        if not (self.cfg.logging.time_phases and torch.is_grad_enabled() and loss.requires_grad
                and logits.requires_grad):
            return
        started = []

        def begin(_grad):
            platform.synchronize()
            started.append(time.perf_counter())

        def end(_grad):
            platform.synchronize()
            if started:
                self.phase_seconds["loss_backward"] = (self.phase_seconds.get("loss_backward", 0.0)
                                                       + time.perf_counter() - started.pop())

        loss.register_hook(begin)
        logits.register_hook(end)

    def step_teacher_logits(self, batch: StepBatch):
        """The teacher logits of the step's micro-batches (as `teacher_forward`), taking SCRG's where the
        batch carries them: only the other micro-batches run the teacher."""
        if batch.teacher_reused is None:
            return self.teacher_forward(batch.micro_batches)
        missing = [k for k, reused in enumerate(batch.teacher_reused) if not reused]
        # the step takes them over: the batch must not keep [tokens, V] tensors alive past the loss
        logits, batch.teacher_logits = (batch.teacher_logits if self.last_stage else None), None
        firsts = first_loss_columns(batch.micro_batches)
        outputs = forward_logits(self.teacher, [batch.micro_batches[k]["tokens"] for k in missing],
                                 [firsts[k] for k in missing]) if missing else None
        if outputs is not None:  # the last pipeline stage
            for k, out in zip(missing, outputs, strict=True):
                logits[k] = out
        return logits

    def teacher_forward(self, micro_batches: list[dict]):
        """The frozen teacher's vocab-parallel logits of the micro-batches (a list, on the last pipeline
        stage; None on other stages and without a teacher), of the columns the loss reads: micro-batch k's
        cover [first_loss_columns[k], s). With teacher.cache, ground-truth micro-batches (they carry
        `row_ids`) take the cached top-K distribution instead: no teacher forward."""
        firsts = first_loss_columns(micro_batches)
        if self.cache is not None and all("row_ids" in mb for mb in micro_batches):
            if not self.last_stage:
                return None
            from mgsr_megatron.models.vocab import padded_vocab_size

            tp = self.cfg.parallel.tensor_model_parallel_size
            model = self.cfg.teacher
            local_vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp) // tp
            logits = []
            for mb, first in zip(micro_batches, firsts, strict=True):  # the true H(P) rides with its micro-batch
                dense, mb["teacher_entropy"] = self.cache.dense_teacher_logits(
                    mb["row_ids"], mb["loss_mask"][:, first:], local_vocab, self.tp_rank, self.cfg.mgsr.temperature)
                logits.append(dense)
            return logits
        if self.teacher is None:
            return None
        return forward_logits(self.teacher, [mb["tokens"] for mb in micro_batches], firsts)

    def _forward_backward(self, micro_batches: list[dict], teacher_logits, forward_only: bool = False) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from mgsr_megatron.losses import mgsr_objective

        batches = iter(enumerate(micro_batches))

        def forward_step(_iterator, model):
            index, mb = next(batches)
            targets = LossTargets.from_batch(mb)
            first = targets.first_column()  # the logits, the teacher's and the targets start there
            with logits_from(model, first):
                output = model(mb["tokens"], mb["position_ids"], None)

            def loss_func(output_logits):
                with self.phase("loss_forward"):
                    loss, extra = objective(output_logits)
                self.time_loss_backward(output_logits, loss)
                return loss, extra

            def objective(student_logits):
                student_logits = self._tp_rank_masked(student_logits)
                if teacher_logits is not None:
                    teacher = self._tp_rank_masked(teacher_logits[index])
                else:  # SFT-only run: the KD terms are off, the objective still needs a tensor
                    teacher = student_logits.detach()
                cached_entropy = mb.get("teacher_entropy")  # teacher.cache: the true H(P) at the temperature
                loss, metrics = mgsr_objective(student_logits, teacher, targets.from_column(first),
                                               clipnet=self.clipnet, settings=self.objective_settings,
                                               tp_group=self.tp_group, teacher_entropy=cached_entropy,
                                               grad_seq_first=True)  # GPTModel's logits: [s, b] transposed
                reported = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).reshape(())
                                        for k in METRIC_KEYS] + [torch.tensor(float(metrics["nonfinite"]))])
                return loss, {"metrics": reported}

            return output, loss_func

        b, s = micro_batches[0]["tokens"].shape
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=None, model=[self.student_ddp],
            num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b, forward_only=forward_only)

    def _reduce_metrics(self, outputs: list[dict]) -> dict:
        """Mean over micro-batches and DP ranks, sent from the last stage to every rank."""
        from megatron.core import parallel_state

        values = torch.zeros(len(METRIC_KEYS) + 1, device=platform.device())
        if self.last_stage and outputs:
            values = torch.stack([o["metrics"] for o in outputs]).mean(0).to(values.device)
            values[-1] = torch.stack([o["metrics"][-1] for o in outputs]).max()
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        nonfinite = values[-1:].clone()
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= self.dp_size
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        metrics = dict(zip(METRIC_KEYS, values[:-1].tolist()))
        metrics["nonfinite"] = bool(nonfinite.item() > 0)
        return metrics

    def validation_loss(self) -> dict | None:
        """The MGSR objective on the fixed validation micro-batches (no update), averaged over DP;
        reported to the data schedule (DistiLLM's threshold rule). None without a validation split."""
        if self.teacher is None and self.cache is not None:  # the cache holds the training split only
            return None
        micro_batches = self.data.validation_micro_batches(self.cfg.schedule.eval_iters, self.dp_rank, self.dp_size)
        count = torch.tensor([len(micro_batches)], device=platform.device())
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        if count.item() == 0:
            return None
        device = platform.device()
        micro_batches = [{k: v.to(device) for k, v in mb.items()} for mb in micro_batches[:int(count.item())]]
        self.student.eval()
        with torch.no_grad():
            outputs = self._forward_backward(micro_batches, self.teacher_forward(micro_batches), forward_only=True)
        self.student.train()
        metrics = self._reduce_metrics(outputs)
        if self.schedule is not None:
            metrics["replay_threshold"] = self.schedule.report_validation_loss(metrics["loss"])
        return metrics

    def train_step(self) -> dict:
        start, clock = time.time(), time.perf_counter()
        lr = optim.learning_rate(self.step, self.cfg.optimizer, self.cfg.schedule)
        optim.set_learning_rate(self.optimizer, self.clipnet_optimizer, lr, self.cfg.optimizer)
        self.phase_seconds = {}
        with self.phase("data"):
            batch = self.next_batch()
        self.student.train()
        with self.phase("teacher_forward"):
            teacher_logits = self.step_teacher_logits(batch)
        with self.phase("optimizer"):
            optim.zero_grads(self.student_ddp, self.optimizer, self.clipnet_optimizer)
        with self.phase("student_forward_backward"):
            outputs = self._forward_backward(batch.micro_batches, teacher_logits)
        del teacher_logits
        metrics = self._reduce_metrics(outputs)
        grad_norm = float("nan")
        if count_nonfinite_step(self, metrics["nonfinite"] or not math.isfinite(metrics["loss"])):
            with self.phase("optimizer"):
                grad_norm = optim.optimizer_step(self.student_ddp, self.optimizer, self.clipnet,
                                                 self.clipnet_optimizer, self.cfg.optimizer.clip_grad)
            if math.isnan(grad_norm):  # fp16 loss scaling found inf/NaN gradients: step skipped
                self.skipped_steps += 1
        self.step += 1
        self.last_loss = metrics["loss"]
        tokens = sum(int(mb["loss_mask"].numel()) for mb in batch.micro_batches) * self.dp_size
        elapsed = time.time() - start
        metrics.update(batch.stats, grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                       tokens_per_s=tokens / max(elapsed, 1e-9), step_seconds=elapsed, source=batch.source,
                       skipped_steps=self.skipped_steps)
        metrics["mem_gib"] = platform.peak_memory_bytes() / 2 ** 30
        if self.cfg.logging.time_phases:
            metrics.update({f"time/{name}": seconds for name, seconds in self.exclusive_phases(clock).items()})
        return metrics

    def exclusive_phases(self, clock: float) -> dict:
        """`phase_seconds` with nested phases taken out of their parents (generation out of data, the
        loss out of the student's forward/backward) and the rest of the step as `bookkeeping`."""
        phases = self.phase_seconds
        phases["data"] = phases.get("data", 0.0) - phases.get("generation", 0.0)
        for part in ("loss_forward", "loss_backward"):
            inner = phases.setdefault(part, 0.0)
            phases["student_forward_backward"] = phases.get("student_forward_backward", 0.0) - inner
        phases["bookkeeping"] = max(0.0, time.perf_counter() - clock - sum(phases.values()))
        return phases
