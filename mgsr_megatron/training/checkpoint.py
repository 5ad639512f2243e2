"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    RUN/checkpoints/iter_0000100/
        model_config.yaml, model/     the student (models/checkpoint.py; loadable at any TP/PP)
        optimizer/                    the student's Megatron optimizer (`optimizer.sharded_state_dict`):
                                      Adam moments and, for bf16/fp16, fp32 main weights, stored like
                                      the parameters (so they reshard with them; the distributed
                                      optimizer's shards are gathered over DP into that form)
        common.pt                     the trainer's state (step, skipped and NaN steps, ClipNet and its
                                      optimizer, data position), AdamW step count, batch settings,
                                      optimizer kind + precision, layout (written by the ClipNet's owner rank)
        schedule_dp{d}.pt             data schedule and replay buffer of data-parallel replica d
        rng/rank{r}.pt                RNG states of global rank r (used when the layout is unchanged)
        provenance.json               iterations trained, the last step's loss, the tokenizer's hash
    RUN/checkpoints/latest            names the newest complete iteration directory; written last

The trainer's own state comes from `Trainer.state_dict()` and goes back through `Trainer.load_state_dict()`
(its keys are the file keys above: `schedule` is schedule_dp{d}.pt, `last_loss` provenance.json's
training.final_loss); the student and its Megatron optimizer are saved and loaded sharded here.

The directory is assembled under a temporary name and renamed into place, then `latest` is replaced
with an atomic rename, so a crash at any moment leaves the previous checkpoint intact and `latest`
pointing at it. Everything is loaded with `weights_only=True`; the dist checkpoints' `.metadata` with an
allow-list unpickler (models/trust.py), so no file of a checkpoint can run code. `manifest.json`
records size and SHA-256 of every file. Saving step N sets aside iterations >= N left by a rolled-back
run as `abandoned_iter_*`; pruning (keep_last) never removes the checkpoint just written.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mgsr_megatron.errors import UserError
from mgsr_megatron.models.checkpoint import (
    LATEST,
    _agree_on_failure,
    check_teacher_provenance,
    check_tokenizer_hash,
    load_model,
    provenance_of,
    read_provenance,
    resolve_checkpoint,
    save_model,
)
from mgsr_megatron.models.trust import (
    check_dist_checkpoint,
    describe_load_error,
    describe_save_error,
    load_errors,
    load_torch_file,
    safe_loading,
    verify_collective,
)

ITER_FORMAT = "iter_{:07d}"
SCHEDULE_FILE = "schedule_dp{}.pt"  # per data-parallel rank; both engines' checkpoints


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


# The distributed optimizer's state in its canonical per-parameter form (gathered over DP at save): each
# main weight and Adam moment is stored like its parameter, so it reshards across TP/PP/DP (megatron-core
# 0.16.1's torch_dist backend no longer writes the flattened fully_sharded_model_space format).
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _optimizer_sharded_state(optimizer, model, is_loading: bool):
    """Megatron's `optimizer.sharded_state_dict` (FP32Optimizer, Float16Optimizer: Adam moments and fp32
    main weights sharded like their parameters; DistributedOptimizer: the same, gathered over DP).
    The plain bf16/fp16 optimizer goes through `_float16_sharded_state` (see there)."""
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params

    if is_loading:
        _fill_empty_adam_state(optimizer)
    model_state = model.sharded_state_dict()
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(parts) == 1 and isinstance(parts[0], Float16OptimizerWithFloat16Params):
        return _float16_sharded_state(parts[0], model_state, is_loading)
    if any(isinstance(part, Float16OptimizerWithFloat16Params) for part in parts):
        raise NotImplementedError("checkpoints of a chain of several bf16/fp16 Megatron optimizers")
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=_SHARDING)


