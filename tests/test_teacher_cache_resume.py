"""Issue #18's acceptance: a multi-epoch run from the offline teacher cache resumes exactly after SIGKILL.

`mgsr train` (torchrun, 2 processes, DP=2) with `teacher.cache`, `mgsr.data_schedule: ground_truth`, SFT +
DAC-KL in its learned mode (w_span 0), global batch 16 over the tiny corpus's 119 ground-truth rows: an epoch
is 7 steps (the 7-row tail is skipped, data/sampler.py), so steps 1-7 are epoch 1, 8-14 epoch 2, 15-20 epoch 3.
A checkpoint every 4 steps. One run goes uninterrupted to step 20; another is SIGKILLed, every process of it
(torchrun and each rank's session: tests/test_training_process.py's kill_job; none may survive), once `latest`
(written last) names a checkpoint of the second epoch (8 or 12), then `--resume auto` runs it to the end.

Where the kill and the resume land: both AFTER the first epoch boundary (the checkpoint resumed from holds the
sampler at epoch index 1, mid-epoch), and the resumed steps STRADDLE the second boundary (14 -> 15: the third
epoch's permutation is drawn by the resumed process; its final checkpoint holds epoch index 2), both read
from the checkpoints. The losses of the steps after the checkpoint must equal the uninterrupted run's
(exactly, or to relative 1e-6). Neither run loads the teacher: the config has no teacher.load
(Config.loads_teacher is false, and a teacher load would end the run with "teacher.load is not set"), and
every step reports DAC-KL and the teacher's entropy, which then come from the cache alone.
"""

import json
import math
import os
import subprocess
import sys

import psutil
import pytest
import torch

from tests.test_training_process import ENV, ROOT, kill_job, kill_then_resume, losses, write_config

LABELLED_ROWS = 119  # rows with a response in the tiny corpus (training/smoke.py build_files): ground truth
GLOBAL_BATCH, MICRO_BATCH = 16, 4  # DP=2: two micro-batches of 4 rows per rank and step
EPOCH_STEPS = LABELLED_ROWS // GLOBAL_BATCH  # 7
TRAIN_ITERS, SAVE_INTERVAL = 20, 4

PREPARE = """
import sys
from pathlib import Path

from mgsr_megatron.training.smoke import base_config, build_files, ensure_teacher
from mgsr_megatron.training.teacher_cache import write_cache

root = Path(sys.argv[1])
build_files(root)
ensure_teacher(root)  # 2 x 64 llama, GQA 2
write_cache(base_config(root), root / "cache", None, rows_per_shard=100)  # K = 32, 3 shards
"""


@pytest.fixture(scope="module")
def cached_root(tmp_path_factory):
    """The tiny data, a teacher and its top-32 cache (`mgsr cache-teacher`'s write_cache, one process)."""
    root = tmp_path_factory.mktemp("cache_resume")
    subprocess.run([sys.executable, "-c", PREPARE, str(root)], env=ENV, cwd=ROOT, check=True, capture_output=True,
                   timeout=600)
    return root


def _flags(root) -> list[str]:
    # the teacher section describes the cached teacher (write_config's has no teacher.load: never loaded)
    return [f"--teacher.cache={root / 'cache'}", "--teacher.hidden_size=64", "--teacher.num_query_groups=2",
            "--mgsr.w_dac=1.0", "--mgsr.dac_mode=learned", "--mgsr.k_band=32", "--mgsr.k_feat=16",
            f"--checkpoint.save_interval={SAVE_INTERVAL}", "--checkpoint.keep_last=0"]


def _train_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "train"]


def _sampler(run_dir, name: str) -> dict:
    """The ground-truth sampler's state (epoch index, position in the epoch) a checkpoint holds."""
    common = torch.load(run_dir / "checkpoints" / name / "common.pt", weights_only=True)
    return common["data"]["ground_truth"]


