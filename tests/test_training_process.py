"""Whole training processes: SIGKILL + resume is exact, SIGTERM saves and exits with the documented
code, a save interrupted half-way leaves the previous checkpoint loadable, bad settings fail early."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mgsr_megatron.training.trainer import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from mgsr_megatron.training.smoke import build_files

    root = tmp_path_factory.mktemp("train_data")
    build_files(root)
    return root


def write_config(data_root: Path, run_dir: Path, **schedule) -> Path:
    model = dict(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                 vocab_size=256, make_vocab_size_divisible_by=64, max_position_embeddings=48)
    cfg = {
        "student": model, "teacher": model,
        "data": {"train_path": str(data_root / "data.train"), "tokenizer": str(data_root / "tok.model")},
        "mgsr": {"w_dac": 0.0, "w_span": 0.0, "data_schedule": "ground_truth"},
        "schedule": {"train_iters": 40, "global_batch_size": 4, "micro_batch_size": 2, "seq_length": 40,
                     "lr_warmup_iters": 2, **schedule},
        "optimizer": {"lr": 0.01},
        "checkpoint": {"save": str(run_dir / "checkpoints"), "save_interval": 4, "keep_last": 3},
        "logging": {"output_dir": str(run_dir), "log_interval": 1, "progress_bar": False, "tensorboard": False},
    }
    path = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mgsr_megatron", "train", "--config", str(config), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill, then after the resume) keeps the later value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]
    return out


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a launched job and every process under it, as a node failure or a scheduler's cgroup kill
    does: torchrun starts each rank in a session of its own, so killing torchrun's process group alone
    would leave the ranks training (and Megatron's async checkpoint writer starts a Manager process)."""
    import psutil  # a DeepSpeed dependency

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            os.killpg(os.getpgid(p.pid), signal.SIGKILL)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(procs, timeout=60)


def kill_then_resume(cmd, config: Path, run_dir: Path, first_save_timeout: float, resume_timeout: float,
                     kill_after=None, kill=kill_job) -> str:
    """Start `cmd(config)`, `kill` it (default: SIGKILL of every process of the job) once the first
    checkpoint exists, run `cmd(config, "--resume", "auto")` to the end; returns the checkpoint it resumed
    from. Optional: `kill_after(name)` -> bool waits instead until `latest` names a checkpoint it accepts."""
    proc = subprocess.Popen(cmd(config), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    wait_for(lambda: (latest.is_file() and (kill_after is None or kill_after(latest.read_text().strip())))
             or proc.poll() is not None, first_save_timeout,
             "the first checkpoint" if kill_after is None else "the checkpoint to kill after")
    assert proc.poll() is None, "the job ended before it could be killed: nothing was resumed"
    kill(proc)
    resumed_from = (run_dir / "checkpoints" / "latest").read_text().strip()
    subprocess.run(cmd(config, "--resume", "auto"), env=ENV, check=True, cwd=ROOT, capture_output=True,
                   timeout=resume_timeout)
    return resumed_from


def test_sigkill_then_resume_matches_uninterrupted_run(data_root, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(train_cmd(write_config(data_root, reference_dir)), env=ENV, check=True, cwd=ROOT,
                   capture_output=True, timeout=600)
    resumed_from = kill_then_resume(train_cmd, write_config(data_root, killed_dir), killed_dir, 300, 600)
    expected, actual = losses(reference_dir), losses(killed_dir)
    assert sorted(actual) == sorted(expected) == list(range(1, 41))
    assert actual == expected, f"resumed from {resumed_from}: losses differ"


def test_sigterm_saves_and_exits_with_documented_code(data_root, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(data_root, run_dir, train_iters=100000)
    proc = subprocess.Popen(train_cmd(config, "--checkpoint.save_interval=0"), env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 300, "3 training steps")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    last_step = max(losses(run_dir))
    assert latest == f"iter_{last_step:07d}", (latest, last_step)
    assert (run_dir / "checkpoints" / latest / "common.pt").is_file()


CRASHING_SAVE = """
import sys, torch
from mgsr_megatron.config import load_config
from mgsr_megatron.training.checkpoint import find_resume, load_checkpoint, save_checkpoint
from mgsr_megatron.training.run import build_trainer

cfg = load_config(sys.argv[1])
trainer = build_trainer(cfg)
trainer.train_step(); trainer.train_step()
save_checkpoint(trainer, cfg.checkpoint.save)                     # iter_0000002: complete
trainer.train_step()
real_save = torch.save
def crash(obj, path, *a, **k):
    if str(path).endswith("common.pt"):
        raise KeyboardInterrupt("simulated crash half-way through the save")
    return real_save(obj, path, *a, **k)
torch.save = crash
try:
    save_checkpoint(trainer, cfg.checkpoint.save)                 # iter_0000003: interrupted
except KeyboardInterrupt:
    pass
torch.save = real_save
cfg.checkpoint.resume = "auto"
again = build_trainer(cfg)
load_checkpoint(again, find_resume(cfg))
print("RESUMED_STEP", again.step)
"""


def test_interrupted_save_keeps_previous_checkpoint(data_root, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(data_root, run_dir)
    result = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(config)], env=ENV, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000002"
    assert not (checkpoints / "iter_0000003").exists()
    assert "RESUMED_STEP 2" in result.stdout


@pytest.mark.parametrize("override,message", [
    ("--schedule.global_batch_size=3", "global_batch_size=3 is not a multiple of schedule.micro_batch_size=2"),
    ("--schedule.seq_length=64", "seq_length=64 exceeds teacher.max_position_embeddings=48"),
    ("--data.train_path=/no/such", "/no/such.json not found"),
    ("--student.vocab_size=300", "has 256 tokens but student.vocab_size=300"),
    ("--mgsr.w_dac=1.0", "teacher.load is not set"),
])
def test_bad_training_settings_fail_with_one_line(data_root, tmp_path, override, message):
    config = write_config(data_root, tmp_path / "run")
    extra = [override] + (["--teacher.vocab_size=300"] if "vocab_size" in override else [])
    result = subprocess.run(train_cmd(config, *extra), env=ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("mgsr: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_resume_with_changed_global_batch_is_refused(data_root, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(data_root, run_dir, train_iters=4)
    subprocess.run(train_cmd(config), env=ENV, check=True, cwd=ROOT, capture_output=True, timeout=600)
    result = subprocess.run(train_cmd(config, "--resume", "auto", "--schedule.global_batch_size=8",
                                      "--schedule.train_iters=8"),
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "the run used schedule.global_batch_size=4, this run has 8" in result.stderr
