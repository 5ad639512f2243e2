#!/usr/bin/env python
"""Cost of the distillation machinery in one training step, measured against its own baseline.

In one run, on the same ground-truth batch and models:
  baseline  teacher forward (no grad) + student forward/backward with plain vocab-parallel cross entropy
            (Megatron's schedule) + gradient sync, clipping and AdamW: what any distillation trainer pays
            (both models' output layers over the loss's columns only, as the MGSR step's: models.pipeline.logits_from);
  mgsr      Trainer.train_step(): the same, with SFT + DAC-KL (ClipNet) + span loss in place of the plain
            cross entropy, plus the step's bookkeeping and metrics — the full MGSR step on a
            ground-truth batch. The difference is the distillation machinery.
The two run alternately, step by step. Prints median times, the overhead ratio (target: mgsr <= 1.15 x
baseline), tokens/s, and a breakdown of both steps into phases measured in the same run: the trainer's
own timing hook (`Trainer.phase_seconds`, filled every step, logged as the metrics `time/<phase>`) times
its step; the baseline is timed with the same hook. Phases: data (batch assembly), generation (SCRG or
the teacher's samples; only with --generate), teacher_forward, student_forward_backward (Megatron's
schedule without the loss), loss_forward, loss_backward, optimizer (zero grads, gradient sync, clipping,
AdamW) and bookkeeping (the rest: learning rate, metric reduction). With --generate every MGSR step is
an SCRG step (on-policy samples of the student, one correction round; the baseline stays a
ground-truth step, so the ratio then includes generation).

Two more comparisons in the same run (each alternated step by step with its reference, ratios against
the reference measured in that run):
  cache     the MGSR ground-truth step with `teacher.cache` (the synthetic batch's top-K teacher cache,
            written once before timing in the cache's own format) against the same step with the online
            teacher (target: online / cached >= 1.4); runs with the first comparison, in a 3-way rotation
            (not with --generate: a cache holds ground-truth rows only);
  scrg      an SCRG step (on-policy samples of the student, one correction round) with
            mgsr.reuse_scrg_teacher_logits against the same step without it (target: without / with >= 1.2).
            With reuse the loss takes SCRG's teacher logits, brought up to date by a KV-cached pass over the
            corrected rows from their j on; without, the loss pass runs the teacher over every row again.
            The share of corrected rows and where j falls set the saving: by default mgsr.scrg_delta is the
            library's (0: every row with a mismatch is corrected); --scrg-corrected c calibrates it so that
            about c of the rows are, as the (1 - c) quantile of the rows' largest candidate divergence d_j in
            one SCRG call; --scrg-delta sets it. The student trains at learning rate 0 here (the same work
            per step): a student that learns from its teacher during the run would leave ever fewer rows
            corrected and drift the comparison towards the reuse's best case; and both variants run the same
            step numbers, hence the same seeds: the same samples, corrections and regeneration lengths.
            Beside the ratio: the share of the step the loss pass's teacher forward takes (what the reuse
            removes, less the suffix passes), and the teacher's work per step on both sides (SCRG's scoring,
            timed around TeacherScores, plus the loss pass).
            `--no-scrg` skips this comparison, `--scrg-only` runs only it.

    python tools/bench_step.py                      # CPU defaults (single process, ~5-6 minutes)
    python tools/bench_step.py --teacher-layers 4 --teacher-hidden 512 --student-layers 2 \
        --student-hidden 256 --seq 128              # smaller: the V=32000 loss rows weigh more

The CPU defaults (teacher 8 x 768, student 4 x 512, V=32000) are still models whose vocabulary
projection is a large part of their compute; the ratio falls as the models grow (see README).
    torchrun --nproc-per-node 8 tools/bench_step.py --bf16 --seq 1024   # on GPUs

Peak memory with and without activation recomputation (each setting in its own process, since the
CPU figure is the process's peak RSS; on GPU torch.cuda.max_memory_allocated):
    python tools/bench_step.py --memory --student-layers 8 --student-hidden 512 --seq 512 --micro-batch 8
prints, per setting (none / selective / full), the peak and the growth over the built-and-loaded
process (what the training steps add: activations, logits, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--student-hidden", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--teacher-hidden", type=int, default=768)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed rounds first (the first steps still grow the process's heap and caches)")
    parser.add_argument("--generate", action="store_true",
                        help="every MGSR step generates (SCRG over the first half of each row as the prompt)")
    parser.add_argument("--scrg-delta", type=float, default=None,
                        help="mgsr.scrg_delta of the SCRG comparison (default: the library's, see above)")
    parser.add_argument("--scrg-corrected", type=float, default=None,
                        help="share of rows SCRG corrects in the SCRG comparison (calibrates scrg_delta; "
                             "default: the library's scrg_delta)")
    parser.add_argument("--no-scrg", action="store_true", help="skip the SCRG logit-reuse comparison")
    parser.add_argument("--scrg-only", action="store_true", help="only the SCRG logit-reuse comparison")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters (GPU)")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                        help="student activation recomputation (full: uniform, 1 layer per unit)")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--memory", action="store_true",
                        help="peak memory of --steps training steps for each recomputation setting")
    parser.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)  # one --memory child
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the accelerator's dense peak for the MFU line (H100 SXM bf16: 989)")
    return parser.parse_args()


class SyntheticData:
    """Fixed random ground-truth micro-batches: responses are the second half of every row."""

    def __init__(self, vocab: int, seq: int, micro_batch: int):
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(4, vocab, (micro_batch, seq), generator=generator)
        loss_mask = torch.zeros(micro_batch, seq)
        loss_mask[:, seq // 2:-1] = 1.0
        span_pairs = torch.zeros(micro_batch, seq, dtype=torch.bool)
        for start in range(seq // 2, seq - 4, 6):  # spans of 4 tokens
            span_pairs[:, start:start + 3] = True
        self.batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": loss_mask,
                      "sft_mask": loss_mask, "kd_mask": loss_mask, "span_pair_mask": span_pairs,
                      "position_ids": torch.arange(seq).expand(micro_batch, -1).contiguous()}
        self.eos_id, self.pad_id = 3, 0
        self.row_ids = False  # ground-truth batches carry `row_ids` (rows 0..b-1) for the teacher cache

    def next_micro_batches(self, count: int) -> list[dict]:
        rows = {"row_ids": torch.arange(self.batch["tokens"].shape[0])} if self.row_ids else {}
        return [{**self.batch, **rows} for _ in range(count)]

    def next_prompt_micro_batches(self, count: int) -> list[list[list[int]]]:
        """The first half of every row as the prompt (--generate)."""
        half = self.batch["tokens"].shape[1] // 2
        return [[row[:half].tolist() for row in self.batch["tokens"]] for _ in range(count)]

    def collate_generated(self, samples: list, count: int, length: int | None = None) -> list[dict]:
        """(prompt, response) pairs -> `count` micro-batches of `length` positions (default: the sequence
        length) of distillation rows (no spans, no SFT)."""
        import numpy as np

        from mgsr_megatron.data.collate import collate
        from mgsr_megatron.data.indexed import Sample

        seq = self.batch["tokens"].shape[1] if length is None else length
        rows = [Sample(np.asarray(p, dtype=np.int64), np.asarray(r, dtype=np.int64)[:seq - len(p)], [])
                for p, r in samples]
        size = len(rows) // count
        batches = [collate(rows[k * size:(k + 1) * size], self.pad_id, seq) for k in range(count)]
        for batch in batches:
            batch["kd_mask"], batch["sft_mask"] = batch["loss_mask"], batch["loss_mask"] * 0
        return batches

    def state_dict(self) -> dict:
        return {}


def build(args, workdir: str, generate: bool = False):
    from mgsr_megatron import parallel
    from mgsr_megatron.config import Config, ModelConfig
    from mgsr_megatron.models import build_teacher
    from mgsr_megatron.models.checkpoint import save_model
    from mgsr_megatron.training.trainer import Trainer

    dtype = "bfloat16" if args.bf16 else "float32"
    cfg = Config()
    cfg.teacher = ModelConfig(num_layers=args.teacher_layers, hidden_size=args.teacher_hidden,
                              num_attention_heads=8, vocab_size=args.vocab, max_position_embeddings=args.seq,
                              params_dtype=dtype)
    cfg.student = ModelConfig(num_layers=args.student_layers, hidden_size=args.student_hidden,
                              num_attention_heads=8, vocab_size=args.vocab, max_position_embeddings=args.seq,
                              params_dtype=dtype)
    if args.recompute != "none":
        cfg.student.recompute_granularity = args.recompute
        if args.recompute == "full":
            cfg.student.recompute_method, cfg.student.recompute_num_layers = "uniform", 1
    cfg.optimizer.use_distributed_optimizer = args.distributed_optimizer
    cfg.parallel.tensor_model_parallel_size = args.tp
    cfg.schedule.seq_length = args.seq
    cfg.schedule.micro_batch_size = args.micro_batch
    parallel.init_distributed()
    parallel.initialize_model_parallel(args.tp, 1, seed=1, models={"teacher": cfg.teacher, "student": cfg.student})
    from megatron.core import parallel_state

    dp_size = parallel_state.get_data_parallel_world_size()
    cfg.schedule.global_batch_size = args.micro_batch * args.micro_batches * dp_size
    cfg.mgsr.data_schedule = "ground_truth"
    cfg.logging.time_phases = True  # the phase breakdown below (device synchronised at phase boundaries)
    if generate:  # every step: SCRG samples of (seq / 4) tokens after a prompt of seq / 2
        cfg.mgsr.data_schedule, cfg.mgsr.on_policy_lambda = "on_policy", 1.0
        cfg.mgsr.max_new_tokens = max(1, args.seq // 4)
    teacher = build_teacher(cfg.teacher)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(1e-3)
    cfg.teacher.load = f"{workdir}/teacher_{'scrg' if generate else 'gt'}"
    save_model(teacher, cfg.teacher.load, cfg.teacher)
    cfg.teacher.allow_untrained = True  # a timing teacher: its weights are the random init plus a constant
    return Trainer(cfg, SyntheticData(args.vocab, args.seq, args.micro_batch))


def baseline_step(trainer) -> dict:
    """Teacher forward + student forward/backward with plain cross entropy, same schedule and batch.
    Returns its phases, timed with the trainer's own hook (`Trainer.phase`, `time_loss_backward`)."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mgsr_megatron import platform
    from mgsr_megatron.models.pipeline import logits_from
    from mgsr_megatron.training import optimizer as optim
    from mgsr_megatron.training.trainer import first_loss_columns

    trainer.phase_seconds = {}
    clock = time.perf_counter()
    with trainer.phase("data"):
        batches = [{k: v.to(platform.device()) for k, v in mb.items()}
                   for mb in trainer.data.next_micro_batches(trainer.num_micro)]
    with trainer.phase("teacher_forward"):
        trainer.teacher_forward(batches)
    with trainer.phase("optimizer"):
        optim.zero_grads(trainer.student_ddp, trainer.optimizer, trainer.clipnet_optimizer)
    items = iter(batches)

    def forward_step(_iterator, model):
        mb = next(items)
        first = first_loss_columns([mb])[0]  # as the MGSR step: logits of the loss's columns only
        with logits_from(model, first):
            logits = model(mb["tokens"], mb["position_ids"], None)
        labels, loss_mask = mb["labels"][:, first:], mb["loss_mask"][:, first:]

        def loss_func(output):
            with trainer.phase("loss_forward"):
                losses = tensor_parallel.vocab_parallel_cross_entropy(output.transpose(0, 1).float().contiguous(),
                                                                      labels.transpose(0, 1).contiguous())
                loss = (losses.transpose(0, 1) * loss_mask).sum() / loss_mask.sum()
            trainer.time_loss_backward(output, loss)
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    b, s = batches[0]["tokens"].shape
    with trainer.phase("student_forward_backward"):
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=None,
                                    model=[trainer.student_ddp], num_microbatches=len(batches), seq_length=s,
                                    micro_batch_size=b, forward_only=False)
    with trainer.phase("optimizer"):
        optim.optimizer_step(trainer.student_ddp, trainer.optimizer, trainer.clipnet, trainer.clipnet_optimizer,
                             trainer.cfg.optimizer.clip_grad)
    return dict(trainer.exclusive_phases(clock))


