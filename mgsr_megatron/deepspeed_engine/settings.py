"""Everything the DeepSpeed engine checks before a process group or a model exists.

* `validate_settings(cfg)`: the `deepspeed` section against the rest of the config (called by
  `config.validate` when `deepspeed.enabled`); one-line UserErrors naming the key.
* `read_config_json(cfg)`: a user's DeepSpeed JSON (`deepspeed.config_json`, `mgsr train --deepspeed
  ds.json`): batch sizes, precision, ZeRO stage, offload and clipping must agree with the project's config;
  "auto" takes the project's value; optimizer / scheduler sections are refused (the project builds both).
* `inspect_model_dir(path, key)`: a Hugging Face model directory (config.json + safetensors or .bin
  weights), its architecture (the ones the converter supports) and vocabulary; nothing is loaded.
* `resolve_models(cfg)`: both directories, the tokenizer, the vocabulary and teacher cache checks; fills
  cfg.student / cfg.teacher from the HF configs (so data and batch checks see the real models).
* `engine_config(cfg, dp)`: the DeepSpeed config dict of the student (and `teacher_config` of a ZeRO-3
  teacher).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from mgsr_megatron.errors import UserError

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def validate_settings(cfg) -> None:
    """The DeepSpeed engine's settings (no files but the JSON, no processes). Raises UserError."""
    from mgsr_megatron.config import check_apart_from_models

    ds = cfg.deepspeed
    _check(cfg.parallel.tensor_model_parallel_size == 1 and cfg.parallel.pipeline_model_parallel_size == 1,
           f"the deepspeed engine is data-parallel only: parallel.tensor_model_parallel_size="
           f"{cfg.parallel.tensor_model_parallel_size} and parallel.pipeline_model_parallel_size="
           f"{cfg.parallel.pipeline_model_parallel_size} must be 1 (ZeRO shards over the data-parallel ranks)")
    _check(not ds.offload_params or ds.zero_stage == 3,
           f"deepspeed.offload_params=true needs deepspeed.zero_stage=3 (got {ds.zero_stage}): only ZeRO-3 "
           f"partitions the parameters")
    _check(not ds.cpu_adam or ds.offload_optimizer,
           "deepspeed.cpu_adam=true is DeepSpeed's optimizer for offloaded states: it needs "
           "deepspeed.offload_optimizer=true")
    for name in ("student", "teacher"):
        model = getattr(cfg, name)
        if name == "teacher" and not cfg.loads_teacher:  # teacher.cache on ground truth: never read
            continue
        _check(bool(model.load), f"{name}.load is not set: the deepspeed engine trains Hugging Face models "
                                 f"({name}.load: a directory with config.json and safetensors weights)")
        _check(model.params_dtype in DTYPES,
               f"{name}.params_dtype={model.params_dtype} is not supported by the deepspeed engine (float32, or "
               f"bfloat16 / float16 with fp32 master weights)")
        _check(model.recompute_granularity is None,
               f"{name}.recompute_granularity={model.recompute_granularity}: activation recomputation is not "
               f"wired to Hugging Face models under the deepspeed engine yet; leave it unset")
    _check(not cfg.optimizer.use_distributed_optimizer,
           "optimizer.use_distributed_optimizer is Megatron's; under the deepspeed engine ZeRO shards the "
           "optimizer (deepspeed.zero_stage)")
    fp16_loss_scale(cfg)
    if ds.export_dir:
        check_apart_from_models(cfg, "deepspeed.export_dir", ds.export_dir)
    if ds.config_json:
        read_config_json(cfg)


def fp16_loss_scale(cfg) -> dict:
    """DeepSpeed's fp16 section of the student from the Megatron engine's loss-scale keys (optimizer.*):
    dynamic scaling from initial_loss_scale (DeepSpeed's 2**16 when unset), static when loss_scale is set."""
    opt = cfg.optimizer
    if cfg.student.params_dtype != "float16":
        _check(opt.loss_scale is None and opt.initial_loss_scale is None,
               f"optimizer.loss_scale / initial_loss_scale: the deepspeed engine scales the loss for fp16 only "
               f"(student.params_dtype={cfg.student.params_dtype}); leave them unset")
        return {"enabled": False}
    for name in ("loss_scale", "initial_loss_scale"):
        value = getattr(opt, name)
        _check(value is None or (math.isfinite(value) and value > 0), f"optimizer.{name}={value} must be positive")
    power = math.log2(opt.initial_loss_scale) if opt.initial_loss_scale is not None else 16
    _check(power == int(power), f"optimizer.initial_loss_scale={opt.initial_loss_scale} is not a power of two "
                                f"(DeepSpeed starts its dynamic loss scale at 2**fp16.initial_scale_power)")
    for name in ("loss_scale_window", "hysteresis", "min_loss_scale"):  # DeepSpeed reads them as integers
        value = getattr(opt, name)
        _check(value == int(value) and value >= 1,
               f"optimizer.{name}={value}: DeepSpeed's fp16.{name} is an integer >= 1")
    return {"enabled": True, "loss_scale": float(opt.loss_scale or 0), "initial_scale_power": int(power),
            "loss_scale_window": int(opt.loss_scale_window), "hysteresis": int(opt.hysteresis),
            "min_loss_scale": int(opt.min_loss_scale)}


