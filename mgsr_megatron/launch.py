"""Start local worker processes when a command that needs N ranks is run as a single process.

`mgsr demo` on a laptop or CI box is one process; it re-launches itself under torchrun with N local
workers. Under torchrun, srun or mpirun (world size already set) it runs in place.
"""

from __future__ import annotations

import os
import subprocess
import sys

from mgsr_megatron.parallel import discover_env


def already_distributed() -> bool:
    return discover_env().world_size > 1 or "RANK" in os.environ


def relaunch_local(nproc: int, argv: list[str]) -> int:
    """Run `python -m mgsr_megatron <argv>` under torchrun with `nproc` local workers; return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "mgsr_megatron", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)
