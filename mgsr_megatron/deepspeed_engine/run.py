"""`mgsr train` with `deepspeed.enabled` (or `--deepspeed ds.json`): set up, resume, loop, checkpoints,
preemption, export. The loop mirrors training/run.py: metrics (training/metrics.py), validation loss and
ROUGE-L / exact match on schedule.eval_prompts held-out prompts every schedule.eval_interval steps, a
checkpoint every checkpoint.save_interval steps and at the end, SIGTERM / SIGUSR1 -> checkpoint -> exit 115
(training/trainer.py PreemptionFlag), then `deepspeed.export_dir`.

Order of the checks: the config (config.validate, training/run.py check_generation_fits), the model
directories, tokenizer, vocabularies and teacher cache (settings.resolve_models), the batch layout, the
DeepSpeed JSON and a resume's compatibility (off_policy: its schedule files), then the process group, and only
then data and models.
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
    from mgsr_megatron.training.run import check_generation_fits

    validate(cfg)
    if not cfg.deepspeed.enabled:
        from mgsr_megatron.errors import UserError

        raise UserError("deepspeed.enabled is false: this is the deepspeed engine's entry point")
    check_generation_fits(cfg)  # generated rows fit seq_length; off_policy can generate at all
    runtime.check_fp16_support(cfg)
    tokenizer, _ = settings.resolve_models(cfg)
    dp = discover_env().world_size  # TP = PP = 1: every rank is a data-parallel rank
    check_batch_layout(cfg, dp, models=("teacher", "student") if cfg.loads_teacher else ("student",))
    settings.engine_config(cfg, dp)  # the JSON's dp-dependent fields
    resume_dir = check_resume(cfg, dp, tokenizer)
    runtime.init_distributed(cfg.parallel.distributed_timeout_minutes, cfg.parallel.rendezvous_timeout_seconds)
    data = TrainingData(cfg, dist.get_rank(), dp)
    return DeepSpeedTrainer(cfg, data), resume_dir


def run_evaluation(trainer, log: MetricsLogger) -> None:
    """The Megatron engine's evaluation (training/run.py run_evaluation): the validation loss, then ROUGE-L /
    exact match of the student on held-out prompts, generated through its HfCausalLM (ZeRO-3: lockstep)."""
    from mgsr_megatron.training.run import log_generation_metrics

    metrics = trainer.validation_loss()
    if metrics is not None:
        log.log(trainer.step, metrics, kind="valid")
    log_generation_metrics(trainer, trainer.generating_student, log)


def train(cfg: Config):
    """Train to schedule.train_iters (training/run.py run_steps, the loop both engines share). Returns
    (exit code: 0 or EXIT_PREEMPTED, trainer)."""
    from mgsr_megatron.deepspeed_engine.models import export_hf
    from mgsr_megatron.training.run import open_metrics, run_steps

    trainer, resume_dir = build_trainer(cfg)
    if resume_dir is not None:
        load_checkpoint(trainer, resume_dir, verify=cfg.checkpoint.verify)
    rank0 = dist.get_rank() == 0
    log = open_metrics(trainer, cfg, resume_dir)
    exit_code = run_steps(trainer, cfg, log, resume_dir, save_checkpoint, run_evaluation)
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
