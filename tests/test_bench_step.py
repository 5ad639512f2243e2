"""tools/bench_step.py runs end to end at toy sizes and prints its figures, with the per-phase breakdown of
an SCRG step (the numbers themselves are measurements, not test assertions: see README "Measured
figures")."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_step_runs_and_reports_a_ratio(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_step.py"), "--vocab", "512", "--seq", "32", "--micro-batch", "2",
         "--student-layers", "1", "--student-hidden", "64", "--teacher-layers", "1", "--teacher-hidden", "64",
         "--steps", "1", "--generate"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "MASTER_PORT": "29571", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ratio = re.search(r"ratio mgsr / baseline: ([0-9.]+)", result.stdout)
    assert ratio and float(ratio.group(1)) > 0, result.stdout
    assert re.search(r"throughput: [0-9,]+ tokens/s \(mgsr\)", result.stdout), result.stdout
    # the phase breakdown of both steps (--generate: every MGSR step is an SCRG step)
    for phase in ("data", "generation", "teacher_forward", "student_forward_backward", "loss_forward",
                  "loss_backward", "optimizer", "bookkeeping"):
        assert re.search(rf"^{phase} +[0-9.]+ +[0-9.]+$", result.stdout, re.M), (phase, result.stdout)
    assert re.search(r"SCRG steps: teacher forward re-run for [0-9.]+ of the generated rows", result.stdout)