# --------------------------------------------------------------------------------------------------
# The user's DeepSpeed JSON

# json path -> (the project's key, a function of cfg giving the value it must equal); dp-dependent
# values (train_batch_size, gradient_accumulation_steps) are checked in engine_config.
def _agreeing_fields(cfg) -> dict:
    ds = cfg.deepspeed
    fields = {
        ("train_micro_batch_size_per_gpu",): ("schedule.micro_batch_size", cfg.schedule.micro_batch_size),
        ("train_batch_size",): ("schedule.global_batch_size", cfg.schedule.global_batch_size),
        ("gradient_clipping",): ("optimizer.clip_grad", cfg.optimizer.clip_grad),
        ("bf16", "enabled"): ("student.params_dtype", cfg.student.params_dtype == "bfloat16"),
        ("fp16", "enabled"): ("student.params_dtype", cfg.student.params_dtype == "float16"),
        ("zero_optimization", "stage"): ("deepspeed.zero_stage", ds.zero_stage),
    }
    fp16 = fp16_loss_scale(cfg)
    if fp16["enabled"]:  # the loss-scale settings come from optimizer.*: the JSON may only repeat them
        names = {"loss_scale": "optimizer.loss_scale (0: dynamic)",
                 "initial_scale_power": "log2(optimizer.initial_loss_scale)"}
        for key in [key for key in fp16 if key != "enabled"]:
            fields[("fp16", key)] = (names.get(key, f"optimizer.{key}"), fp16[key])
    return fields


def read_config_json(cfg) -> dict:
    """The user's DeepSpeed JSON with "auto" values dropped (the project fills them); disagreements with
    the project's config are one line naming both keys."""
    path = Path(cfg.deepspeed.config_json)
    _check(path.is_file(), f"deepspeed.config_json={path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(f"{path}{where}: invalid JSON ({getattr(exc, 'msg', exc)})") from None
    _check(isinstance(data, dict), f"{path}: expected a JSON object of DeepSpeed settings")
    for section in ("optimizer", "scheduler"):
        _check(section not in data, f"{path}: '{section}' is set, but the deepspeed engine builds AdamW and the "
                                    f"LR schedule from optimizer.* / schedule.*; remove '{section}'")
    data = _drop_auto(data)
    for keys, (project_key, wanted) in _agreeing_fields(cfg).items():
        value = _get(data, keys)
        if value is None:
            continue
        same = bool(value) == wanted if isinstance(wanted, bool) else value == wanted
        _check(same, f"{path}: {'.'.join(keys)}={json.dumps(value)} disagrees with {project_key}"
                     f"{'' if isinstance(wanted, bool) else '=' + str(wanted)} "
                     f"({'implies ' + json.dumps(wanted) if isinstance(wanted, bool) else 'set them equal'})")
    zero = data.get("zero_optimization") or {}
    for json_key, project_key in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_params")):
        device = (zero.get(json_key) or {}).get("device", "none")
        wanted = getattr(cfg.deepspeed, project_key)
        _check((device not in (None, "none")) == wanted,
               f"{path}: zero_optimization.{json_key}.device={json.dumps(device)} disagrees with "
               f"deepspeed.{project_key}={str(wanted).lower()}")
    return data


def _drop_auto(value):
    if isinstance(value, dict):
        return {k: _drop_auto(v) for k, v in value.items() if v != "auto"}
    return value


def _get(data: dict, keys: tuple):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def engine_config(cfg, dp: int) -> dict:
    """The student's DeepSpeed config: the project's batch layout, precision, clipping, ZeRO stage and
    offload, on top of the user's JSON (whose remaining keys - bucket sizes, prefetching, ... - pass)."""
    from mgsr_megatron import platform

    ds, sched = cfg.deepspeed, cfg.schedule
    micro = sched.global_batch_size // (sched.micro_batch_size * dp)
    bf16 = cfg.student.params_dtype == "bfloat16"
    zero = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": platform.cuda_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": platform.cuda_available()}
    ours = {
        "train_batch_size": sched.global_batch_size, "train_micro_batch_size_per_gpu": sched.micro_batch_size,
        "gradient_accumulation_steps": micro, "gradient_clipping": cfg.optimizer.clip_grad,
        "zero_optimization": zero, "bf16": {"enabled": bf16}, "fp16": fp16_loss_scale(cfg),
        # the client optimizer is torch's AdamW (nothing compiled); DeepSpeedCPUAdam only on request
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": bool(ds.cpu_adam),
        "steps_per_print": 2 ** 31 - 1, "wall_clock_breakdown": False,
    }
    if not ds.config_json:
        return ours
    user = read_config_json(cfg)
    gas = user.get("gradient_accumulation_steps")
    _check(gas is None or gas == micro,
           f"{ds.config_json}: gradient_accumulation_steps={gas} disagrees with schedule.global_batch_size / "
           f"(schedule.micro_batch_size x DP) = {sched.global_batch_size} / ({sched.micro_batch_size} x {dp}) = "
           f"{micro}")
    return _merge(user, ours)


