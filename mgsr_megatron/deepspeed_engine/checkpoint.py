"""Checkpoints of the DeepSpeed engine: DeepSpeed's own state plus the project's, written atomically.

    RUN/checkpoints/iter_0000100/
        engine/               DeepSpeed's `save_checkpoint` (tag "engine"): the student's weights and the
                              ZeRO-partitioned optimizer state (fp32 master weights, Adam moments), one
                              file per rank, as DeepSpeed lays them out for this ZeRO stage
        zero_to_fp32.py       DeepSpeed's recovery script (copied by DeepSpeed; never run by this project)
        common.pt             step, ClipNet and its AdamW, data position, skipped steps, batch settings
        rng/rank{r}.pt        RNG states of global rank r (python, torch CPU, CUDA)
        schedule_dp{d}.pt     data schedule of data-parallel rank d (= global rank): threshold, previous
                              validation loss, off_policy's replay buffer (the Megatron engine's file)
        engine.json           {"engine": "deepspeed", zero_stage, dp, params_dtype, global_batch_size}
        model_config.yaml     the student's architecture (its config.json as the project reads it)
        hf_config.json        the student's config.json
        provenance.json       iterations trained, the last step's loss, the tokenizer's hash
        manifest.json         size and SHA-256 of every file (models/trust.py)
    RUN/checkpoints/latest    the newest complete iteration directory; written last

As with the Megatron engine (training/checkpoint.py): the directory is assembled under a temporary name
and renamed into place, then `latest` is replaced atomically, so a crash leaves the previous checkpoint
intact and `latest` pointing at it; pruning (checkpoint.keep_last) never removes the checkpoint just
written. Loading checks sizes (hashes with --verify-checkpoint) and reads every file with
`weights_only=True`: DeepSpeed's optimizer files hold DeepSpeed classes (its ZeRO stage enum, loss scaler -
fp16's dynamic one keeps the current scale, so a resume continues with it - and fragment address), which are
allow-listed for its load; nothing else can run code. A resume
needs the same ZeRO stage, DP size, precision and global batch size (DeepSpeed's partitioned optimizer
state is laid out for them); each is checked, one line, before any model loads, and so is, for an off_policy
run, every rank's schedule_dp{d}.pt (a checkpoint without it would resume with an empty replay buffer).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mgsr_megatron import platform
from mgsr_megatron.errors import UserError
from mgsr_megatron.models.checkpoint import (
    LATEST,
    provenance_of,
    read_provenance,
    replace_directory,
    resolve_checkpoint,
    write_model_config,
    write_provenance,
)
from mgsr_megatron.models.trust import describe_save_error, load_torch_file, safe_loading, verify_collective
from mgsr_megatron.training.checkpoint import (
    ITER_FORMAT,
    SCHEDULE_FILE,
    check_save_target,
    find_resume,
    prune_checkpoints,
)

ENGINE_TAG = "engine"
ENGINE_FILE = "engine.json"
COMMON_KEYS = ("step", "clipnet", "clipnet_optimizer", "data", "global_batch_size")


def engine_record(cfg, dp: int) -> dict:
    return {"engine": "deepspeed", "zero_stage": cfg.deepspeed.zero_stage, "dp": dp,
            "params_dtype": cfg.student.params_dtype, "global_batch_size": cfg.schedule.global_batch_size}


def _agree(error) -> str | None:
    """Every rank learns the first rank's failure (all raise together instead of some hanging)."""
    text = None if error is None else (error if isinstance(error, str) else describe_save_error(error))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, text)
    failures = [g for g in gathered if g]
    return failures[0] if failures else None


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w") as stream:
        stream.write(name + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, root / LATEST)


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "device": platform.device_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    platform.set_device_rng_state(state.get("device"))


def save_checkpoint(trainer, root: str | Path) -> Path:
    """Collective. Returns the final iteration directory."""
    from mgsr_megatron.models.trust import write_manifest

    cfg = trainer.cfg
    root = Path(root)
    rank = dist.get_rank()
    final = root / ITER_FORMAT.format(trainer.step)
    temporary = root / f".{final.name}.tmp"
    check_save_target(cfg, root)
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
            (temporary / "rng").mkdir(parents=True)
        except OSError as exc:
            error = exc
    error = _agree(error)
    if error is None:
        try:
            trainer.engine.save_checkpoint(str(temporary), tag=ENGINE_TAG, save_latest=False)
            torch.save(_rng_state(), temporary / "rng" / f"rank{rank}.pt")
            if trainer.schedule is not None:
                torch.save(trainer.schedule.state_dict(), temporary / SCHEDULE_FILE.format(trainer.dp_rank))
            if rank == 0:
                loss = trainer.last_loss
                torch.save({"step": trainer.step, "clipnet": trainer.clipnet.state_dict(),
                            "clipnet_optimizer": trainer.clipnet_optimizer.state_dict(),
                            "data": trainer.data.state_dict(), "skipped_steps": trainer.skipped_steps,
                            "global_batch_size": cfg.schedule.global_batch_size,
                            "micro_batch_size": cfg.schedule.micro_batch_size}, temporary / "common.pt")
                (temporary / ENGINE_FILE).write_text(json.dumps(engine_record(cfg, trainer.dp_size)) + "\n")
                write_model_config(temporary, cfg.student)
                shutil.copyfile(Path(cfg.student.load) / "config.json", temporary / "hf_config.json")
                write_provenance(temporary, provenance_of(
                    getattr(trainer.data, "tokenizer", None),
                    training={"iterations": int(trainer.step),
                              "final_loss": float(loss) if loss is not None and loss == loss else None}))
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = exc
        error = _agree(error)
    if error is None and rank == 0:
        try:
            write_manifest(temporary)
            replace_directory(temporary, final)
            _write_latest(root, final.name)
            prune_checkpoints(root, cfg.checkpoint.keep_last, keep=final.name)
        except OSError as exc:
            error = exc
    error = _agree(error)
    if error is not None:
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        dist.barrier()
        raise UserError(f"saving checkpoint {final} failed: {error}; the partial directory was removed and "
                        f"earlier checkpoints are unchanged")
    dist.barrier()
    return final


