"""Model checkpoints: one directory format for converted models, training checkpoints and `--load`.

    DIR/model_config.yaml   the ModelConfig fields (`ModelConfig(**yaml)` rebuilds the model)
    DIR/model/              Megatron dist_checkpointing (torch_dist) of `model.sharded_state_dict()`;
                            layout-free, so it loads at any TP/PP
    DIR/tokenizer/          optional tokenizer files (only when there is a vocabulary to read)
    DIR/provenance.json     where the weights come from: `training` {iterations, final_loss} (a training
                            run) or `import` {source} (an HF import), and `tokenizer_hash` /
                            `tokenizer_vocab_size` (the tokenizer's vocab_hash() and size) when known;
                            loading with another tokenizer is refused, a teacher with neither training
                            nor import is refused unless teacher.allow_untrained (older checkpoints
                            without the file: no tokenizer check)
    DIR/hf_config.json      optional, written by the HF importer: the original HF config, reused at
                            export (architecture name, token ids)
    DIR/manifest.json       size and SHA-256 of every other file (models/trust.py); sizes are checked
                            at every load, hashes with `verify=True` (--verify-checkpoint)

A run keeps `RUN/checkpoints/iter_0000100/` (the same entries plus trainer state) and
`RUN/checkpoints/latest`, a text file naming the newest iteration directory.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place at
the end, so a crash never leaves a directory that looks complete; a failed write (disk full) removes
the temporary directory and is one UserError naming the path and the cause. Loading runs no code from
the files (models/trust.py) and reports damage as one line naming the file.
"""

from __future__ import annotations

import dataclasses
import json
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
PROVENANCE = "provenance.json"
LATEST = "latest"

# The fields that decide the parameter shapes and meaning; a checkpoint must agree on all of them.
ARCHITECTURE_FIELDS = ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                       "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
                       "add_qkv_bias", "tie_embeddings")


def write_model_config(directory: Path, model_cfg: ModelConfig) -> None:
    fields = dataclasses.asdict(model_cfg)
    fields["load"] = None  # the directory itself is what one loads
    fields.pop("allow_untrained")  # how a run treats a teacher, not a property of the weights
    fields.pop("cache")  # where a run reads the teacher's distributions, neither
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


def provenance_of(tokenizer=None, *, training: dict | None = None, imported: dict | None = None) -> dict:
    """A provenance record: where the weights come from (`training` {iterations, final_loss} or
    `imported` {source}) and the tokenizer's hash and size (when a tokenizer is known)."""
    record = {}
    if training is not None:
        record["training"] = training
    if imported is not None:
        record["import"] = imported
    if tokenizer is not None:
        record.update(tokenizer_hash=tokenizer.vocab_hash(), tokenizer_vocab_size=tokenizer.vocab_size)
    return record


def write_provenance(directory: Path, provenance: dict) -> None:
    (Path(directory) / PROVENANCE).write_text(json.dumps(provenance, indent=1, allow_nan=False) + "\n")


def read_provenance(directory: str | Path) -> dict:
    """The checkpoint's provenance record; {} for checkpoints written before it existed."""
    path = Path(directory) / PROVENANCE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON (damaged checkpoint)") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected a JSON object (damaged checkpoint)")
    return record


def check_tokenizer_hash(directory: str | Path, tokenizer, what: str) -> None:
    """The tokenizer about to be used must be the one the checkpoint's weights were trained with: a
    different vocabulary maps every id to another piece. No check when either side is unknown."""
    if tokenizer is None:
        return
    directory = resolve_checkpoint(directory)
    recorded = read_provenance(directory).get("tokenizer_hash")
    if recorded is not None and recorded != tokenizer.vocab_hash():
        raise UserError(f"{what} checkpoint {directory} records tokenizer hash {recorded} (its weights' vocabulary), "
                        f"but tokenizer {tokenizer.name} has hash {tokenizer.vocab_hash()}: use the checkpoint's "
                        f"own tokenizer")


