"""Import a Hugging Face model into a Megatron checkpoint directory, and export one back.

Both directions stream: the importer produces each Megatron tensor when the dist-checkpoint writer
reaches it (see megatron_io.py), the exporter reads one layer from the checkpoint, writes it as one
safetensors file and drops it. Peak memory: one layer's tensors (import: one dense Megatron tensor
plus the HF tensors it is built from; export: one layer of Megatron tensors and their HF forms).
Output goes to a temporary sibling directory renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from mgsr_megatron.architectures import for_hf_config, get_family
from mgsr_megatron.config import ModelConfig
from mgsr_megatron.conversion.hf_io import GENERATION_CONFIG, TOKENIZER_FILES, HFCheckpoint, HFWriter
from mgsr_megatron.conversion.megatron_io import CheckpointReader, layer_of, write_checkpoint
from mgsr_megatron.errors import UserError
from mgsr_megatron.models.builder import resolve
from mgsr_megatron.models.checkpoint import (
    MODEL_CONFIG,
    MODEL_DIR,
    TOKENIZER_DIR,
    provenance_of,
    read_model_config,
    replace_directory,
    resolve_checkpoint,
    write_model_config,
    write_provenance,
)
from mgsr_megatron.models.trust import check_dist_checkpoint, verify_manifest, write_manifest

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
HF_CONFIG = "hf_config.json"
HF_EXTRA = "hf_extra.safetensors"  # HF tensors with no Megatron counterpart (HFMapping.extra_hf: OPT's offset rows)


def ensure_single_process_parallel_state() -> None:
    """TP=1/PP=1 parallel_state for the meta model (starts a 1-process group when none exists)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mgsr_megatron import parallel

    if not dist.is_initialized():
        parallel.init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        parallel.initialize_model_parallel(1, 1)