def _float16_sharded_state(part, model_state: dict, is_loading: bool) -> dict:
    """`Float16OptimizerWithFloat16Params.sharded_state_dict` of megatron-core 0.16.1, with the optimizer's
    parameter ids mapped onto the model's sharded parameters correctly.

    Megatron numbers the parameters of its id map over the 16-bit parameters only (`float16_groups`), but
    torch numbers the optimizer state over every parameter of every group, and the student keeps
    parameters in float32 next to its bf16/fp16 ones (the local spec's RMSNorm/LayerNorm weights and
    biases, which Megatron's own training casts with Float16Module): their ids (the no-decay group, after
    the 16-bit matrices) were in no map ("Param id 10 does not match any model sharded param"), and a
    group mixing both kinds would have paired the fp32 main weights with the wrong ids. Here every
    optimizer parameter (the fp32 main copy of a 16-bit parameter, or an fp32 parameter itself) is mapped
    to its model parameter in torch's order, and each group's main weights take the ids of their own
    positions. Same stored form as Megatron's: `optimizer.state.{exp_avg,exp_avg_sq}.<param key>` for
    every parameter, `optimizer.state.fp32_param.<param key>` for the 16-bit ones, one common step; it
    loads back through the class's own `load_state_dict`."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        part.init_state_fn(part.optimizer, part.config)  # moments to load into (Megatron does the same)
    state = part.state_dict()
    model_of_main = {id(main): param for params, mains in zip(part.float16_groups, part.fp32_from_float16_groups)
                     for param, main in zip(params, mains)}
    groups = part.optimizer.param_groups
    ordered = [model_of_main.get(id(p), p) for group in groups for p in group["params"]]
    id_map = get_param_id_to_sharded_param_map(model_state, ordered)
    saved_groups = state["optimizer"]["param_groups"]
    assert len(saved_groups) == len(groups) == len(state["fp32_from_fp16_params"])
    mains = [[make_sharded_optimizer_tensor(id_map[index], main, prefix="optimizer.state.fp32_param")
              for index, main in zip(saved["params"], group["params"]) if id(main) in model_of_main]
             for saved, group in zip(saved_groups, groups)]
    # by group number, groups without 16-bit parameters left out: dist_checkpointing keeps an empty list
    # in the common part and merges it back by position, with the wrong group (`_load_optimizer_state`
    # turns this back into Megatron's list)
    state["fp32_from_fp16_params"] = {number: group for number, group in enumerate(mains) if group}
    step = part._extract_common_per_param_step(state["optimizer"])
    optim_state_to_sharding_state(state["optimizer"], id_map, exclude_keys="step")
    if step:  # one step shared by all parameters, as Megatron stores it
        state["optimizer"]["state"]["common_step"] = step
    return state


def _load_optimizer_state(optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, with a workaround for megatron-core 0.16.1's distributed optimizer over
    torch's AdamW (no Transformer Engine / Apex, e.g. on CPU): its loader gives every parameter's state
    ONE shared `step` tensor (AdamW then increments it once per parameter) and then fails copying the
    per-parameter state because `step` is not among the checkpoint's tensors. The parameter state is
    loaded with `step` set aside, and every parameter gets its own copy of it. The plain bf16/fp16
    optimizer's fp32 main weights come back in `_float16_sharded_state`'s form and go in as Megatron's."""
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    part = parts[0]
    if len(parts) == 1 and isinstance(part, Float16OptimizerWithFloat16Params):
        mains = state["fp32_from_fp16_params"]  # `_float16_sharded_state`'s form: {group number: [...]}
        state["fp32_from_fp16_params"] = [mains.get(number, []) for number in range(len(part.float16_groups))]
    if len(parts) != 1 or not isinstance(part, DistributedOptimizer) or \
            not isinstance(part.optimizer, torch.optim.AdamW) or \
            state.get("param_state_sharding_type") != _SHARDING["distrib_optim_sharding_type"]:
        optimizer.load_state_dict(state)
        return
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    part.load_state_dict(state)  # param groups, step, grad scaler
    steps = {p: s.pop("step") for p, s in part.optimizer.state.items() if "step" in s}
    try:
        part.load_parameter_state_from_fully_reshardable(param_state)
    finally:
        for p, step in steps.items():
            part.optimizer.state[p]["step"] = step.detach().clone()