def check_teacher_provenance(directory: str | Path, allow_untrained: bool) -> None:
    """A teacher must come from training (at least one step) or from an import of a published model;
    anything else (train_iters 0, a hand-made checkpoint) is refused unless teacher.allow_untrained."""
    if allow_untrained:
        return
    directory = resolve_checkpoint(directory)
    record = read_provenance(directory)
    training, imported = record.get("training") or {}, record.get("import")
    if imported or (isinstance(training, dict) and (training.get("iterations") or 0) > 0):
        return
    found = f"training iterations {training.get('iterations')}" if training else f"no {PROVENANCE} record"
    raise UserError(f"teacher checkpoint {directory} records neither training nor an import ({found}): refusing "
                    f"a teacher that may be untrained (set teacher.allow_untrained: true to use it anyway)")


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
            try:
                name = latest.read_text().strip()
            except (OSError, UnicodeDecodeError):
                raise UserError(f"{latest}: unreadable (damaged checkpoint directory)") from None
            target = base / name
            if not name or "/" in name or "\\" in name or name in (".", "..") or \
                    not (target / MODEL_CONFIG).is_file():
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
               write_extra: Callable[[Path], None] | None = None, provenance: dict | None = None) -> Path:
    """Collective: every rank of the job calls it. Writes DIR/model_config.yaml, DIR/model/ and, given
    `provenance` (`provenance_of(...)`), DIR/provenance.json.

    `write_extra(tmp_dir)` (called on every rank after the model is written, before the rename) lets
    the trainer add its own state to the same atomic directory. Rank 0 then records the size and
    SHA-256 of every file in DIR/manifest.json and renames the directory into place. Returns the final
    directory. A failure (disk full, permissions) removes the temporary directory, leaves any older
    DIR untouched and raises a UserError naming the path and the cause (on every rank).
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from mgsr_megatron.models.trust import describe_save_error, root_cause, write_manifest

    final = Path(directory)
    temporary = _temporary_sibling(final)
    failure = None
    try:
        if _rank() == 0:
            if temporary.exists():
                shutil.rmtree(temporary)
            (temporary / MODEL_DIR).mkdir(parents=True)
            write_model_config(temporary, model_cfg)
            if provenance is not None:
                write_provenance(temporary, provenance)
    except Exception as exc:  # noqa: BLE001 - reported below, after every rank knows
        failure = exc
    failure = _agree_on_failure(failure)
    if failure is None:
        try:
            dist_checkpointing.save(model.sharded_state_dict(), str(temporary / MODEL_DIR))
            if write_extra is not None:
                write_extra(temporary)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's is a BaseException
            failure = exc
        failure = _agree_on_failure(failure)
    if failure is None and _rank() == 0:
        try:
            write_manifest(temporary)
            replace_directory(temporary, final)
        except Exception as exc:  # noqa: BLE001
            failure = exc
    failure = _agree_on_failure(failure)
    if failure is not None:
        if _rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        _barrier()
        if isinstance(failure, UserError):
            raise failure
        if isinstance(failure, BaseException) and not isinstance(root_cause(failure), OSError):
            raise failure  # a bug, not the disk: keep its traceback (the partial directory is gone)
        cause = failure if isinstance(failure, str) else describe_save_error(failure)
        raise UserError(f"saving checkpoint {final} failed: {cause}; the partial directory was removed and "
                        f"earlier checkpoints are unchanged") from None
    return final


def _agree_on_failure(failure):
    """Every rank learns whether any rank failed (so all raise together instead of hanging)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return failure
    import torch

    flag = torch.tensor([1.0 if failure is not None else 0.0])
    backend = dist.get_backend()
    if backend == "nccl":
        from mgsr_megatron import platform

        flag = flag.to(platform.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0 and failure is None:
        return "another rank failed to write its part (see its error)"
    return failure


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


def load_model(model, directory: str | Path, verify: bool = False, require_manifest: bool | None = None) -> ModelConfig:
    """Collective: load DIR/model into this rank's shard (strict). Returns the stored ModelConfig.

    Before anything is read by Megatron/PyTorch: the manifest's sizes (SHA-256 too when `verify`,
    which also requires a manifest), the dist checkpoint's metadata (allow-list unpickler), shard
    files and common.pt. The load itself runs inside `safe_loading()`: no pickle can run code.
    `require_manifest` (default: `verify`) makes a checkpoint without manifest.json an error; a teacher
    is loaded with verify=True, require_manifest=cfg.checkpoint.verify (hashes whenever recorded).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from mgsr_megatron.models.trust import (
        check_dist_checkpoint,
        describe_load_error,
        load_errors,
        safe_loading,
        verify_collective,
    )

    directory = resolve_checkpoint(directory)
    saved = read_model_config(directory)
    check_architecture(model, saved, str(directory))
    weights = directory / MODEL_DIR
    if not (weights / "metadata.json").is_file():
        raise UserError(f"{directory}: no weights ({MODEL_DIR}/metadata.json missing)")
    verify_collective(directory, hashes=verify, prefixes=(MODEL_DIR + "/", MODEL_CONFIG, PROVENANCE),
                      required=verify if require_manifest is None else require_manifest)
    check_dist_checkpoint(weights)
    sharded = model.sharded_state_dict()
    try:
        with safe_loading():
            state = dist_checkpointing.load(sharded, str(weights), strict=StrictHandling.RAISE_ALL)
    except UserError:
        raise
    except load_errors() as exc:  # noqa: BLE001 - damaged or foreign checkpoint: one line naming it
        raise describe_load_error(weights, exc) from exc
    model.load_state_dict(state, strict=True)
    return saved