def mgsr_step(trainer) -> dict:
    """Trainer.train_step(); returns its phases (`Trainer.phase_seconds`) and, on SCRG steps, the
    share of the loss pass's teacher positions computed after SCRG's detection (`teacher_recomputed`) and
    of the rows SCRG corrected (`scrg_corrected`)."""
    metrics = trainer.train_step()
    return {**trainer.phase_seconds, **{key: metrics.get(key) for key in ("teacher_recomputed", "scrg_corrected")}}


def synthetic_cache(trainer, workdir: str):
    """The teacher cache of the synthetic batch's rows 0..b-1 (K = max(k_band, k_feat)), written in the cache's
    format with its own top-K statistics (`mgsr cache-teacher` itself needs a tokenizer and indexed data)."""
    import json
    import pathlib

    import numpy as np
    from megatron.core import parallel_state

    from mgsr_megatron import platform
    from mgsr_megatron.losses.vocab_parallel import shard_of
    from mgsr_megatron.models import mask_padded_logits
    from mgsr_megatron.models.pipeline import forward_logits
    from mgsr_megatron.training import teacher_cache as tc

    batch, cfg = trainer.data.batch, trainer.cfg
    k, temperature = tc.needed_k(cfg.mgsr), float(cfg.mgsr.temperature)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    logits = forward_logits(trainer.teacher, [batch["tokens"].to(platform.device())])[0]
    logits = mask_padded_logits(logits, cfg.teacher.vocab_size, tp_rank)
    mask = batch["loss_mask"].to(logits.device) > 0
    shard = shard_of(logits.shape[-1], parallel_state.get_tensor_model_parallel_group())
    with torch.no_grad():
        log_p, ids, rest, entropy = tc.topk_rows(logits[mask], k, temperature, shard)
    directory = f"{workdir}/teacher_cache"  # this rank's own workdir: every rank writes the same values
    pathlib.Path(directory).mkdir()
    arrays = tc._write_shard_arrays(pathlib.Path(directory), 0, log_p.shape[0], k)
    arrays["logp"][:], arrays["ids"][:] = tc.value_bits(log_p), ids.int().cpu().numpy()
    arrays["rest"][:], arrays["entropy"][:] = tc.value_bits(rest), entropy.float().cpu().numpy()
    for array in arrays.values():
        array.flush()
    rows = batch["tokens"].shape[0]
    np.save(f"{directory}/{tc.ROW_OFFSETS}", np.concatenate([[0], np.cumsum(mask.sum(-1).cpu().numpy())]))
    pathlib.Path(directory, tc.MANIFEST).write_text(json.dumps(
        {"format_version": tc.FORMAT_VERSION, "k": k, "temperature": temperature, "vocab_size": cfg.teacher.vocab_size,
         "rows": rows, "tokens": int(log_p.shape[0]), "rows_per_shard": rows}))
    return tc.TeacherCache(directory)


