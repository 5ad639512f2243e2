"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    RUN/checkpoints/iter_0000100/
        model_config.yaml, model/     the student (models/checkpoint.py; loadable at any TP/PP)
        optimizer/                    the student's AdamW moments, dist_checkpointing, sharded like the
                                      parameters (so they reshard with them)
        common.pt                     step, AdamW step count, ClipNet and its optimizer, data position,
                                      batch settings, layout (written by the ClipNet's owner rank)
        schedule_dp{d}.pt             data schedule and replay buffer of data-parallel replica d
        rng/rank{r}.pt                RNG states of global rank r (used when the layout is unchanged)
    RUN/checkpoints/latest            names the newest complete iteration directory; written last

The directory is assembled under a temporary name and renamed into place, then `latest` is replaced
with an atomic rename, so a crash at any moment leaves the previous checkpoint intact and `latest`
pointing at it. Everything is loaded with `weights_only=True`.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mgsr_megatron.errors import UserError
from mgsr_megatron.models.checkpoint import LATEST, load_model, resolve_checkpoint, save_model

ITER_FORMAT = "iter_{:07d}"


def _owner_rank() -> int:
    """The rank holding the trained ClipNet: TP rank 0, DP rank 0 of the last pipeline stage."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_last_rank() if \
        parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0 \
        else -1


def _layout() -> dict:
    from megatron.core import parallel_state

    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def _optimizer_sharded_state(optimizer, model, is_loading: bool):
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if is_loading:  # the loader fills tensors of the local shapes
        for p in params:
            optimizer.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    state = optimizer.state_dict()
    id_map = get_param_id_to_sharded_param_map(model.sharded_state_dict(), params)
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    return state


def _adam_step(optimizer) -> float:
    steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    return steps.pop() if steps else 0.0


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "tracker": {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(trainer, root: str | Path) -> Path:
    """Collective. Returns the final iteration directory."""
    from megatron.core import dist_checkpointing, parallel_state

    root = Path(root)
    rank = dist.get_rank()
    final = root / ITER_FORMAT.format(trainer.step)

    def write_state(tmp: Path) -> None:
        if rank == 0:
            (tmp / "optimizer").mkdir()
            (tmp / "rng").mkdir()
        dist.barrier()
        dist_checkpointing.save(_optimizer_sharded_state(trainer.optimizer, trainer.student, False),
                                str(tmp / "optimizer"))
        torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
        if trainer.schedule is not None and parallel_state.get_tensor_model_parallel_rank() == 0 \
                and parallel_state.is_pipeline_first_stage():
            torch.save(trainer.schedule.state_dict(),
                       tmp / f"schedule_dp{parallel_state.get_data_parallel_rank()}.pt")
        if rank == _owner_rank():
            torch.save({"step": trainer.step, "adam_step": _adam_step(trainer.optimizer),
                        "clipnet": trainer.clipnet.state_dict(),
                        "clipnet_optimizer": trainer.clipnet_optimizer.state_dict(),
                        "data": trainer.data.state_dict(), "skipped_steps": trainer.skipped_steps,
                        "global_batch_size": trainer.cfg.schedule.global_batch_size,
                        "micro_batch_size": trainer.cfg.schedule.micro_batch_size,
                        "layout": _layout()}, tmp / "common.pt")

    root.mkdir(parents=True, exist_ok=True)
    save_model(trainer.student, final, trainer.cfg.student, write_extra=write_state)
    if rank == 0:
        _write_latest(root, final.name)
        _prune(root, trainer.cfg.checkpoint.keep_last)
    dist.barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w") as stream:
        stream.write(name + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    iterations = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in iterations[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(cfg) -> Path | None:
    """`checkpoint.resume`: none | auto (the `latest` of checkpoint.save, if any) | a directory."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        if not cfg.checkpoint.save or not (Path(cfg.checkpoint.save) / LATEST).is_file():
            return None
        return resolve_checkpoint(cfg.checkpoint.save)
    return resolve_checkpoint(resume)


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file: one clear line
        raise UserError(f"{path}: cannot be read as a checkpoint file ({type(exc).__name__})") from None


def load_checkpoint(trainer, directory: str | Path) -> None:
    """Collective. Restores student, optimizers, ClipNet, data position, schedule, RNG (same layout)."""
    from megatron.core import dist_checkpointing, parallel_state

    directory = resolve_checkpoint(directory)
    common = _load_file(directory / "common.pt")
    sched = trainer.cfg.schedule
    if common["global_batch_size"] != sched.global_batch_size:
        raise UserError(f"{directory}: the run used schedule.global_batch_size={common['global_batch_size']}, "
                        f"this run has {sched.global_batch_size}; resuming would change the data order and "
                        f"the optimisation (start a new run, or keep the global batch size)")
    load_model(trainer.student, directory)
    if not (directory / "optimizer" / "metadata.json").is_file():
        raise UserError(f"{directory}: optimizer/metadata.json missing (incomplete checkpoint)")
    sharded = _optimizer_sharded_state(trainer.optimizer, trainer.student, True)
    state = dist_checkpointing.load(sharded, str(directory / "optimizer"))
    for param_state in state["state"].values():
        param_state["step"] = torch.tensor(common["adam_step"])
    trainer.optimizer.load_state_dict(state)
    trainer.clipnet.load_state_dict(common["clipnet"])
    trainer.clipnet_optimizer.load_state_dict(common["clipnet_optimizer"])
    trainer.data.load_state_dict(common["data"])
    trainer.step = int(common["step"])
    trainer.skipped_steps = int(common.get("skipped_steps", 0))
    schedule_file = directory / f"schedule_dp{parallel_state.get_data_parallel_rank()}.pt"
    if trainer.schedule is not None and schedule_file.is_file():
        trainer.schedule.load_state_dict(_load_file(schedule_file))
    if common["layout"] == _layout():
        _set_rng_state(_load_file(directory / "rng" / f"rank{dist.get_rank()}.pt"))
    dist.barrier()
