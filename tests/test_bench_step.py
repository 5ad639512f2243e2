"""tools/bench_step.py runs end to end at toy sizes and prints its figures in one run: the MGSR/baseline
ratio, the teacher-cache ratio and the SCRG logit-reuse ratio, with per-phase breakdowns (the numbers
themselves are measurements, not test assertions: see README "Measured figures")."""

import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bench_step_runs_and_reports_a_ratio(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_step.py"), "--vocab", "512", "--seq", "32", "--micro-batch", "2",
         "--student-layers", "1", "--student-hidden", "64", "--teacher-layers", "1", "--teacher-hidden", "64",
         "--steps", "1", "--warmup", "1", "--scrg-corrected", "0.5"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ratio = re.search(r"ratio mgsr / baseline: ([0-9.]+)", result.stdout)
    assert ratio and float(ratio.group(1)) > 0, result.stdout
    assert re.search(r"throughput: [0-9,]+ tokens/s \(mgsr\)", result.stdout), result.stdout
    assert re.search(r"ratio online teacher / cache: [0-9.]+", result.stdout), result.stdout
    assert re.search(r"ratio SCRG without / with logit reuse: [0-9.]+", result.stdout), result.stdout
    assert re.search(r"mgsr.scrg_delta [0-9.e-]+ \(calibrated", result.stdout), result.stdout
    # the phase breakdowns: baseline / mgsr / mgsr cached, then the SCRG steps (with generation)
    for phase in ("data", "teacher_forward", "student_forward_backward", "loss_forward", "loss_backward",
                  "optimizer", "bookkeeping"):
        assert re.search(rf"^{phase} +[0-9.]+ +[0-9.]+ +[0-9.]+$", result.stdout, re.M), (phase, result.stdout)
    for phase in ("generation", "teacher_scoring", "cpu_user", "cpu_system"):
        assert re.search(rf"^{phase} +[0-9.]+ +[0-9.]+$", result.stdout, re.M), (phase, result.stdout)
    assert re.search(r"the teacher.s work per step .* [0-9.]+x less", result.stdout), result.stdout


def test_timed_rotation_alternates_the_order_of_the_variants():
    """Every other round runs the variants in reverse: neither is always the one run right after the other
    (a step's cost can depend on what ran before it: the heap, the caches)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "tools" / "bench_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    results, seconds = bench.timed_rotation([lambda: calls.append("a") or {}, lambda: calls.append("b") or {}],
                                            steps=4, warmup=1)
    assert "".join(calls) == "ab" + "ab" + "ba" + "ab" + "ba"
    assert [len(r) for r in results] == [4, 4] and [len(s) for s in seconds] == [4, 4]