def cached_step(trainer, cache) -> dict:
    """The MGSR ground-truth step with the teacher cache (no teacher forward); as `mgsr_step`."""
    trainer.cache, trainer.data.row_ids = cache, True
    try:
        return mgsr_step(trainer)
    finally:
        trainer.cache, trainer.data.row_ids = None, False


def calibrated_delta(trainer, corrected: float) -> float:
    """The (1 - corrected) quantile (interpolated) over rows of SCRG's largest candidate divergence d_j on one
    step's prompts (delta 0): with mgsr.scrg_delta at that value about `corrected` of the rows are corrected
    (rows without a mismatch never are; corrected 0: infinity, no row)."""
    from mgsr_megatron.generation import SamplingOptions, scrg

    if corrected <= 0:
        return float("inf")
    found = []
    for seed, prompts in enumerate(trainer.data.next_prompt_micro_batches(trainer.num_micro), 1):
        options = SamplingOptions(max_new_tokens=trainer.cfg.mgsr.max_new_tokens, eos_id=trainer.data.eos_id,
                                  seed=seed)
        _, stats = scrg(trainer.student, trainer.teacher, prompts, options, settings=trainer.scrg_settings,
                        vocab_size=trainer.cfg.student.vocab_size)
        found.append(stats["d_j"][stats["corrected"]])
    d_j = torch.cat(found)
    return float(torch.quantile(d_j, 1.0 - corrected)) if d_j.numel() else 0.0


