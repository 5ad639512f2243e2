import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT_S = int(os.environ.get("MGSR_DIST_TIMEOUT", "900"))


class DistResults:
    """Launches the distributed checks of one world size once per test session (lazily)."""

    def __init__(self, tmp_root: Path):
        self.tmp_root = tmp_root
        self.results: dict[int, dict] = {}
        self.logs: dict[int, str] = {}

    def get(self, world_size: int) -> dict:
        if world_size not in self.results:
            out = self.tmp_root / f"dist_{world_size}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world_size}",
                   "--master-port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
                   "-m", "tests.dist.runner", "--world-size", str(world_size), "--out", str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=LAUNCH_TIMEOUT_S)
                self.logs[world_size] = proc.stdout[-20000:] + proc.stderr[-20000:]
            except subprocess.TimeoutExpired as exc:
                self.logs[world_size] = f"launch timed out after {LAUNCH_TIMEOUT_S} s\n{exc.stdout}"
            self.results[world_size] = json.loads(out.read_text()) if out.exists() else {}
        return self.results[world_size]


@pytest.fixture(scope="session")
def dist_results(tmp_path_factory):
    return DistResults(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """training/smoke.py's tiny setup (corpus, tokenizer, indexed rows, a non-random teacher) in a fresh
    folder per test module; the module's single-process world is destroyed after it. No launcher variables
    are set: they would leak into the modules that run after it (a SLURM launch took the port)."""
    from mgsr_megatron import parallel
    from mgsr_megatron.training.smoke import build_files, ensure_teacher

    path = tmp_path_factory.mktemp("smoke")
    build_files(path)
    ensure_teacher(path)
    yield path
    parallel.destroy()