def _kill_every_process(proc) -> None:
    """kill_job, then: the job had its ranks (not already finished) and none of its processes is left (a
    surviving rank would run the steps on by itself, and the `--resume auto` launch would find them done)."""
    job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    kill_job(proc)
    assert len(job) >= 3, f"the job had {len(job)} processes at the kill (torchrun and 2 ranks expected)"
    left = [p.pid for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes {left} of the killed job still run"


def _step(name: str) -> int:
    return int(name[len("iter_"):]) if name.startswith("iter_") and name[len("iter_"):].isdigit() else -1


def test_multi_epoch_run_from_teacher_cache_resumes_exactly_after_sigkill(cached_root, tmp_path, capsys):
    from mgsr_megatron.config import load_config

    flags = _flags(cached_root)

    def cmd(config, *more):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=0",
                "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "mgsr_megatron", "train",
                "--config", str(config), *flags, *more]

    def config(run_dir):
        return write_config(cached_root, run_dir, train_iters=TRAIN_ITERS, global_batch_size=GLOBAL_BATCH,
                            micro_batch_size=MICRO_BATCH)

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    cfg = load_config(config(reference_dir), flags)
    assert cfg.teacher.load is None and cfg.needs_teacher and not cfg.loads_teacher
    assert (cfg.mgsr.data_schedule, cfg.mgsr.dac_mode, cfg.mgsr.w_span) == ("ground_truth", "learned", 0.0)

    cpu_before = os.times()
    subprocess.run(cmd(config(reference_dir)), env=ENV, check=True, cwd=ROOT, capture_output=True, timeout=600)
    # kill after the first checkpoint of the second epoch (steps 8-14)
    resumed_from = kill_then_resume(cmd, config(killed_dir), killed_dir, 300, 600,
                                    kill_after=lambda name: _step(name) > EPOCH_STEPS, kill=_kill_every_process)
    cpu = sum(os.times()[2:4]) - sum(cpu_before[2:4])
    resumed = _step(resumed_from)
    assert EPOCH_STEPS < resumed <= 2 * EPOCH_STEPS, f"killed after {resumed_from}: not a second-epoch checkpoint"

    # the killed run logged steps 1..k (k >= the checkpoint's step), the resumed one exactly the steps after it
    steps = [row["step"] for row in _train_rows(killed_dir)]
    after = list(range(resumed + 1, TRAIN_ITERS + 1))
    before = steps[:len(steps) - len(after)]
    assert steps[len(before):] == after and before == list(range(1, len(before) + 1)) and len(before) >= resumed, \
        f"resumed from {resumed_from}: logged steps {steps}"

    expected, actual = losses(reference_dir), losses(killed_dir)
    assert sorted(actual) == sorted(expected) == list(range(1, TRAIN_ITERS + 1))
    rel = {step: abs(actual[step] - expected[step]) / abs(expected[step]) for step in expected}
    exact = sum(actual[step] == expected[step] for step in after)
    at_kill = _sampler(killed_dir, resumed_from)
    with capsys.disabled():
        print(f"\n[teacher cache resume] killed after {resumed_from} (epoch index {at_kill['epoch']}, position "
              f"{at_kill['position']}), resumed steps {after[0]}-{after[-1]}: {exact}/{len(after)} losses "
              f"identical, max rel diff {max(rel[step] for step in after):.1e}; child CPU {cpu:.0f} s")
    assert all(math.isfinite(actual[step]) for step in after)
    assert max(rel.values()) <= 1e-6, f"resumed from {resumed_from}: relative loss differences {rel}"

    # the teacher signal of every step of both runs comes from the cache
    for row in _train_rows(reference_dir) + _train_rows(killed_dir):
        assert row["source"] == "ground_truth" and row["dac_kl"] > 0 and row["teacher_entropy"] > 0, row

    # where the kill and the resume land, read off the checkpoints' sampler states: the checkpoint resumed
    # from mid-way through the second epoch, the end in the third (the same state as the uninterrupted run's)
    assert at_kill["epoch"] == 1 and 0 < at_kill["position"] < LABELLED_ROWS, at_kill
    final = f"iter_{TRAIN_ITERS:07d}"
    assert _sampler(killed_dir, final) == _sampler(reference_dir, final)
    assert _sampler(killed_dir, final)["epoch"] == 2