def scrg_step(trainer, reuse: bool) -> dict:
    """An SCRG step (`mgsr_step`) with or without mgsr.reuse_scrg_teacher_logits, with the time SCRG's
    teacher spent scoring inside the generation phase (`teacher_scoring`: TeacherScores calls, timed by a
    wrapper around them here)."""
    from mgsr_megatron import platform
    from mgsr_megatron.generation.teacher_scores import TeacherScores

    trainer.cfg.mgsr.reuse_scrg_teacher_logits = reuse
    scoring, call = [], TeacherScores.__call__

    def timed(self, tokens):
        platform.synchronize()
        start = time.perf_counter()
        try:
            return call(self, tokens)
        finally:
            platform.synchronize()
            scoring.append(time.perf_counter() - start)

    TeacherScores.__call__ = timed
    try:
        phases = mgsr_step(trainer)
    finally:
        TeacherScores.__call__ = call
    return {**phases, "teacher_scoring": sum(scoring)}


PHASES = ("data", "generation", "teacher_forward", "student_forward_backward", "loss_forward", "loss_backward",
          "optimizer", "bookkeeping")
CPU_TIMES = ("cpu_user", "cpu_system")  # the whole step's process CPU time (all threads), not wall phases


def breakdown_lines(columns: dict[str, list[dict]], phases: tuple[str, ...] = PHASES) -> list[str]:
    """Median ms per phase of each kind of step (medians do not add up exactly to the step's median)."""
    lines = [f"{'phase (median ms/step)':<26}" + "".join(f" {name:>12}" for name in columns)]
    for phase in phases + CPU_TIMES:
        values = [statistics.median(step.get(phase, 0.0) for step in steps) * 1e3 for steps in columns.values()]
        if phase == "generation" and not any(values):
            continue
        lines.append(f"{phase:<26}" + "".join(f" {value:12.1f}" for value in values))
    return lines


