"""The DeepSpeed engine (mgsr_megatron/deepspeed_engine, issue 17 first slice).

One torchrun launch of 2 ranks (tests/dist/deepspeed_checks.py) trains tiny random HF llama models and
checks: ZeRO-1/2/3 give the same losses; a ZeRO-3-partitioned teacher the same as a replicated one; an
offloaded optimizer (torch AdamW, CPU) the same; ZeRO-1 equals an independent plain PyTorch loop; the
ZeRO-3 export loads in transformers with the engine's logits; SIGUSR1 at step 3 -> checkpoint -> exit 115,
`--resume auto` continues exactly; bf16 keeps fp32 master weights; `mgsr train --deepspeed ds.json` works;
the same HF weights converted (conversion.import_hf) and trained by the Megatron engine (Trainer, TP=1, DP=2)
give the DeepSpeed engine's logits and, over 6 steps with clipping off, its loss, sft, dac_kl, span and gradient
norm (relative 1e-4). Then two `mgsr train` launches: one SIGKILLed while it writes a checkpoint, one
`--resume auto` whose steps equal the launch's uninterrupted run.
The launches run with TORCH_EXTENSIONS_DIR set to an empty folder, which must stay empty: no DeepSpeed op
is compiled. Bad input (15 kinds) is one line, before any process group or model exists (in this process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ("zero_stages_agree", "teacher_zero3_matches_replicated", "offload_optimizer_cpu",
          "parity_with_plain_pytorch_loop", "export_loads_in_transformers", "preempt_resume_exact",
          "bf16_fp32_master_weights", "cli_deepspeed_json", "parity_with_megatron_engine")
DIST_CHECKS = ROOT / "tests" / "dist" / "deepspeed_checks.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
            "--rdzv-endpoint=localhost:0"]


def run_checks_launch(script: Path, base: Path) -> dict:
    """One 2-rank torchrun launch of a checks script (`--root base/root --out base/results.json`) with an
    empty torch extensions folder: {"results", "log", "seconds", "extensions", "root"}."""
    extensions = base / "torch_extensions"
    out = base / "results.json"
    cmd = [*TORCHRUN, str(script), "--root", str(base / "root"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TORCH_EXTENSIONS_DIR": str(extensions)}
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout[-20000:] + proc.stderr[-20000:]
    except subprocess.TimeoutExpired as exc:
        log = f"launch timed out after 600 s (a lockstep hang?)\n{exc.stdout}"
    results = json.loads(out.read_text()) if out.exists() else {"checks": {}}
    return {"results": results, "log": log, "seconds": time.time() - start, "extensions": extensions,
            "root": base / "root"}


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    return run_checks_launch(DIST_CHECKS, tmp_path_factory.mktemp("deepspeed"))


@pytest.mark.parametrize("name", CHECKS)
def test_distributed_check(launch, name):
    record = launch["results"]["checks"].get(name)
    assert record is not None, f"check {name} did not run; launch log:\n{launch['log'][-6000:]}"
    assert record["ok"], record["error"]


def test_nothing_was_compiled(launch):
    """The shared-memory op (150 s+ here) and cpu_adam would land in TORCH_EXTENSIONS_DIR."""
    extensions = launch["extensions"]
    built = sorted(p.name for p in extensions.iterdir()) if extensions.exists() else []
    assert built == [], f"DeepSpeed compiled {built} under {extensions}"
    assert "Building extension" not in launch["log"] and "ninja" not in launch["log"].lower()
    assert launch["seconds"] < 150, f"the launch took {launch['seconds']:.0f} s"


def test_shm_op_is_switched_off():
    from mgsr_megatron.deepspeed_engine.runtime import SHM_OP, import_deepspeed

    deepspeed = import_deepspeed()
    from deepspeed.comm.torch import build_shm_op

    assert deepspeed.ops.__compatible_ops__[SHM_OP] is False
    assert build_shm_op() is None  # what TorchBackend.__init__ calls: no build, no load


def test_stale_extension_lock_is_one_line(tmp_path, monkeypatch):
    from mgsr_megatron.deepspeed_engine.runtime import CPU_ADAM_OP, check_extension_lock
    from mgsr_megatron.errors import UserError

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    check_extension_lock(CPU_ADAM_OP)  # nothing there: fine
    (tmp_path / CPU_ADAM_OP).mkdir()
    (tmp_path / CPU_ADAM_OP / "lock").write_text("")
    with pytest.raises(UserError) as info:
        check_extension_lock(CPU_ADAM_OP)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / CPU_ADAM_OP / "lock") in message and "delete" in message


# ------------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_mid_checkpoint_then_resume_auto(launch, tmp_path):
    """`mgsr train` (torchrun, 2 ranks, ZeRO-3, a checkpoint every 2 steps; the launch's uninterrupted 6-step
    ZeRO-3 run in a YAML config) is SIGKILLed, every process of it, while it writes the step-6 checkpoint: after
    the step-4 checkpoint is complete, DeepSpeed's files of step 6 in `.iter_0000006.tmp`, nothing renamed (a
    test-only hook holds rank 0 there: deepspeed_checks.py --hold-in-save). `latest` still names step 4, and
    `mgsr train --resume auto` loads it, ignores the partial directory, and its steps 5-6 equal the uninterrupted
    run's (relative 1e-5, fp32)."""
    from tests.dist.deepspeed_checks import HOLDING, assert_close, base_config, losses_of
    from tests.test_training_process import kill_job

    expected = {int(step): loss for step, loss in launch["results"]["losses"].get("zero3", {}).items()}
    assert sorted(expected) == [1, 2, 3, 4, 5, 6], f"the launch's ZeRO-3 run is missing:\n{launch['log'][-4000:]}"
    cfg = base_config(launch["root"], "killed", zero_stage=3)
    save = tmp_path / "checkpoints"
    cfg.checkpoint.save, cfg.checkpoint.save_interval = str(save), 2
    cfg.logging.output_dir = str(tmp_path / "killed")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "TORCH_EXTENSIONS_DIR": str(launch["extensions"])}
    partial = save / ".iter_0000006.tmp"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([*TORCHRUN, str(DIST_CHECKS), "--hold-in-save", "6", "train", "--config", str(config)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not (partial / HOLDING).exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            assert (partial / HOLDING).exists(), f"the run never reached the step-6 checkpoint (exit {proc.poll()}):" \
                                                 f"\n{(tmp_path / 'killed.log').read_text()[-4000:]}"
            assert (save / "latest").read_text().strip() == "iter_0000004"
        finally:
            kill_job(proc)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    assert (save / "latest").read_text().strip() == "iter_0000004"
    assert (save / "iter_0000004" / "manifest.json").is_file() and not (save / "iter_0000006").exists()
    assert (partial / "engine").is_dir() and not (partial / "manifest.json").exists()  # killed half-way
    assert_close(losses_of(cfg.logging.output_dir), expected, "the killed run (steps 1-6) vs uninterrupted")

    resumed_dir = tmp_path / "resumed"
    proc = subprocess.run([*TORCHRUN, "-m", "mgsr_megatron", "train", "--config", str(config), "--resume", "auto",
                           f"--logging.output_dir={resumed_dir}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"from {save / 'iter_0000004'}" in proc.stdout, proc.stdout[-3000:]
    assert_close(losses_of(resumed_dir), {5: expected[5], 6: expected[6]}, "resumed steps 5-6 vs uninterrupted")
    assert (save / "latest").read_text().strip() == "iter_0000006" and not partial.exists()
    extensions = launch["extensions"]
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.iterdir())


# ------------------------------------------------------------------------------------------ bad input
def _config(root: Path, **sections) -> dict:
    cfg = {
        "deepspeed": {"enabled": True, "zero_stage": 2},
        "student": {"load": str(root / "student_hf")}, "teacher": {"load": str(root / "teacher_hf")},
        "data": {"train_path": str(root / "data.train"), "tokenizer": str(root / "tok.model"),
                 "max_prompt_length": 24},
        "mgsr": {"data_schedule": "ground_truth", "k_band": 32, "k_feat": 16},
        "schedule": {"seq_length": 40, "micro_batch_size": 2, "global_batch_size": 8, "train_iters": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _bad_dir(tmp_path: Path, name: str, config: dict | None, weights: bool = True) -> str:
    path = tmp_path / name
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return str(path)


def _error_line(tmp_path, monkeypatch, capsys, cfg: dict, extra: tuple = ()) -> str:
    """Run `mgsr train` in this process; it must stop with exit 2 and one line, before any process group or
    model exists."""
    from mgsr_megatron import cli
    from mgsr_megatron.deepspeed_engine import models, runtime

    def unreachable(*_args, **_kwargs):
        raise AssertionError("bad input reached distributed start-up / model loading")

    monkeypatch.setattr(runtime, "init_distributed", unreachable)
    monkeypatch.setattr(models, "load_model", unreachable)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--config", str(path), *extra])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, err
    assert err.startswith("mgsr: error: ") and "\n" not in err, err
    return err


def test_bad_inputs_are_one_line(launch, tmp_path, monkeypatch, capsys):
    root = launch["root"]
    assert (root / "student_hf" / "config.json").is_file(), "the launch did not build the setup"
    student_hf = json.loads((root / "student_hf" / "config.json").read_text())

    def expect(fragment: str, cfg: dict, extra: tuple = ()) -> None:
        err = _error_line(tmp_path, monkeypatch, capsys, cfg, extra)
        assert fragment in err, err

    empty = _bad_dir(tmp_path, "empty", None, weights=False)
    expect("no config.json, not a Hugging Face model directory", _config(root, student={"load": empty}))
    bert = _bad_dir(tmp_path, "bert", {"architectures": ["BertForMaskedLM"], "vocab_size": 256})
    expect("architecture BertForMaskedLM is not supported", _config(root, teacher={"load": bert}))
    small = _bad_dir(tmp_path, "small_vocab", {**student_hf, "vocab_size": 200})
    expect("vocab_size=200 in config.json is smaller than tokenizer", _config(root, teacher={"load": small}))
    no_weights = _bad_dir(tmp_path, "no_weights", student_hf, weights=False)
    expect("no weights", _config(root, student={"load": no_weights}))
    expect("data-parallel only", _config(root, parallel={"tensor_model_parallel_size": 2}))
    expect("SCRG / on-policy generation under DeepSpeed is not implemented yet for off_policy",
           _config(root, mgsr={"data_schedule": "off_policy"}))
    expect("deepspeed.offload_params=true needs deepspeed.zero_stage=3",
           _config(root, deepspeed={"offload_params": True}))
    expect("deepspeed.zero_stage': 4 is not one of 1, 2, 3", _config(root, deepspeed={"zero_stage": 4}))
    expect("float16 is not supported by the deepspeed engine", _config(root, student={"params_dtype": "float16"}))
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    expect("train_micro_batch_size_per_gpu=4 disagrees with schedule.micro_batch_size=2", _config(root),
           ("--deepspeed", str(ds_json)))
    ds_json.write_text(json.dumps({"bf16": {"enabled": True}}))
    expect("bf16.enabled=true disagrees with student.params_dtype", _config(root), ("--deepspeed", str(ds_json)))
    ds_json.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    expect("'optimizer' is set", _config(root), ("--deepspeed", str(ds_json)))
    ds_json.write_text("{ not json")
    expect("invalid JSON", _config(root), ("--deepspeed", str(ds_json)))
    expect("deepspeed.export_dir=", _config(root, deepspeed={"export_dir": str(root / "student_hf")}))
    saved = root / "runs" / "resume" / "checkpoints"  # the launch's ZeRO-3 run on 2 ranks
    expect("the run used deepspeed.zero_stage=3, this run has 2",
           _config(root, checkpoint={"save": str(saved), "resume": "auto"}))
