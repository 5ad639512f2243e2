"""Checkpoint files that run no code, damage reported as one line, and an integrity manifest.

* `.metadata` of a dist checkpoint (PyTorch reads it with plain `pickle.load`) is read with an
  allow-list unpickler: only the dataclasses/enums of torch's checkpoint metadata, `torch.Size`,
  dtypes and layouts. Anything else (a `__reduce__` payload) is refused, naming the file.
* `safe_loading()` is the scope of every dist-checkpoint load: inside it PyTorch's reader uses that
  unpickler and every `torch.load` (Megatron's `common.pt`, the byte objects inside `.distcp` shards,
  which torch's planner loads with `weights_only=False`) is forced to `weights_only=True`.
* `check_dist_checkpoint(dir)` runs before a load: metadata.json, `.metadata`, every shard file the
  metadata points into (present, long enough), `common.pt`; any damage is a UserError naming the file.
* `manifest.json`: size and SHA-256 of every file of a checkpoint, written inside the temporary
  directory before the rename; sizes are checked at every load, hashes on request.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
from pathlib import Path

from mgsr_megatron.errors import UserError

MANIFEST = "manifest.json"
METADATA = ".metadata"

_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_META, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                               "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                               "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.distributed.checkpoint.planner", "BytesIOWriteData"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),  # storage_meta.checkpoint_id of a directly written DCP checkpoint
    ("pathlib", "PurePosixPath"),
}


class _Refused(Exception):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        import torch

        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")


def read_metadata_file(path: str | Path):
    """The `Metadata` object of a dist checkpoint's `.metadata`, read without running any code."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        with open(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except FileNotFoundError:
        raise UserError(f"{path}: missing (damaged or incomplete checkpoint)") from None
    except _Refused as exc:
        raise UserError(f"{path}: refused: it references {exc}, which is not checkpoint metadata "
                        f"(a checkpoint file must not contain code)") from None
    except Exception as exc:  # noqa: BLE001 - garbage, truncated: one line naming the file
        raise UserError(f"{path}: not a readable checkpoint metadata file ({type(exc).__name__})") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path}: not checkpoint metadata (holds a {type(metadata).__name__})")
    return metadata