def _fill_empty_adam_state(optimizer) -> None:
    """A fresh torch AdamW has no state yet; the distributed optimizer's state_dict needs one `step` per
    parameter. Zero tensors of the local shapes (what Megatron's own dummy step would leave, without
    touching the weights); the checkpoint overwrites them."""
    from megatron.core.optimizer import DistributedOptimizer

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = part.optimizer
        if not isinstance(part, DistributedOptimizer) or inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def optimizer_kind(cfg) -> dict:
    """What the optimizer state of a run depends on; a resume must match it (checked before building)."""
    return {"distributed": bool(cfg.optimizer.use_distributed_optimizer),
            "params_dtype": cfg.student.params_dtype}


def _check_optimizer_kind(cfg, directory: Path, common: dict) -> None:
    """The optimizer state's layout depends on the optimizer kind and the student's precision (fp32 main
    weights exist only for bf16/fp16): a resume must keep both. Checkpoints written before the field
    existed hold plain AdamW state of their own precision."""
    saved = common.get("optimizer_kind") or {"distributed": False, "params_dtype": None}
    wanted = optimizer_kind(cfg)
    if saved["distributed"] != wanted["distributed"]:
        raise UserError(f"{directory}: the run used optimizer.use_distributed_optimizer={saved['distributed']}, "
                        f"this run has {wanted['distributed']}; the optimizer state cannot be converted "
                        f"(keep the setting, or start a new run from the weights with student.load)")
    if saved["params_dtype"] is not None and saved["params_dtype"] != wanted["params_dtype"]:
        raise UserError(f"{directory}: the run trained student.params_dtype={saved['params_dtype']}, this run has "
                        f"{wanted['params_dtype']}; the optimizer state cannot be converted (keep the "
                        f"precision, or start a new run from the weights with student.load)")


def _check_global_batch(cfg, directory: Path, common: dict) -> None:
    saved = common.get("global_batch_size")
    if saved is not None and saved != cfg.schedule.global_batch_size:
        raise UserError(f"{directory}: the run used schedule.global_batch_size={saved}, this run has "
                        f"{cfg.schedule.global_batch_size}; resuming would change the data order and the "
                        f"optimisation (start a new run, or keep the global batch size)")


def check_resume_optimizer(cfg) -> None:
    """Before any model is built (the teacher included): a resume (checkpoint.resume) whose global batch
    size, optimizer kind or precision changed is refused with one line. A missing/unreadable checkpoint
    is left to the loader's own errors."""
    directory = find_resume(cfg)
    if directory is None or not (directory / "common.pt").is_file():
        return
    try:
        common = _load_file(directory / "common.pt")
    except UserError:
        return  # the loader reports damaged files with their own checks
    _check_global_batch(cfg, directory, common)
    _check_optimizer_kind(cfg, directory, common)


def check_checkpoint_origins(cfg, tokenizer, uses_teacher: bool) -> None:
    """Before any model is built: every checkpoint the run loads (teacher, student, resume) was trained
    with `tokenizer` (when it records a hash), and the teacher records training or an import."""
    if uses_teacher and cfg.teacher.load:
        check_teacher_provenance(cfg.teacher.load, cfg.teacher.allow_untrained)
        check_tokenizer_hash(cfg.teacher.load, tokenizer, "teacher.load")
    if cfg.student.load:
        check_tokenizer_hash(cfg.student.load, tokenizer, "student.load")
    resume = find_resume(cfg)
    if resume is not None:
        check_tokenizer_hash(resume, tokenizer, "resume")


def _training_provenance(trainer, state: dict) -> dict:
    """What this checkpoint's weights went through: steps, the last step's loss (from the trainer's
    `state`), the tokenizer."""
    loss = state.get("last_loss")
    final_loss = float(loss) if loss is not None and math.isfinite(loss) else None
    return provenance_of(getattr(trainer.data, "tokenizer", None),
                         training={"iterations": int(state["step"]), "final_loss": final_loss})


