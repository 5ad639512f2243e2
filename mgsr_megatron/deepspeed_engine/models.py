"""Hugging Face models under DeepSpeed: loading (replicated or ZeRO-3-partitioned) and export.

`load_model(dir, dtype, zero3_config)`:
  * replicated: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=False)`;
  * ZeRO-3: the model is built from its config.json inside `deepspeed.zero.Init`, so every parameter is
    partitioned over the data-parallel ranks as it is created (no rank ever holds the whole model), then
    the weights are streamed in module by module: the module's partitions are gathered
    (`GatheredParameters(modifier_rank=0)`), rank 0 copies the tensors from the safetensors / .bin files
    (memory-mapped, conversion/hf_io.py) and the gathered parameters are re-partitioned on exit.
    (transformers' own ZeRO-3 loading goes through `HfDeepSpeedConfig`, which needs `accelerate`.)

`export_hf(model, source_dir, out_dir, zero3)`: the model's parameters (gathered one by one under
ZeRO-3) written by rank 0 as safetensors + config.json (+ the source's generation config and tokenizer
files) into a temporary sibling directory renamed into place; `AutoModelForCausalLM.from_pretrained`
reads it (tied weights are stored once, as transformers does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mgsr_megatron.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def load_model(path: str | Path, dtype: str, zero3_config: dict | None = None, device=None):
    """The causal LM of HF directory `path` in `dtype`; partitioned with ZeRO-3 when `zero3_config` is given."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(path)
    if zero3_config is None:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, dtype=torch_dtype(dtype),
                                                     local_files_only=True)
        return model.to(device) if device is not None else model
    from mgsr_megatron.conversion.hf_io import HFCheckpoint
    from mgsr_megatron.deepspeed_engine.runtime import import_deepspeed

    deepspeed = import_deepspeed()
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    # import the model's module before zero.Init patches tensor construction (an import inside it fails)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # no dtype= here: DeepSpeed 0.19.8 then picks bf16 on CPUs without fp16 support whatever is passed
    # (operator precedence in Init._set_dtype); the config's bf16 / fp16.enabled decide, float32 otherwise
    for key, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        if bool((zero3_config.get(key) or {}).get("enabled")) != (dtype == name):
            raise ValueError(f"ZeRO-3 config {key}={zero3_config.get(key)} disagrees with dtype {dtype}")
    with deepspeed.zero.Init(config_dict_or_path=zero3_config):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch_dtype(dtype))
    try:
        weights = HFCheckpoint(path)
    except UserError as exc:
        raise UserError(str(exc).replace("--hf-path", "model directory")) from None
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    rank = dist.get_rank()
    missing = []
    for module_name, module in model.named_modules():
        params = dict(module.named_parameters(prefix=module_name, recurse=False))
        if not params:
            continue
        sources = {}
        for name in params:
            if name in weights.shapes:
                sources[name] = name
            elif prefix and name.startswith(prefix) and name[len(prefix):] in weights.shapes:
                sources[name] = name[len(prefix):]  # checkpoints saved from the bare base model
            else:
                missing.append(name)
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    for name, source in sources.items():
                        tensor = weights.get(source)
                        if tuple(tensor.shape) != tuple(params[name].shape):
                            raise UserError(f"{path}: tensor {source} has shape {list(tensor.shape)}, the model "
                                            f"built from config.json expects {list(params[name].shape)}")
                        params[name].copy_(tensor)
    if missing:
        raise UserError(f"{path}: the weights lack {', '.join(missing[:5])}"
                        f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    return model


def is_partitioned(param) -> bool:
    return hasattr(param, "ds_id")


def parameter_shape(param) -> tuple[int, ...]:
    """The full shape of a (possibly ZeRO-3-partitioned) parameter."""
    return tuple(getattr(param, "ds_shape", param.shape))


def gathered_state(model) -> dict[str, torch.Tensor]:
    """Collective: the full parameters as CPU tensors on rank 0 ({} elsewhere), one gathered at a time."""
    from mgsr_megatron.deepspeed_engine.runtime import import_deepspeed

    deepspeed = import_deepspeed()
    rank = dist.get_rank()
    state = {}
    for name, param in model.named_parameters():
        if is_partitioned(param):
            with deepspeed.zero.GatheredParameters([param]):
                if rank == 0:
                    state[name] = param.detach().to("cpu", copy=True)
        elif rank == 0:
            state[name] = param.detach().to("cpu", copy=True)
    return state


def export_hf(model, source_dir: str | Path, out_dir: str | Path) -> Path:
    """Collective: write the trained model as a Hugging Face directory (see the module doc)."""
    from safetensors.torch import save_file

    from mgsr_megatron.conversion.hf_io import GENERATION_CONFIG, TOKENIZER_FILES
    from mgsr_megatron.models.checkpoint import replace_directory

    out, source = Path(out_dir), Path(source_dir)
    state = gathered_state(model)
    error = None
    if dist.get_rank() == 0:
        temporary = out.parent / f".{out.name}.tmp"
        try:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(temporary / "model.safetensors"),
                      metadata={"format": "pt"})
            config = json.loads((source / "config.json").read_text())
            dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
            for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
                config[key] = dtype
            (temporary / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            for name in (GENERATION_CONFIG, *TOKENIZER_FILES):
                if (source / name).is_file():
                    shutil.copyfile(source / name, temporary / name)
            replace_directory(temporary, out)
        except OSError as exc:
            shutil.rmtree(temporary, ignore_errors=True)
            error = f"exporting the student to {out} failed: {exc.strerror or exc}"
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise UserError(message[0])
    return out
