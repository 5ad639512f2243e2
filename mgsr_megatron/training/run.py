"""`mgsr train`: set up, resume, loop with metrics / evaluation / checkpoints, stop on preemption."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from mgsr_megatron import parallel
from mgsr_megatron.config import Config, validate
from mgsr_megatron.training.checkpoint import find_resume, load_checkpoint, save_checkpoint
from mgsr_megatron.training.data import TrainingData
from mgsr_megatron.training.metrics import MetricsLogger
from mgsr_megatron.training.trainer import EXIT_PREEMPTED, PreemptionFlag, Trainer


def check_generation_fits(cfg: Config) -> None:
    from mgsr_megatron.errors import UserError

    if cfg.mgsr.data_schedule != "ground_truth":
        needed = cfg.data.max_prompt_length + cfg.mgsr.max_new_tokens
        if needed > cfg.schedule.seq_length:
            raise UserError(f"data.max_prompt_length + mgsr.max_new_tokens = {needed} exceeds "
                            f"schedule.seq_length={cfg.schedule.seq_length}: generated rows would not fit")
    # DistiLLM's adaptive schedule only raises its threshold when a validation loss rises: without
    # validation and with threshold 0 it never generates, and the run would silently be KD on ground truth
    if cfg.mgsr.data_schedule == "off_policy" and cfg.mgsr.init_threshold == 0 and not cfg.schedule.eval_interval:
        raise UserError("mgsr.data_schedule=off_policy with mgsr.init_threshold=0 and schedule.eval_interval=0 "
                        "never generates (its threshold rises only on validation): enable validation, set "
                        "mgsr.init_threshold > 0, or use on_policy / ground_truth")


def build_trainer(cfg: Config) -> Trainer:
    """Distributed start-up, data and models (validation happens before any weights are loaded)."""
    from megatron.core import parallel_state

    validate(cfg)
    check_generation_fits(cfg)
    parallel.init_distributed(timeout_minutes=cfg.parallel.distributed_timeout_minutes,
                              rendezvous_timeout_s=cfg.parallel.rendezvous_timeout_seconds)
    models = {"student": cfg.student, **({"teacher": cfg.teacher} if cfg.needs_teacher else {})}
    parallel.initialize_model_parallel(cfg.parallel.tensor_model_parallel_size,
                                       cfg.parallel.pipeline_model_parallel_size, cfg.parallel.seed, models)
    data = TrainingData(cfg, parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    return Trainer(cfg, data)


def run_evaluation(trainer: Trainer, log: MetricsLogger) -> None:
    """Validation loss (feeds the off-policy schedule) and ROUGE-L / exact match on held-out prompts."""
    valid = trainer.validation_loss()
    if valid is not None:
        log.log(trainer.step, valid, kind="valid")
    log_generation_metrics(trainer, trainer.student, log)


def log_generation_metrics(trainer, model, log: MetricsLogger) -> None:
    """ROUGE-L / exact match (evaluation/evaluate.py, seed 10) of `model` on schedule.eval_prompts held-out
    prompts of `trainer.data`, at most schedule.eval_max_new_tokens new tokens, logged as kind "eval"; nothing
    without a validation split. Both engines: Megatron's GPTModel, the DeepSpeed engine's HfCausalLM."""
    from mgsr_megatron.evaluation.evaluate import evaluate

    cfg = trainer.cfg
    items = trainer.data.evaluation_items(cfg.schedule.eval_prompts)
    if items:
        result = evaluate(model, items, trainer.data.tokenizer, vocab_size=cfg.student.vocab_size,
                          max_new_tokens=cfg.schedule.eval_max_new_tokens, seeds=(10,))
        log.log(trainer.step, {k: v for k, v in result.items() if isinstance(v, (int, float))}, kind="eval")


def open_metrics(trainer, cfg: Config, resume_dir) -> MetricsLogger:
    """The run's metrics logger (progress bar and lines on rank 0, JSONL, TensorBoard), from the step the
    trainer is at; a resumed run says where it resumed from."""
    rank0 = dist.get_rank() == 0
    log = MetricsLogger(cfg.logging.output_dir, cfg.schedule.train_iters, cfg.logging.log_interval, rank0,
                        cfg.logging.tensorboard, cfg.logging.progress_bar, start_step=trainer.step)
    if rank0 and resume_dir is not None:
        log.write_line(trainer.step, "resume", {"from": str(resume_dir)})
    return log


def run_steps(trainer, cfg: Config, log: MetricsLogger, resume_dir, save, evaluate) -> int:
    """The training loop of both engines (Megatron's Trainer, deepspeed_engine's): steps to
    schedule.train_iters with metrics, `evaluate(trainer, log)` every schedule.eval_interval steps and at
    the end, `save(trainer, checkpoint.save)` every checkpoint.save_interval steps and at the end, and on
    SIGTERM / SIGUSR1 a checkpoint and EXIT_PREEMPTED. Returns the exit code (0 or EXIT_PREEMPTED)."""
    preemption = PreemptionFlag()
    save_dir, interval = cfg.checkpoint.save, cfg.schedule.eval_interval
    saved_step = trainer.step if resume_dir is not None else -1
    while trainer.step < cfg.schedule.train_iters:
        metrics = trainer.train_step()  # (before trainer.step is read: the step it logs is the one it ran)
        log.log(trainer.step, metrics)
        if interval and trainer.step % interval == 0:
            evaluate(trainer, log)
        if preemption.any_rank():
            if save_dir:
                save(trainer, save_dir)
            if dist.get_rank() == 0:
                log.write_line(trainer.step, "preempted", {"checkpoint": str(save_dir), "exit_code": EXIT_PREEMPTED})
            return EXIT_PREEMPTED
        if save_dir and cfg.checkpoint.save_interval and trainer.step % cfg.checkpoint.save_interval == 0:
            save(trainer, save_dir)
            saved_step = trainer.step
    if interval and trainer.step % interval:
        evaluate(trainer, log)
    if save_dir and saved_step != trainer.step:  # the final state is always saved
        save(trainer, save_dir)
    return 0


def train(cfg: Config) -> tuple[int, Trainer]:
    """Run training to `schedule.train_iters`. Returns the exit code (0, or EXIT_PREEMPTED after the
    preemption checkpoint) and the trainer."""
    trainer = build_trainer(cfg)
    resume_dir = find_resume(cfg)
    if resume_dir is not None:
        load_checkpoint(trainer, resume_dir, verify=cfg.checkpoint.verify)
    rank0 = dist.get_rank() == 0
    log = open_metrics(trainer, cfg, resume_dir)
    exit_code = run_steps(trainer, cfg, log, resume_dir, save_checkpoint, run_evaluation)
    if rank0:
        Path(cfg.logging.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.logging.output_dir) / "train_summary.json").write_text(
            json.dumps({"step": trainer.step, "exit_code": exit_code, "skipped_steps": trainer.skipped_steps}))
    log.close()
    return exit_code, trainer


def main(cfg: Config) -> None:
    code, _ = train(cfg)
    parallel.destroy()
    sys.exit(code)