def _adam_step(optimizer) -> float:
    """Adam's step count (for the record; the optimizer state carries it). `optimizer` is Megatron's
    (possibly chained) optimizer around torch AdamW instances."""
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer]) if o.optimizer is not None]
    steps = {float(s["step"]) for o in inner for s in o.state.values() if "step" in s}
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
    state = trainer.state_dict()
    final = root / ITER_FORMAT.format(state["step"])

    def write_state(tmp: Path) -> None:
        if rank == 0:
            (tmp / "optimizer").mkdir()
            (tmp / "rng").mkdir()
        dist.barrier()
        dist_checkpointing.save(_optimizer_sharded_state(trainer.optimizer, trainer.student, False),
                                str(tmp / "optimizer"))
        torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
        if state["schedule"] is not None and parallel_state.get_tensor_model_parallel_rank() == 0 \
                and parallel_state.is_pipeline_first_stage():
            torch.save(state["schedule"], tmp / SCHEDULE_FILE.format(parallel_state.get_data_parallel_rank()))
        if rank == _owner_rank():
            torch.save({**{key: state[key] for key in TRAINER_COMMON_KEYS},
                        "adam_step": _adam_step(trainer.optimizer),
                        "global_batch_size": trainer.cfg.schedule.global_batch_size,
                        "optimizer_kind": optimizer_kind(trainer.cfg),
                        "micro_batch_size": trainer.cfg.schedule.micro_batch_size,
                        "layout": _layout()}, tmp / "common.pt")

    check_save_target(trainer.cfg, root)
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _set_aside_abandoned(root, state["step"])
        except OSError as exc:
            error = exc
    error = _agree_on_failure(error)
    if error is not None:
        cause = error if isinstance(error, str) else describe_save_error(error)
        raise UserError(f"saving checkpoint {final} failed: {cause}") from None
    save_model(trainer.student, final, trainer.cfg.student, write_extra=write_state,
               provenance=_training_provenance(trainer, state))
    if rank == 0:
        try:
            _write_latest(root, final.name)
        except OSError as exc:
            error = exc
        if error is None:
            prune_checkpoints(root, trainer.cfg.checkpoint.keep_last, keep=final.name)
    error = _agree_on_failure(error)
    if error is not None:
        raise UserError(f"{root / LATEST}: could not be updated to {final.name} "
                        f"({describe_save_error(error) if not isinstance(error, str) else error}); "
                        f"the checkpoint itself is complete") from None
    dist.barrier()
    return final


def check_save_target(cfg, root: str | Path | None = None) -> None:
    """checkpoint.save may not equal, contain or lie inside teacher.load / student.load."""
    root = Path(root if root is not None else cfg.checkpoint.save).resolve()
    for name in ("teacher", "student"):
        load = getattr(cfg, name).load
        if not load:
            continue
        source = Path(load).resolve()
        if root == source or source.is_relative_to(root) or root.is_relative_to(source):
            raise UserError(f"checkpoint.save={cfg.checkpoint.save} overlaps {name}.load={load}: saving there "
                            f"would overwrite or mix with the {name}'s checkpoint; choose another directory")


ABANDONED_PREFIX = "abandoned_"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("iter_") or not name[5:].isdigit():
        return None
    return int(name[5:])


