"""`mgsr train` with `deepspeed.enabled` (or `--deepspeed ds.json`): set up, resume, loop, checkpoints,
preemption, export. The loop mirrors training/run.py: metrics (training/metrics.py), validation loss every
schedule.eval_interval steps, a checkpoint every checkpoint.save_interval steps and at the end, SIGTERM /
SIGUSR1 -> checkpoint -> exit 115 (training/trainer.py PreemptionFlag), then `deepspeed.export_dir`.

Order of the checks: the config (config.validate), the model directories, tokenizer and vocabularies
(settings.resolve_models), the batch layout, the DeepSpeed JSON and a resume's compatibility, then the
process group, and only then data and models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from mgsr_megatron.config import Config, check_batch_layout, validate
from mgsr_megatron.deepspeed_engine import runtime, settings
from mgsr_megatron.deepspeed_engine.checkpoint import check_resume, load_checkpoint, save_checkpoint
from mgsr_megatron.training.metrics import MetricsLogger


def build_trainer(cfg: Config):
    """(trainer, resume directory or None). Everything that can fail on bad input fails before models load."""
    from mgsr_megatron.deepspeed_engine.engine import DeepSpeedTrainer
    from mgsr_megatron.parallel import discover_env
    from mgsr_megatron.training.data import TrainingData

    validate(cfg)
    if not cfg.deepspeed.enabled:
        from mgsr_megatron.errors import UserError

        raise UserError("deepspeed.enabled is false: this is the deepspeed engine's entry point")
    tokenizer, _ = settings.resolve_models(cfg)
    dp = discover_env().world_size  # TP = PP = 1: every rank is a data-parallel rank
    check_batch_layout(cfg, dp, models=("teacher", "student") if cfg.needs_teacher else ("student",))
    settings.engine_config(cfg, dp)  # the JSON's dp-dependent fields
    resume_dir = check_resume(cfg, dp, tokenizer)
    runtime.init_distributed(cfg.parallel.distributed_timeout_minutes, cfg.parallel.rendezvous_timeout_seconds)
    data = TrainingData(cfg, dist.get_rank(), dp)
    return DeepSpeedTrainer(cfg, data), resume_dir


def run_validation(trainer, log: MetricsLogger) -> None:
    metrics = trainer.validation_loss()
    if metrics is not None:
        log.log(trainer.step, metrics, kind="valid")


def train(cfg: Config, on_step=None):
    """Train to schedule.train_iters. Returns (exit code: 0 or EXIT_PREEMPTED, trainer). `on_step(trainer)`
    runs after every step (tests use it to raise a signal)."""
    from mgsr_megatron.deepspeed_engine.models import export_hf
    from mgsr_megatron.training.trainer import EXIT_PREEMPTED, PreemptionFlag

    trainer, resume_dir = build_trainer(cfg)
    if resume_dir is not None:
        load_checkpoint(trainer, resume_dir, verify=cfg.checkpoint.verify)
    rank0 = dist.get_rank() == 0
    log = MetricsLogger(cfg.logging.output_dir, cfg.schedule.train_iters, cfg.logging.log_interval, rank0,
                        cfg.logging.tensorboard, cfg.logging.progress_bar, start_step=trainer.step)
    if rank0 and resume_dir is not None:
        log.write_line(trainer.step, "resume", {"from": str(resume_dir)})
    if rank0 and cfg.schedule.eval_interval and cfg.schedule.eval_prompts:
        log.write_line(trainer.step, "note", {"eval": "generation (ROUGE-L) is not implemented in the deepspeed "
                                                      "engine yet: validation loss only"})
    preemption = PreemptionFlag()
    save_dir = cfg.checkpoint.save
    exit_code = 0
    saved_step = trainer.step if resume_dir is not None else -1
    interval = cfg.schedule.eval_interval
    while trainer.step < cfg.schedule.train_iters:
        metrics = trainer.train_step()
        log.log(trainer.step, metrics)
        if on_step is not None:
            on_step(trainer)
        if interval and trainer.step % interval == 0:
            run_validation(trainer, log)
        if preemption.any_rank():
            if save_dir:
                save_checkpoint(trainer, save_dir)
                saved_step = trainer.step
            if rank0:
                log.write_line(trainer.step, "preempted", {"checkpoint": str(save_dir), "exit_code": EXIT_PREEMPTED})
            exit_code = EXIT_PREEMPTED
            break
        if save_dir and cfg.checkpoint.save_interval and trainer.step % cfg.checkpoint.save_interval == 0:
            save_checkpoint(trainer, save_dir)
            saved_step = trainer.step
    if interval and exit_code == 0 and trainer.step % interval:
        run_validation(trainer, log)
    if save_dir and saved_step != trainer.step:  # the final state is always saved
        save_checkpoint(trainer, save_dir)
    if exit_code == 0 and cfg.deepspeed.export_dir:
        out = export_hf(trainer.student, cfg.student.load, cfg.deepspeed.export_dir)
        if rank0:
            log.write_line(trainer.step, "export", {"hf_dir": str(out)})
    if rank0:
        Path(cfg.logging.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.logging.output_dir) / "train_summary.json").write_text(json.dumps(
            {"step": trainer.step, "exit_code": exit_code, "skipped_steps": trainer.skipped_steps,
             "engine": "deepspeed", "zero_stage": cfg.deepspeed.zero_stage}))
    log.close()
    return exit_code, trainer


def main(cfg: Config) -> None:
    code, _ = train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
