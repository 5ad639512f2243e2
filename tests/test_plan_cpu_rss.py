"""`mgsr plan --device cpu` against the peak RSS that `mgsr train` logs (metrics.jsonl `mem_gib`,
platform.peak_memory_bytes: the process's ru_maxrss on CPU) for the tiny example (examples/tiny/config.yaml,
its own layout: 2 processes, TP=2), within 15%.

`python -m tests.test_plan_cpu_rss setup DIR` writes a small demo corpus (400 rows), the demo's
512-token tokenizer and two (non-random) teacher checkpoints, the example's 4x256 one and a minimal one;
`python -m tests.test_plan_cpu_rss runtime DIR` then measures planner.CPU_RUNTIME_BYTES (see `runtime`).

Measured (2 cores, 2026-12-05): runtime 396.0 - 1.5 = 394.5 MiB; the tiny example's peak RSS
0.408-0.409 GiB against the plan's 0.401 GiB (-2%). The models' share of the example is small: plan
16 MiB (15 MiB above the minimal models' 1.5 MiB), measured 22-23 MiB above the minimal run, so this test
mostly checks the runtime row and that nothing the planner leaves out grows with the models at this size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tiny" / "config.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
STEPS = 4


def _overrides(root: Path, run_dir: Path) -> list[str]:
    return [f"--data.train_path={root / 'data' / 'student.train'}",
            f"--data.tokenizer={root / 'data' / 'tokenizer.model'}", f"--teacher.load={root / 'teacher'}",
            f"--schedule.train_iters={STEPS}", f"--logging.output_dir={run_dir}", "--logging.log_interval=1",
            f"--checkpoint.save={run_dir / 'checkpoints'}", "--checkpoint.save_interval=0"]


MINIMAL = dict(num_layers=1, hidden_size=16, num_attention_heads=4, ffn_hidden_size=16)


def setup(root: Path) -> None:
    """Data and two teacher checkpoints (not at their random init, which the trainer refuses): the
    example's 4x256 teacher, and a minimal one (MINIMAL) for `runtime`."""
    from mgsr_megatron import parallel
    from mgsr_megatron.config import load_config
    from mgsr_megatron.demo import DEMO_SETTINGS, prepare_data
    from mgsr_megatron.training.smoke import save_perturbed_teacher

    prepare_data(root, {**DEMO_SETTINGS, "n_train": 400, "n_eval": 8})
    parallel.init_distributed()
    for name, shape in (("teacher", {}), ("teacher_minimal", MINIMAL)):
        cfg = load_config(EXAMPLE)
        for key, value in shape.items():
            setattr(cfg.teacher, key, value)
        save_perturbed_teacher(cfg.teacher, root / name)
    parallel.destroy()


def runtime(root: Path) -> None:
    """planner.CPU_RUNTIME_BYTES: the peak RSS of `mgsr train` on the tiny example (its layout, data,
    schedule: ground-truth and SCRG steps) with both models shrunk to MINIMAL (1 layer, h=16), whose
    weights, states and activations are negligible (< 1 MiB): what remains is the process itself, every
    module the trainer imports, the process groups and their threads, the data, the allocator's arenas."""
    import shutil

    run_dir = root / "run_minimal"
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends
    shrink = [f"--{model}.{key}={value}" for model in ("student", "teacher") for key, value in MINIMAL.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=0",
           "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "mgsr_megatron", "train",
           "--config", str(EXAMPLE), *_overrides(root, run_dir), *shrink,
           f"--teacher.load={root / 'teacher_minimal'}"]
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    from mgsr_megatron.config import load_config, validate
    from mgsr_megatron.planner import GIB, plan

    measured = _peak_gib(run_dir) * GIB
    planned = plan(validate(load_config(EXAMPLE, _overrides(root, run_dir) + shrink)), 2).worst().peak()
    print(f"peak RSS {measured / 2 ** 20:.1f} MiB - planned rows of the minimal models {planned / 2 ** 20:.1f} MiB"
          f" = runtime {(measured - planned) / 2 ** 20:.1f} MiB")


def _peak_gib(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["kind"] == "train"]
    assert len(train) == STEPS, train
    return max(row["mem_gib"] for row in train)


def test_plan_matches_peak_rss_of_tiny_example(tmp_path):
    from mgsr_megatron.config import load_config, validate
    from mgsr_megatron.planner import GIB, plan

    result = subprocess.run([sys.executable, "-m", "tests.test_plan_cpu_rss", "setup", str(tmp_path)], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    overrides = _overrides(tmp_path, run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=0",
           "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "mgsr_megatron", "train",
           "--config", str(EXAMPLE), *overrides]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = _peak_gib(run_dir)
    cfg = validate(load_config(EXAMPLE, overrides))
    p = plan(cfg, world_size=2, device="cpu")
    planned = p.worst().peak() / GIB
    print(f"planned {planned:.3f} GiB, measured peak RSS {measured:.3f} GiB")
    assert abs(planned - measured) <= 0.15 * measured, (planned, measured)


if __name__ == "__main__":
    {"setup": setup, "runtime": runtime}[sys.argv[1]](Path(sys.argv[2]))