def _read_engine_record(directory: Path) -> dict:
    path = directory / ENGINE_FILE
    if not path.is_file():
        raise UserError(f"{directory}: not a checkpoint of the deepspeed engine (no {ENGINE_FILE}; the Megatron "
                        f"engine writes model/ and optimizer/): resume it with the Megatron engine, or start a "
                        f"new run from exported Hugging Face weights")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON (damaged checkpoint)") from None
    return record


def check_resume(cfg, dp: int, tokenizer=None) -> Path | None:
    """Before any model loads: the checkpoint a resume would read (None without one), which must be the
    deepspeed engine's, with this run's ZeRO stage, DP size, precision, global batch and tokenizer."""
    from mgsr_megatron.models.checkpoint import check_tokenizer_hash

    directory = find_resume(cfg)
    if directory is None:
        return None
    record = _read_engine_record(directory)
    wanted = engine_record(cfg, dp)
    names = {"zero_stage": "deepspeed.zero_stage", "dp": "the data-parallel size (world size)",
             "params_dtype": "student.params_dtype", "global_batch_size": "schedule.global_batch_size"}
    for key, name in names.items():
        if record.get(key) != wanted[key]:
            raise UserError(f"{directory}: the run used {name}={record.get(key)}, this run has {wanted[key]}; "
                            f"DeepSpeed's partitioned optimizer state cannot be carried over (keep the setting, or "
                            f"start a new run from the exported weights)")
    check_tokenizer_hash(directory, tokenizer, "resume")
    check_schedule_files(cfg, directory, dp)
    return directory


def check_schedule_files(cfg, directory: Path, dp: int) -> None:
    """An off_policy run resumes only with every rank's schedule state (other schedules keep nothing needed)."""
    if cfg.mgsr.data_schedule != "off_policy" or not cfg.needs_teacher:
        return
    for d in range(dp):
        path = directory / SCHEDULE_FILE.format(d)
        if not path.is_file():
            raise UserError(f"{path}: missing, so the off_policy schedule's replay buffer and threshold cannot be "
                            f"restored (a checkpoint of another schedule or an older version); resume it with the "
                            f"schedule it was trained with, or start a new run")


@contextlib.contextmanager
def _deepspeed_loading():
    """torch.load with weights_only=True (models/trust.py) and DeepSpeed's checkpoint classes allowed (its loss
    scaler: static, or fp16's dynamic one with its current scale)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    with safe_loading(), torch.serialization.safe_globals(allowed):
        yield


def load_checkpoint(trainer, directory: str | Path, verify: bool = False) -> None:
    """Collective. Restores the student and its optimizer (DeepSpeed), ClipNet, data position, step, data
    schedule, RNG."""
    directory = resolve_checkpoint(directory)
    _read_engine_record(directory)
    verify_collective(directory, hashes=verify, required=verify)
    check_schedule_files(trainer.cfg, directory, trainer.dp_size)  # every rank sees the same files: all raise
    common = load_torch_file(directory / "common.pt")
    missing = [key for key in COMMON_KEYS if not isinstance(common, dict) or key not in common]
    if missing:
        raise UserError(f"{directory / 'common.pt'}: not a training state (no {', '.join(missing)})")
    try:
        with _deepspeed_loading():
            path, _ = trainer.engine.load_checkpoint(str(directory), tag=ENGINE_TAG, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False, load_module_strict=True)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged or foreign files: one line naming the checkpoint
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"{directory / ENGINE_TAG}: DeepSpeed could not load the checkpoint ({first})") from None
    if path is None:
        raise UserError(f"{directory / ENGINE_TAG}: DeepSpeed found no checkpoint there (incomplete checkpoint)")
    trainer.clipnet.load_state_dict(common["clipnet"])
    trainer.clipnet_optimizer.load_state_dict(common["clipnet_optimizer"])
    trainer.data.load_state_dict(common["data"])
    trainer.step = int(common["step"])
    trainer.skipped_steps = int(common.get("skipped_steps", 0))
    schedule_file = directory / SCHEDULE_FILE.format(trainer.dp_rank)
    if trainer.schedule is not None and schedule_file.is_file():
        trainer.schedule.load_state_dict(load_torch_file(schedule_file))
    trainer.last_loss = (read_provenance(directory).get("training") or {}).get("final_loss")
    _set_rng_state(load_torch_file(directory / "rng" / f"rank{dist.get_rank()}.pt"))
    dist.barrier()
