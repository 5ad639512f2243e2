"""The tiny end-to-end training setup (mgsr_megatron.training.smoke) as the trainer's distributed
checks use it: a directory every rank sees and a fixed initial student."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch.distributed as dist

from mgsr_megatron.training.smoke import base_config, build_files

_ROOT: Path | None = None


def shared_root() -> Path:
    """A directory every rank sees, with the data files built once (by rank 0)."""
    global _ROOT
    if _ROOT is None:
        holder = [tempfile.mkdtemp(prefix="mgsr_train_") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        _ROOT = Path(holder[0])
        if dist.get_rank() == 0:
            build_files(_ROOT)
        dist.barrier()
    return _ROOT


def ensure_student_init(root: Path) -> str:
    """A fixed initial student checkpoint (Megatron's random init depends on the layout: every pipeline
    stage has its own seed), so runs at different layouts start from the same weights."""
    from mgsr_megatron import parallel
    from mgsr_megatron.models import build_model
    from mgsr_megatron.models.checkpoint import save_model

    path = root / "student_init"
    if not (path / "model_config.yaml").is_file():
        parallel.initialize_model_parallel(1, 1, seed=13)
        save_model(build_model(base_config(root).student), path, copy.deepcopy(base_config(root).student))
    return str(path)
