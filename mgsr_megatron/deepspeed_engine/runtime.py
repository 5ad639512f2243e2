"""Process start-up for the DeepSpeed engine, without compiling anything.

DeepSpeed JIT-compiles C++ ops through torch.utils.cpp_extension into the torch extensions folder
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/pyXY_<cpu|cuXYZ>/OP). Two builds matter here:

* `deepspeed_shm_comm`: every construction of DeepSpeed's communication backend (`TorchBackend`, made
  by `deepspeed.initialize` / `init_distributed`, also when torch.distributed is already initialised
  and `dist_init_required=False`) builds this shared-memory all-reduce when the CPU accelerator reports
  it compatible: 150 s or more on 2 cores, and a build killed half-way leaves a `lock` file every later
  run waits on forever. It only serves DeepSpeed's inference all-reduce, which training never calls.
  `import_deepspeed()` marks it incompatible in `deepspeed.ops.__compatible_ops__` (the dict
  `build_shm_op` consults; DeepSpeed caches it in the module so that edits persist), so the backend is
  built without it and gloo / NCCL carry every collective.
* `cpu_adam` (DeepSpeedCPUAdam): only with `deepspeed.cpu_adam: true` (offloaded optimizer states, GPU
  machines). Before that build `check_extension_lock` refuses a stale `lock` with one line instead of
  hanging. Otherwise the client optimizer is torch's AdamW and nothing is compiled.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from mgsr_megatron.errors import UserError

SHM_OP = "deepspeed_shm_comm"
CPU_ADAM_OP = "cpu_adam"


def import_deepspeed():
    """`import deepspeed` with the shared-memory communication op switched off (see the module doc)."""
    import deepspeed
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible[SHM_OP] = False
    return deepspeed


def extensions_root() -> Path:
    """The folder torch.utils.cpp_extension builds into (the per-Python/accelerator subfolder included)."""
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{accelerator}"


def check_extension_lock(op_name: str) -> None:
    """A `lock` left in OP's build folder makes every later build of OP wait forever: one line instead."""
    root = extensions_root()
    lock = root / op_name / "lock"
    if lock.exists():
        raise UserError(f"{lock} exists: a build of DeepSpeed's {op_name} op is running in another job or was "
                        f"killed half-way (then every run waits on it forever); if no other job is building it, "
                        f"delete {lock.parent} and run again")


def init_distributed(timeout_minutes: int = 10, rendezvous_timeout_s: float = 300.0):
    """torch.distributed (NCCL on CUDA, gloo on CPU) from torchrun / srun / mpirun variables, then the
    variables DeepSpeed reads itself (LOCAL_RANK, ...). Idempotent. Returns the DistEnv."""
    import torch.distributed as dist

    from mgsr_megatron import platform
    from mgsr_megatron.parallel import discover_env, wait_for_rendezvous

    env = discover_env()
    platform.keep_freed_host_memory()
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                        ("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port)):
        os.environ.setdefault(name, str(value))
    if not dist.is_initialized():
        platform.set_local_device(env.local_rank)
        wait_for_rendezvous(env, rendezvous_timeout_s)
        dist.init_process_group(backend=platform.backend(),
                                init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
                                world_size=env.world_size, timeout=datetime.timedelta(minutes=timeout_minutes))
    import_deepspeed().init_distributed(dist_backend=dist.get_backend(), dist_init_required=False,
                                        verbose=False)
    return env


def check_fp16_support(cfg) -> None:
    """DeepSpeed refuses fp16 where its accelerator has none ("Type fp16 is not supported on your device"): one
    line before any model loads. Its CPU accelerator has fp16 only where oneDNN does (not on common CPUs)."""
    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    keys = ["student.params_dtype"] if cfg.student.params_dtype == "float16" else []
    if cfg.loads_teacher and cfg.deepspeed.teacher_zero3 and cfg.teacher.params_dtype == "float16":
        keys.append("teacher.params_dtype")  # a replicated teacher is plain torch; a ZeRO-3 one is DeepSpeed's
    accelerator = get_accelerator()
    if keys and not accelerator.is_fp16_supported():
        raise UserError(f"{keys[0]}=float16 needs a GPU: DeepSpeed's {accelerator.device_name()} accelerator has no "
                        f"fp16 on this machine (DeepSpeed refuses it); use bfloat16 or float32")
