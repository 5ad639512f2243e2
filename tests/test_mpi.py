"""`mpirun -np 2 python -m mgsr_megatron train` (MPICH's hydra from the `mpich` wheel; ranks from
PMI_RANK/PMI_SIZE, the rendezvous address broadcast through mpi4py) gives the same losses as torchrun."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_training_process import ENV, data_root, losses, train_cmd, write_config  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = Path(sys.executable).parent / "mpirun"


def _mpirun() -> str:
    if MPIRUN.is_file():
        return str(MPIRUN)
    found = shutil.which("mpirun")
    if not found:
        pytest.skip("no mpirun (pip install mpich mpi4py)")
    return found


def test_mpirun_matches_torchrun(data_root, tmp_path):  # noqa: F811
    pytest.importorskip("mpi4py")
    overrides = ["--parallel.tensor_model_parallel_size=2", "--checkpoint.save_interval=0"]
    env = {k: v for k, v in ENV.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK",
                                                             "SLURM_", "PMI_", "OMPI_"))}
    mpi_dir, torchrun_dir = tmp_path / "mpi", tmp_path / "torchrun"
    mpi = subprocess.run([_mpirun(), "-np", "2", *train_cmd(write_config(data_root, mpi_dir, train_iters=3)),
                          *overrides], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert mpi.returncode == 0, mpi.stdout[-2000:] + mpi.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29870",
                *train_cmd(write_config(data_root, torchrun_dir, train_iters=3))[1:], *overrides]
    result = subprocess.run(torchrun, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(mpi_dir)) == [1, 2, 3]
    assert losses(mpi_dir) == losses(torchrun_dir)


def test_mpirun_world_size_not_matching_layout_fails_early(data_root, tmp_path):  # noqa: F811
    """TP=4 on 2 MPI ranks: one line naming the constraint, before any weights are loaded."""
    pytest.importorskip("mpi4py")
    config = write_config(data_root, tmp_path / "bad", train_iters=3)
    result = subprocess.run([_mpirun(), "-np", "2", *train_cmd(config), "--parallel.tensor_model_parallel_size=4",
                             "--student.load=/nonexistent/student"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "mgsr: error: world size 2 is not a multiple of TP*PP = 4*1 = 4" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "/nonexistent/student" not in result.stderr