def step_flops(trainer, args) -> float:
    """Model FLOPs of one step on one GPU (Megatron's convention: matmuls only, causal attention counted
    in full): student forward + backward 3 x (2 N + 4 L s h) per token, teacher forward 2 N + 4 L s h."""
    tokens = args.seq * args.micro_batch * args.micro_batches
    def forward(model, layers, hidden):
        n = sum(p.numel() for p in model.parameters())  # this rank's share (TP-split)
        return tokens * (2 * n + 4 * layers * args.seq * hidden // args.tp)
    student = 3 * forward(trainer.student, args.student_layers, args.student_hidden)
    teacher = forward(trainer.teacher, args.teacher_layers, args.teacher_hidden) if trainer.teacher is not None else 0
    return float(student + teacher)


def timed_rotation(variants: list, steps: int, warmup: int) -> tuple[list[list], list[list[float]]]:
    """Run `variants` (callables) in rotation, one step each (after `warmup` untimed rounds), so that a drift
    of the machine's speed during the run does not land on one side; every other round runs them in reverse
    order, so that neither is always first after the other. Returns, per variant, what each call
    returned (its phases, with the process's CPU seconds of the step in user and kernel mode added as
    `cpu_user` / `cpu_system`: on a VM that hands freed memory back to its host, page faults show up as
    kernel time) and the seconds of each timed step."""
    import resource

    from mgsr_megatron import platform

    for _ in range(warmup):
        for fn in variants:
            fn()
    times, results = [[] for _ in variants], [[] for _ in variants]
    for round_index in range(steps):
        order = list(zip(variants, times, results))
        for fn, bucket, returned in order if round_index % 2 == 0 else order[::-1]:
            platform.synchronize()
            start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            phases = fn()
            platform.synchronize()
            bucket.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            returned.append({**phases, "cpu_user": after.ru_utime - usage.ru_utime,
                             "cpu_system": after.ru_stime - usage.ru_stime})
    return results, times


def round_ratios(numerator: list[float], denominator: list[float]) -> str:
    """The spread of the per-round ratios (steps timed side by side): how much of a ratio is noise."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return f"per round {min(ratios):.3f}-{max(ratios):.3f}"


def peak_only(args) -> None:
    """One --memory setting: build, then --steps full training steps; print the peak memory."""
    import torch.distributed as dist

    from mgsr_megatron import platform

    with tempfile.TemporaryDirectory() as workdir:
        trainer = build(args, workdir, args.generate)
        built = platform.peak_memory_bytes()
        losses = [trainer.train_step()["loss"] for _ in range(args.steps)]
        peak = platform.peak_memory_bytes()
    if dist.get_rank() == 0:
        print(f"PEAK {args.recompute} {peak} {built} {losses[-1]!r}", flush=True)


def memory(args) -> None:
    import os
    import re
    import subprocess
    import sys

    base = [a for a in sys.argv[1:] if a not in ("--memory",)]
    base = [a for i, a in enumerate(base) if a != "--recompute" and (i == 0 or base[i - 1] != "--recompute")]
    rows = {}
    for setting in ("none", "selective", "full"):
        proc = subprocess.run([sys.executable, __file__, *base, "--peak-only", "--recompute", setting],
                              capture_output=True, text=True, env={**os.environ, "MASTER_PORT": str(29600 + len(rows))})
        found = re.search(r"PEAK (\S+) (\d+) (\d+) (\S+)", proc.stdout)
        if proc.returncode or not found:
            raise SystemExit(f"--recompute {setting} failed:\n{proc.stderr[-3000:]}")
        rows[setting] = (int(found.group(2)), int(found.group(3)), float(found.group(4)))
    from mgsr_megatron import platform

    kind = "peak GPU memory allocated" if platform.cuda_available() else "peak RSS"
    print(f"student {args.student_layers}x{args.student_hidden}, teacher {args.teacher_layers}x{args.teacher_hidden}, "
          f"V={args.vocab}, {args.micro_batches} x {args.micro_batch} x {args.seq} tokens, TP={args.tp}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.steps} steps; {kind} per process, GiB")
    print(f"{'recompute':<10} {'peak':>8} {'after build':>12} {'added by steps':>15} {'last loss':>12}")
    for setting, (peak, built, loss) in rows.items():
        print(f"{setting:<10} {peak / 2**30:8.3f} {built / 2**30:12.3f} {(peak - built) / 2**30:15.3f} {loss:12.6f}")


def step_comparison(args, trainer, workdir: str, rank0: bool) -> None:
    """The MGSR step against its baseline (and, without --generate, against the teacher cache)."""
    import torch.distributed as dist

    from mgsr_megatron import platform

    variants = {"baseline": lambda: baseline_step(trainer), "mgsr": lambda: mgsr_step(trainer)}
    if not args.generate:
        cache = synthetic_cache(trainer, workdir)
        variants["mgsr cached"] = lambda: cached_step(trainer, cache)
    results, seconds = timed_rotation(list(variants.values()), args.steps, args.warmup)
    times = {name: statistics.median(steps) for name, steps in zip(variants, seconds)}
    phases = dict(zip(variants, results))
    flops = step_flops(trainer, args)
    baseline, mgsr = times["baseline"], times["mgsr"]
    tokens = args.seq * args.micro_batch * args.micro_batches * (dist.get_world_size() // args.tp)
    if not rank0:
        return
    print(f"baseline (teacher fwd + student fwd/bwd, plain CE, AdamW): {baseline * 1e3:8.1f} ms/step")
    print(f"mgsr step (SFT + DAC-KL + span, sync, clip, AdamW): {mgsr * 1e3:8.1f} ms/step")
    print(f"ratio mgsr / baseline: {mgsr / baseline:.3f}  (target <= 1.15; {round_ratios(seconds[1], seconds[0])})")
    print(f"throughput: {tokens / mgsr:,.0f} tokens/s (mgsr), {tokens / baseline:,.0f} tokens/s (baseline)")
    if "mgsr cached" in times:
        cached = times["mgsr cached"]
        print(f"mgsr step from teacher.cache (top-{cache.k}, no teacher forward): {cached * 1e3:8.1f} ms/step")
        print(f"ratio online teacher / cache: {mgsr / cached:.3f}  (target >= 1.4; "
              f"{round_ratios(seconds[1], seconds[2])})")
    print("\n".join(breakdown_lines(phases)))
    shares = [s["teacher_recomputed"] for s in phases["mgsr"] if s["teacher_recomputed"] is not None]
    if shares:
        print(f"SCRG steps: the loss pass's teacher positions computed again: {statistics.mean(shares):.3f} "
              f"(mgsr.reuse_scrg_teacher_logits; the rest are the detection pass's)")
    achieved = flops / mgsr / 1e12
    print(f"model FLOPs per step and GPU {flops / 1e12:.3f} T (student 6N+attention fwd/bwd, teacher 2N+attention "
          f"fwd); {achieved:.1f} TFLOP/s = MFU {100 * achieved / args.peak_tflops:.1f}% of {args.peak_tflops:g}"
          + ("" if platform.cuda_available() else " (CPU: not meaningful)"))


def scrg_comparison(args, trainer, rank0: bool) -> None:
    """The SCRG step with the teacher's logits reused for the loss against the same step without."""
    trainer.cfg.optimizer.lr = trainer.cfg.optimizer.min_lr = 0.0  # a fixed student, see the module docstring
    delta = trainer.cfg.mgsr.scrg_delta if args.scrg_delta is None else args.scrg_delta
    if args.scrg_corrected is not None and args.scrg_delta is None:
        delta = calibrated_delta(trainer, args.scrg_corrected)
    trainer.cfg.mgsr.scrg_delta = delta
    trainer.scrg_settings = dataclasses.replace(trainer.scrg_settings, delta=delta)
    first_step = trainer.step

    def at_same_steps(reuse: bool):
        """The variant's k-th call runs step first_step + k: the step sets the sampling seed, so both variants
        sample, correct and regenerate the same rows each round (the regeneration's length follows each row's
        j, 0.6-1.3 s per step here: with the steps of their own, the two sides did different work)."""
        calls = iter(range(first_step, first_step + args.warmup + args.steps))

        def run():
            trainer.step = next(calls)
            return scrg_step(trainer, reuse)
        return run

    (phases_without, phases_with), seconds = timed_rotation([at_same_steps(False), at_same_steps(True)],
                                                            args.steps, args.warmup)
    without, with_reuse = (statistics.median(steps) for steps in seconds)
    recomputed = statistics.mean(s["teacher_recomputed"] for s in phases_with)
    corrected = statistics.mean(s["scrg_corrected"] for s in phases_with + phases_without)
    loss_teacher = statistics.median(s["teacher_forward"] for s in phases_without)
    teacher_work = [statistics.median(s["teacher_scoring"] + s.get("teacher_forward", 0.0) for s in phases)
                    for phases in (phases_without, phases_with)]
    if not rank0:
        return
    how = ("given" if args.scrg_delta is not None else "the library's" if args.scrg_corrected is None
           else f"calibrated to correct {args.scrg_corrected:g} of the rows")
    print(f"SCRG step (1 round, {trainer.cfg.mgsr.max_new_tokens} new tokens), mgsr.scrg_delta {delta:.4g} ({how}; "
          f"rows with a smaller largest divergence are left unchanged): {corrected:.3f} of the rows corrected")
    print(f"  without logit reuse {without * 1e3:8.1f} ms/step, with reuse {with_reuse * 1e3:8.1f} ms/step "
          f"(teacher positions computed again for the loss: {recomputed:.3f})")
    print(f"ratio SCRG without / with logit reuse: {without / with_reuse:.3f}  (target >= 1.2; "
          f"{round_ratios(*seconds)}); the loss pass's teacher forward is {loss_teacher / without:.3f} of the step "
          f"without reuse (that pass alone, free: {without / (without - loss_teacher):.3f})")
    print(f"  the teacher's work per step (SCRG's scoring + the loss pass): {teacher_work[0] * 1e3:8.1f} ms without "
          f"reuse, {teacher_work[1] * 1e3:8.1f} ms with: {teacher_work[0] / teacher_work[1]:.2f}x less")
    with_scoring = PHASES[:2] + ("teacher_scoring",) + PHASES[2:]  # SCRG's teacher, a part of generation
    print("\n".join(breakdown_lines({"no reuse": phases_without, "reuse": phases_with}, with_scoring)))


def main() -> None:
    args = parse_args()
    if args.memory:
        return memory(args)
    if args.peak_only:
        return peak_only(args)
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0 if dist.is_initialized() else True
    with tempfile.TemporaryDirectory() as workdir:
        trainer = None if args.scrg_only else build(args, workdir, args.generate)
        if rank0:
            print(f"batch: {args.micro_batches} x {args.micro_batch} x {args.seq} tokens, V={args.vocab}, "
                  f"teacher {args.teacher_layers}x{args.teacher_hidden}, student {args.student_layers}x"
                  f"{args.student_hidden}, TP={args.tp}, {'bf16' if args.bf16 else 'fp32'}; {args.steps} timed steps "
                  f"per variant, in rotation")
        if trainer is not None:
            step_comparison(args, trainer, workdir, rank0)
        if not args.no_scrg:
            generating = trainer if args.generate and trainer is not None else build(args, workdir, generate=True)
            scrg_comparison(args, generating, rank0)


if __name__ == "__main__":
    main()