def _set_aside_abandoned(root: Path, step: int) -> None:
    """Iterations at or after the step being saved belong to a run that was rolled back (or to an
    earlier run in the same directory): rename them `abandoned_iter_NNNNNNN` instead of mixing them in."""
    for path in sorted(root.glob("iter_*")):
        number = _step_of(path)
        if number is None or number < step or not path.is_dir():
            continue
        target = root / f"{ABANDONED_PREFIX}{path.name}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = root / f"{ABANDONED_PREFIX}{path.name}.{suffix}"
        path.rename(target)
        print(f"checkpoint: {path} is later than the step being saved ({step}); set aside as {target.name}",
              flush=True)
    latest = root / LATEST
    if latest.is_file() and not (root / latest.read_text().strip()).is_dir():
        remaining = sorted((p for p in root.glob("iter_*") if p.is_dir() and _step_of(p) is not None), key=_step_of)
        if remaining:  # until the new checkpoint is complete, `latest` names the newest one kept
            _write_latest(root, remaining[-1].name)
        else:
            latest.unlink()


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    try:
        with open(tmp, "w") as stream:
            stream.write(name + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, root / LATEST)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def prune_checkpoints(root: Path, keep_last: int, keep: str | None = None) -> None:
    """Delete all but the newest `keep_last` iteration directories (by step number); never `keep`
    (the checkpoint just written) nor the one `latest` names."""
    if keep_last <= 0:
        return
    protected = {keep}
    if (root / LATEST).is_file():
        protected.add((root / LATEST).read_text().strip())
    iterations = sorted((p for p in root.glob("iter_*") if p.is_dir() and _step_of(p) is not None), key=_step_of)
    for old in iterations[:-keep_last]:
        if old.name not in protected:
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
    """weights_only=True (no code runs); a missing, damaged or code-carrying file is one line naming it."""
    state = load_torch_file(path)
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a checkpoint state file (holds a {type(state).__name__})")
    return state


COMMON_KEYS = ("step", "adam_step", "clipnet", "clipnet_optimizer", "data", "global_batch_size", "layout")
# the keys of Trainer.state_dict() that common.pt holds (skipped_steps and nan_steps_in_row may be missing
# from older checkpoints: the trainer then starts them at 0)
TRAINER_COMMON_KEYS = ("step", "clipnet", "clipnet_optimizer", "data", "skipped_steps", "nan_steps_in_row")


def load_checkpoint(trainer, directory: str | Path, verify: bool = False) -> None:
    """Collective. Restores student, optimizers, ClipNet, data position, schedule, RNG (same layout).

    Every file is checked against the checkpoint's manifest first (sizes; SHA-256 too with `verify`)."""
    from megatron.core import dist_checkpointing, parallel_state

    directory = resolve_checkpoint(directory)
    verify_collective(directory, hashes=verify, required=verify)
    common = _load_file(directory / "common.pt")
    missing = [key for key in COMMON_KEYS if key not in common]
    if missing:
        raise UserError(f"{directory / 'common.pt'}: not a training state (no {', '.join(missing)})")
    _check_global_batch(trainer.cfg, directory, common)  # checked before the teacher loads, again here
    _check_optimizer_kind(trainer.cfg, directory, common)
    load_model(trainer.student, directory)
    if not (directory / "optimizer" / "metadata.json").is_file():
        raise UserError(f"{directory}: optimizer/metadata.json missing (incomplete checkpoint)")
    check_dist_checkpoint(directory / "optimizer")
    sharded = _optimizer_sharded_state(trainer.optimizer, trainer.student, True)
    try:
        with safe_loading():
            state = dist_checkpointing.load(sharded, str(directory / "optimizer"))
    except UserError:
        raise
    except load_errors() as exc:  # noqa: BLE001 - damaged optimizer state: one line naming it
        raise describe_load_error(directory / "optimizer", exc) from exc
    _load_optimizer_state(trainer.optimizer, state)
    trainer_state = {key: common[key] for key in TRAINER_COMMON_KEYS if key in common}
    trainer_state["last_loss"] = (read_provenance(directory).get("training") or {}).get("final_loss")
    schedule_file = directory / SCHEDULE_FILE.format(parallel_state.get_data_parallel_rank())
    if schedule_file.is_file():
        trainer_state["schedule"] = _load_file(schedule_file)
    trainer.load_state_dict(trainer_state)
    if common["layout"] == _layout():
        _set_rng_state(_load_file(directory / "rng" / f"rank{dist.get_rank()}.pt"))
    dist.barrier()