def teacher_config(cfg, dp: int) -> dict:
    """A frozen teacher partitioned with ZeRO-3 (no optimizer): forward gathers each layer's weights."""
    from mgsr_megatron import platform

    zero = {"stage": 3}
    if cfg.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": platform.cuda_available()}
    sched = cfg.schedule
    return {"train_batch_size": sched.global_batch_size, "train_micro_batch_size_per_gpu": sched.micro_batch_size,
            "gradient_accumulation_steps": sched.global_batch_size // (sched.micro_batch_size * dp),
            "zero_optimization": zero, "bf16": {"enabled": cfg.teacher.params_dtype == "bfloat16"},
            "fp16": {"enabled": cfg.teacher.params_dtype == "float16"}, "steps_per_print": 2 ** 31 - 1,
            "wall_clock_breakdown": False}



# --------------------------------------------------------------------------------------------------
# Hugging Face model directories

@dataclass
class ModelDir:
    path: Path
    hf_config: dict  # config.json
    model_cfg: object  # the project's ModelConfig of the architecture (conversion's reading of config.json)
    vocab_size: int  # rows of the embedding = columns of the logits
    has_tokenizer: bool


def inspect_model_dir(path: str | Path, key: str) -> ModelDir:
    """A Hugging Face causal-LM directory: config.json, weights, a supported architecture. No weights are
    read. One-line UserErrors naming `key` (e.g. student.load)."""
    from mgsr_megatron.conversion import for_hf_config
    from mgsr_megatron.data.tokenizer import has_tokenizer_files

    path = Path(path)
    _check(path.is_dir(), f"{key}={path}: directory not found")
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = " (a Megatron checkpoint: the deepspeed engine takes Hugging Face directories; export it with " \
               "tools/convert_checkpoint.py export)" if (path / "model_config.yaml").is_file() or \
            (path / "latest").is_file() else ""
        raise UserError(f"{key}={path}: no config.json, not a Hugging Face model directory{hint}")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file}: invalid JSON ({getattr(exc, 'msg', exc)})") from None
    _check(isinstance(hf, dict), f"{config_file}: expected a JSON object")
    _check(any((path / name).is_file() for name in WEIGHT_FILES),
           f"{key}={path}: no weights ({', '.join(WEIGHT_FILES)})")
    try:
        result = for_hf_config(hf)
    except UserError as exc:
        raise UserError(f"{key}={path}: {exc}") from None
    model_cfg = result[-1] if isinstance(result, tuple) else result
    vocab = hf.get("vocab_size")
    _check(isinstance(vocab, int) and vocab > 0, f"{config_file}: no positive integer 'vocab_size'")
    return ModelDir(path, hf, model_cfg, vocab, has_tokenizer_files(path))


def resolve_models(cfg):
    """Inspect student (and teacher, when it loads) directories, load the tokenizer, check that both models
    speak it and check teacher.cache against it. Returns (tokenizer, {name: ModelDir}); cfg.student / cfg.teacher
    take the architecture of their directory (vocab_size = the tokenizer's: wider logits are cut to it), keeping
    load, params_dtype and cache."""
    from mgsr_megatron.data.tokenizer import check_same_tokenizer, load_tokenizer

    names = ("student", "teacher") if cfg.loads_teacher else ("student",)
    dirs = {name: inspect_model_dir(getattr(cfg, name).load, f"{name}.load") for name in names}
    if cfg.data.tokenizer is None and dirs["student"].has_tokenizer:
        cfg.data.tokenizer = str(dirs["student"].path)
    _check(cfg.data.tokenizer is not None,
           "data.tokenizer is not set and student.load has no tokenizer files: set data.tokenizer")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    for name, found in dirs.items():
        _check(found.vocab_size >= tokenizer.vocab_size,
               f"{name}.load={found.path}: vocab_size={found.vocab_size} in config.json is smaller than tokenizer "
               f"{cfg.data.tokenizer}'s {tokenizer.vocab_size} tokens: the model was trained with another "
               f"vocabulary")
        if found.has_tokenizer and Path(cfg.data.tokenizer).resolve() != found.path.resolve():
            check_same_tokenizer(tokenizer, load_tokenizer(found.path), "data.tokenizer", f"{name}.load")
    if cfg.teacher.cache is not None or cfg.student.cache is not None:  # needs data.tokenizer, set above
        from mgsr_megatron.training.teacher_cache import check_cache_config

        check_cache_config(cfg)
    for name, found in dirs.items():
        model = getattr(cfg, name)
        resolved = dataclasses.replace(found.model_cfg, load=model.load, params_dtype=model.params_dtype,
                                       allow_untrained=model.allow_untrained, cache=model.cache,
                                       vocab_size=tokenizer.vocab_size)
        setattr(cfg, name, resolved)
    return tokenizer, dirs
