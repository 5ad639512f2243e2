"""Model checkpoints: one directory format for converted models, training checkpoints and `--load`.

    DIR/model_config.yaml   the ModelConfig fields (`ModelConfig(**yaml)` rebuilds the model)
    DIR/model/              Megatron dist_checkpointing (torch_dist) of `model.sharded_state_dict()`;
                            layout-free, so it loads at any TP/PP
    DIR/tokenizer/          optional tokenizer files
    DIR/hf_config.json      optional, written by the HF importer: the original HF config, reused at
                            export (architecture name, token ids)

A run keeps `RUN/checkpoints/iter_0000100/` (the same entries plus trainer state) and
`RUN/checkpoints/latest`, a text file naming the newest iteration directory.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place at
the end, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import yaml

from mgsr_megatron.config import ModelConfig
from mgsr_megatron.errors import UserError

MODEL_CONFIG = "model_config.yaml"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
LATEST = "latest"

# The fields that decide the parameter shapes and meaning; a checkpoint must agree on all of them.
ARCHITECTURE_FIELDS = ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                       "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
                       "add_qkv_bias", "tie_embeddings")


def write_model_config(directory: Path, model_cfg: ModelConfig) -> None:
    fields = dataclasses.asdict(model_cfg)
    fields["load"] = None  # the directory itself is what one loads
    (Path(directory) / MODEL_CONFIG).write_text(yaml.safe_dump(fields, sort_keys=False))


def read_model_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig stored with a checkpoint (a run's checkpoints dir is resolved first)."""
    directory = resolve_checkpoint(directory)
    path = directory / MODEL_CONFIG
    if not path.is_file():
        raise UserError(f"{directory}: not a model checkpoint (no {MODEL_CONFIG})")
    try:
        fields = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(fields, dict):
        raise UserError(f"{path}: expected a mapping of ModelConfig fields")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"{path}: unknown ModelConfig field(s) {', '.join(unknown)}")
    return ModelConfig(**fields)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory; a run's checkpoints directory (or run directory) follows `latest`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint directory not found: {path}")
    if (path / MODEL_CONFIG).is_file():
        return path
    for base in (path, path / "checkpoints"):
        latest = base / LATEST
        if latest.is_file():
            name = latest.read_text().strip()
            target = base / name
            if not name or not (target / MODEL_CONFIG).is_file():
                raise UserError(f"{latest} names '{name}', which is not a complete checkpoint")
            return target
    raise UserError(f"{path}: not a model checkpoint (no {MODEL_CONFIG}) and no '{LATEST}' file")


def _temporary_sibling(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.tmp"


def replace_directory(temporary: Path, final: Path) -> None:
    """Move a finished temporary directory to `final`, replacing an older one (single caller)."""
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    temporary.rename(final)
    if old.exists():
        shutil.rmtree(old)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_model(model, directory: str | Path, model_cfg: ModelConfig,
               write_extra: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank of the job calls it. Writes DIR/model_config.yaml and DIR/model/.

    `write_extra(tmp_dir)` (called on every rank after the model is written, before the rename) lets
    the trainer add its own state to the same atomic directory. Returns the final directory.
    """
    from megatron.core import dist_checkpointing

    final = Path(directory)
    temporary = _temporary_sibling(final)
    if _rank() == 0:
        if temporary.exists():
            shutil.rmtree(temporary)
        (temporary / MODEL_DIR).mkdir(parents=True)
        write_model_config(temporary, model_cfg)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(temporary / MODEL_DIR))
    if write_extra is not None:
        write_extra(temporary)
    _barrier()
    if _rank() == 0:
        replace_directory(temporary, final)
    _barrier()
    return final


def check_architecture(model, saved: ModelConfig, where: str) -> None:
    """The model built here and the checkpoint must describe the same parameters."""
    from mgsr_megatron.models.builder import resolve

    built = getattr(model, "model_cfg", None)
    if built is None:  # fall back to what the GPTModel itself knows
        config = model.config
        built_fields = {
            "num_layers": config.num_layers, "hidden_size": config.hidden_size,
            "ffn_hidden_size": config.ffn_hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "num_query_groups": config.num_query_groups or config.num_attention_heads,
            "vocab_size": getattr(model, "true_vocab_size", None),
            "tie_embeddings": model.share_embeddings_and_output_weights,
        }
    else:
        built_fields = dataclasses.asdict(resolve(built))
    saved_fields = dataclasses.asdict(resolve(saved))
    for field in ARCHITECTURE_FIELDS:
        if field in built_fields and built_fields[field] is not None and built_fields[field] != saved_fields[field]:
            raise UserError(f"{where}: checkpoint has {field}={saved_fields[field]!r} but the model "
                            f"being loaded has {field}={built_fields[field]!r}")


def load_model(model, directory: str | Path) -> ModelConfig:
    """Collective: load DIR/model into this rank's shard (strict). Returns the stored ModelConfig."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    directory = resolve_checkpoint(directory)
    saved = read_model_config(directory)
    check_architecture(model, saved, str(directory))
    weights = directory / MODEL_DIR
    if not (weights / "metadata.json").is_file():
        raise UserError(f"{directory}: no weights ({MODEL_DIR}/metadata.json missing)")
    sharded = model.sharded_state_dict()
    try:
        state = dist_checkpointing.load(sharded, str(weights), strict=StrictHandling.RAISE_ALL)
    except (CheckpointingException, KeyError) as exc:
        message = " ".join(str(exc).split())
        raise UserError(f"{weights}: {message[:600]}") from exc
    model.load_state_dict(state, strict=True)
    return saved