def prepare_output(path: Path, overwrite: bool, flag: str) -> Path:
    """Refuse a non-empty output directory unless --overwrite; return the temporary sibling."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        holds = "a checkpoint" if ((path / MODEL_CONFIG).exists() or (path / "config.json").exists()) else "files"
        if not overwrite:
            raise UserError(f"{flag} {path} already holds {holds}; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    return temporary


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled)


def import_hf(hf_path: str | Path, megatron_path: str | Path, tp: int = 1, pp: int = 1, dtype: str | None = None,
              make_vocab_size_divisible_by: int = 128, overwrite: bool = False, progress: bool = True) -> ModelConfig:
    """HF directory -> DIR/{model_config.yaml, model/, hf_config.json, provenance.json, tokenizer/ (when the
    HF directory holds a vocabulary), generation_config.json (when it has one)}. Returns the ModelConfig.

    `tp`/`pp` are the layout the checkpoint is meant for: it loads at any layout, but this one is
    checked up front (heads, query groups, FFN and padded vocabulary divisible by TP; layers by PP).
    """
    from mgsr_megatron import parallel
    from mgsr_megatron.models.vocab import padded_vocab_size

    hf = HFCheckpoint(hf_path)
    check_not_overlapping(Path(hf_path), Path(hf_path), Path(megatron_path), ("--megatron-path", "--hf-path"))
    family, cfg = for_hf_config(hf.config)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if make_vocab_size_divisible_by < 1:
        raise UserError(f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by}: must be >= 1")
    cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                              params_dtype=DTYPES[dtype] if dtype else cfg.params_dtype)
    cfg = resolve(cfg)
    parallel.validate_layout(tp * pp, tp, pp, {"target layout (--tp/--pp)": cfg})
    padded_vocab_size(cfg.vocab_size, make_vocab_size_divisible_by, tp)
    arch = family.hf_mapping(cfg)
    arch.check_tensors(hf.shapes, f"--hf-path {hf.path}")

    out = Path(megatron_path)
    temporary = prepare_output(out, overwrite, "--megatron-path")
    try:
        ensure_single_process_parallel_state()
        (temporary / MODEL_DIR).mkdir()
        with _progress(cfg.num_layers + 2, f"import {hf.path.name}", progress) as bar:
            write_checkpoint(cfg, temporary / MODEL_DIR, lambda name: arch.to_megatron(name, hf.get),
                             on_layer=lambda label: bar.update(1))
        write_model_config(temporary, cfg)
        (temporary / HF_CONFIG).write_text(json.dumps(hf.config, indent=2) + "\n")
        extra = arch.hf_extra(hf.get)
        if extra:
            from safetensors.torch import save_file

            save_file(extra, str(temporary / HF_EXTRA))
        if (hf.path / GENERATION_CONFIG).is_file():
            shutil.copyfile(hf.path / GENERATION_CONFIG, temporary / GENERATION_CONFIG)
        tokenizer = _imported_tokenizer(hf, temporary / TOKENIZER_DIR)
        write_provenance(temporary, provenance_of(tokenizer, imported={"source": str(hf.path.resolve())}))
        write_manifest(temporary)
        replace_directory(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return cfg


def _imported_tokenizer(hf: HFCheckpoint, destination: Path):
    """Copy the HF directory's tokenizer (if any) and read it, for the hash the checkpoint records; a
    tokenizer that `transformers` cannot read is copied but not recorded (the weights are still good)."""
    from mgsr_megatron.data.tokenizer import load_tokenizer

    if not hf.copy_tokenizer(destination):
        return None
    try:
        return load_tokenizer(destination)
    except UserError as exc:
        print(f"import: the tokenizer in {hf.path} is not recorded in provenance.json ({exc})", flush=True)
        return None


def _group_names(names: list[str], group) -> list[str]:
    if group == "embedding":
        return [n for n in names if n.startswith("embedding.")]
    if group == "final":
        return [n for n in names if n.startswith("decoder.final_layernorm.") or n.startswith("output_layer.")]
    return [n for n in names if layer_of(n) == group]


def check_not_overlapping(given: Path, source: Path, output: Path,
                          flags: tuple[str, str] = ("--hf-path", "--megatron-path")) -> None:
    """A conversion's output may not equal, contain or lie inside its input (--overwrite would delete it).
    `given` is the input as named, `source` what it resolved to (a run's checkpoints dir -> iter_N)."""
    out = output.resolve()
    for path in {given.resolve(), source.resolve()}:
        if out == path or path.is_relative_to(out) or out.is_relative_to(path):
            raise UserError(f"{flags[0]} {output} overlaps the input {flags[1]} {given}: the conversion would "
                            f"overwrite its own input; choose an output directory outside it")


def export_hf(megatron_path: str | Path, hf_path: str | Path, dtype: str | None = None, overwrite: bool = False,
              tokenizer: str | Path | None = None, progress: bool = True, verify: bool = False) -> Path:
    """DIR (or a run's checkpoints dir) -> HF directory loadable by AutoModelForCausalLM.from_pretrained."""
    checkpoint = resolve_checkpoint(megatron_path)
    cfg = resolve(read_model_config(checkpoint))
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if not (checkpoint / MODEL_DIR / "metadata.json").is_file():
        raise UserError(f"{checkpoint}: no weights ({MODEL_DIR}/metadata.json missing)")
    check_not_overlapping(Path(megatron_path), checkpoint, Path(hf_path))
    verify_manifest(checkpoint, hashes=verify, prefixes=(MODEL_DIR + "/", MODEL_CONFIG, HF_CONFIG, HF_EXTRA,
                                                         GENERATION_CONFIG, TOKENIZER_DIR + "/"), required=verify)
    check_dist_checkpoint(checkpoint / MODEL_DIR)
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise UserError(f"--tokenizer {tokenizer}: directory not found")
    arch = get_family(cfg.arch).hf_mapping(cfg)
    out_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        DTYPES[dtype] if dtype else cfg.params_dtype]

    hf_config = arch.hf_config()
    template_file = checkpoint / HF_CONFIG
    if template_file.is_file():  # keep the original's architecture name, token ids, ...
        template = json.loads(template_file.read_text())
        if template.get("model_type") in (hf_config["model_type"], *arch.template_model_types):
            hf_config = {**template, **{k: v for k, v in hf_config.items()
                                        if k not in ("architectures", "model_type")}}
    hf_config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    if arch.extra_hf and (checkpoint / HF_EXTRA).is_file():
        from safetensors.torch import load_file

        arch.extra = load_file(str(checkpoint / HF_EXTRA))

    out = Path(hf_path)
    temporary = prepare_output(out, overwrite, "--hf-path")
    try:
        ensure_single_process_parallel_state()
        reader = CheckpointReader(cfg, checkpoint / MODEL_DIR)
        names = list(reader.shapes)
        groups = arch.groups()
        writer = HFWriter(temporary, len(groups))
        with _progress(len(groups), f"export {checkpoint.name}", progress) as bar:
            for group in groups:
                tensors = reader.read(_group_names(names, group))
                hf_tensors = arch.to_hf(group, tensors.__getitem__)
                writer.write({k: v.to(out_dtype) for k, v in hf_tensors.items()})
                del tensors, hf_tensors
                bar.update(1)
        writer.finish()
        (temporary / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        source = Path(tokenizer) if tokenizer is not None else checkpoint / TOKENIZER_DIR
        if source.is_dir():
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, temporary / name)
        # imports keep it beside the weights; older ones kept it in tokenizer/
        for origin in (checkpoint / GENERATION_CONFIG, checkpoint / TOKENIZER_DIR / GENERATION_CONFIG):
            if origin.is_file():
                shutil.copyfile(origin, temporary / GENERATION_CONFIG)
                break
        replace_directory(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out