def load_torch_file(path: str | Path):
    """`torch.load(weights_only=True)` with one-line errors naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise UserError(f"{path}: refused: it holds objects other than tensors and plain data "
                            f"(a checkpoint file must not contain code)") from None
        raise UserError(f"{path}: cannot be read as a checkpoint file (UnpicklingError: {first[:200]})") from None
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file: one clear line
        raise UserError(f"{path}: cannot be read as a checkpoint file ({type(exc).__name__})") from None


_ORIGINAL_LOAD: dict = {}


@contextlib.contextmanager
def safe_loading():
    """Scope of a dist-checkpoint load: no pickle in it can run code."""
    import torch
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint.metadata import StorageMeta

    if "load" in _ORIGINAL_LOAD:  # nested: already safe
        yield
        return
    original_load = torch.load
    original_read_metadata = filesystem.FileSystemReader.read_metadata

    def weights_only_load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        return original_load(f, map_location=map_location, weights_only=True, **kwargs)

    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata_file(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    _ORIGINAL_LOAD["load"] = original_load
    torch.load = weights_only_load
    filesystem.FileSystemReader.read_metadata = read_metadata
    try:
        yield
    finally:
        torch.load = original_load
        filesystem.FileSystemReader.read_metadata = original_read_metadata
        _ORIGINAL_LOAD.clear()


def check_dist_checkpoint(directory: str | Path) -> None:
    """A Megatron/torch_dist checkpoint directory is complete and runs no code (before any load)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    directory = Path(directory)
    config = directory / "metadata.json"
    if not config.is_file():
        raise UserError(f"{config}: missing (incomplete checkpoint)")
    try:
        json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{config}: not valid JSON (damaged checkpoint)") from None
    metadata = read_metadata_file(directory / METADATA)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"{directory / METADATA}: refers to a file outside the checkpoint ({name})")
        if not shard.is_file():
            raise UserError(f"{shard}: missing (damaged or incomplete checkpoint)")
        size = shard.stat().st_size
        if size < end:
            raise UserError(f"{shard}: truncated ({size} bytes, the metadata needs {end})")
    if (directory / "common.pt").exists():
        load_torch_file(directory / "common.pt")
    # byte objects (e.g. Megatron's `_extra_state`), which torch's planner would unpickle with
    # weights_only=False: each must load as plain data (safe_loading() forces that too)
    byte_keys = {key for key, m in metadata.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if getattr(index, "fqn", None) not in byte_keys:
            continue
        shard = directory / info.relative_path
        with open(shard, "rb") as stream:
            stream.seek(int(info.offset))
            data = stream.read(int(info.length))
        try:
            import torch

            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            refused = "weights_only" in str(exc) or "Unsupported global" in str(exc)
            raise UserError(f"{shard}: object '{index.fqn}' " + (
                "refused: it holds objects other than tensors and plain data (a checkpoint file must not "
                "contain code)" if refused else f"cannot be read ({type(exc).__name__})")) from None


def _innermost(exc: BaseException) -> BaseException:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        failure = next(iter(failures.values()))
        failure = failure[0] if isinstance(failure, tuple) and failure else failure
        if isinstance(failure, BaseException):
            return _innermost(failure)
    return exc


def describe_load_error(where: Path, exc: BaseException) -> UserError:
    exc = _innermost(exc)
    message = " ".join(str(exc).split())
    return UserError(f"{where}: cannot be loaded, damaged or foreign checkpoint ({type(exc).__name__}: "
                     f"{message[:400]})")


def load_errors() -> tuple:
    """What a damaged checkpoint can raise while loading (DCP's CheckpointException is a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


# ------------------------------------------------------------------------------------------ manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Record size + SHA-256 of every file under `directory` (call on the finished temporary dir)."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as stream:
        json.dump({"version": 1, "files": files}, stream, indent=1)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, directory / MANIFEST)


def verify_manifest(directory: str | Path, hashes: bool = False, prefixes: tuple[str, ...] | None = None,
                    required: bool = False) -> bool:
    """Check the files of `directory` against its manifest (sizes; SHA-256 too if `hashes`).

    `prefixes` limits the check to those entries (e.g. ("model/", "model_config.yaml")). Returns False
    when there is no manifest (older checkpoints) unless `required`, which makes that an error.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        if required:
            raise UserError(f"{directory}: no {MANIFEST}, so its integrity cannot be verified (written by an "
                            f"older version; re-save it, or load it without verification)")
        return False
    try:
        files = json.loads(path.read_text())["files"]
        assert isinstance(files, dict)
    except Exception:  # noqa: BLE001
        raise UserError(f"{path}: not a valid checkpoint manifest (damaged checkpoint)") from None
    for name, entry in files.items():
        if prefixes is not None and not any(name == p or name.startswith(p) for p in prefixes):
            continue
        file = directory / name
        if not file.is_file():
            raise UserError(f"{file}: missing (listed in {MANIFEST}; damaged checkpoint)")
        size = file.stat().st_size
        if size != entry["size"]:
            raise UserError(f"{file}: {size} bytes, {MANIFEST} records {entry['size']} (damaged checkpoint)")
        if hashes and _sha256(file) != entry["sha256"]:
            raise UserError(f"{file}: SHA-256 differs from {MANIFEST} (damaged or modified checkpoint)")
    return True


def verify_collective(directory: str | Path, hashes: bool, prefixes: tuple[str, ...] | None = None,
                      required: bool = False) -> None:
    """`verify_manifest` for a job: sizes on every rank, SHA-256 on rank 0 only (one read of the
    files, not one per rank); every rank raises the same UserError."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        verify_manifest(directory, hashes=hashes, prefixes=prefixes, required=required)
        return
    message = [None]
    try:
        verify_manifest(directory, hashes=hashes and dist.get_rank() == 0, prefixes=prefixes, required=required)
    except UserError as exc:
        message = [str(exc)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message[0])
    errors = [m for m in gathered if m]
    if errors:
        raise UserError(errors[0])


# ------------------------------------------------------------------------------------------ save errors
def root_cause(exc: BaseException) -> BaseException:
    """The OSError (disk full, permission) behind a save failure, also inside DCP's CheckpointException."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        failures = getattr(current, "failures", None)  # DCP: {rank: (exception, stack) or exception}
        if isinstance(failures, dict):
            for failure in failures.values():
                failure = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(failure, BaseException):
                    stack.append(failure)
        stack += [current.__cause__, current.__context__]
    text = str(exc)
    if "No space left" in text or "unexpected pos" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return exc


def describe_save_error(exc: BaseException) -> str:
    cause = root_cause(exc)
    if isinstance(cause, OSError):
        where = f" ({cause.filename})" if cause.filename else ""
        return f"{cause.strerror or cause}{where}"
    return f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
