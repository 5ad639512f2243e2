"""The DeepSpeed engine (mgsr_megatron/deepspeed_engine, issue 17 first slice).

One torchrun launch of 2 ranks (tests/dist/deepspeed_checks.py) trains tiny random HF llama models and
checks: ZeRO-1/2/3 give the same losses; a ZeRO-3-partitioned teacher the same as a replicated one; an
offloaded optimizer (torch AdamW, CPU) the same; ZeRO-1 equals an independent plain PyTorch loop; the
ZeRO-3 export loads in transformers with the engine's logits; SIGUSR1 at step 3 -> checkpoint -> exit 115,
`--resume auto` continues exactly; bf16 keeps fp32 master weights; `mgsr train --deepspeed ds.json` works;
the same HF weights converted (conversion.import_hf) and trained by the Megatron engine (Trainer, TP=1, DP=2)
give the DeepSpeed engine's logits and, over 6 steps with clipping off, its loss, sft, dac_kl, span and gradient
norm (relative 1e-4); fp16 (DeepSpeed's CPU accelerator told it has fp16) follows fp32 and skips an overflowing
step in student and ClipNet alike; 6 ground-truth steps from a teacher cache (`mgsr cache-teacher`'s write_cache
on the converted teacher) give the online teacher's losses without loading the teacher. Then two `mgsr train`
launches: one SIGKILLed while it writes a checkpoint, one `--resume auto` whose steps equal the launch's
uninterrupted run.
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
CHECKS = ("zero_stages_agree", "teacher_zero3_matches_replicated", "offload_optimizer_cpu", "offload_params_zero3_cpu",
          "parity_with_plain_pytorch_loop", "export_loads_in_transformers", "preempt_resume_exact",
          "bf16_fp32_master_weights", "fp16_zero2_matches_fp32", "fp16_overflow_step_skipped",
          "teacher_cache_matches_online", "cli_deepspeed_json", "parity_with_megatron_engine")
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


# ------------------------------------------------------------------------------------------ fp16
def _fp16_config(**optimizer):
    from mgsr_megatron.config import Config

    cfg = Config()
    cfg.deepspeed.enabled, cfg.deepspeed.zero_stage = True, 2
    cfg.student.load, cfg.teacher.load = "student_hf", "teacher_hf"
    cfg.student.params_dtype = cfg.teacher.params_dtype = "float16"
    for key, value in optimizer.items():
        setattr(cfg.optimizer, key, value)
    return cfg


def _one_line_error(call, *args) -> str:
    from mgsr_megatron.errors import UserError

    with pytest.raises(UserError) as info:
        call(*args)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def test_fp16_deepspeed_json():
    """params_dtype float16 -> DeepSpeed's fp16 section from the Megatron engine's loss-scale keys, which
    DeepSpeed's own config model reads back (dynamic from initial_loss_scale, static with loss_scale)."""
    from deepspeed.runtime.precision_config import get_float16_config

    from mgsr_megatron.deepspeed_engine import settings

    cfg = _fp16_config()
    settings.validate_settings(cfg)
    ds = settings.engine_config(cfg, dp=2)
    assert ds["bf16"] == {"enabled": False}
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0.0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}  # DeepSpeed's defaults = the config's
    assert settings.teacher_config(cfg, dp=2)["fp16"] == {"enabled": True}

    cfg = _fp16_config(initial_loss_scale=4096.0, loss_scale_window=500, hysteresis=1, min_loss_scale=2.0)
    parsed = get_float16_config(settings.engine_config(cfg, dp=2))
    assert parsed.enabled and parsed.loss_scale == 0 and parsed.initial_dynamic_scale() == 4096
    assert (parsed.loss_scale_window, parsed.hysteresis, parsed.min_loss_scale) == (500, 1, 2)
    parsed = get_float16_config(settings.engine_config(_fp16_config(loss_scale=128.0), dp=2))
    assert parsed.loss_scale == 128.0  # static: DeepSpeed's dynamic scaling off

    bf16 = _fp16_config()
    bf16.student.params_dtype = "bfloat16"
    assert settings.engine_config(bf16, dp=2)["fp16"] == {"enabled": False}


def test_fp16_json_agreement(tmp_path):
    """A user's DeepSpeed JSON may repeat the fp16 settings (or say "auto"), not contradict them."""
    from mgsr_megatron.deepspeed_engine import settings

    cfg = _fp16_config(initial_loss_scale=2.0 ** 12)
    cfg.deepspeed.config_json = str(tmp_path / "ds.json")
    (tmp_path / "ds.json").write_text(json.dumps({"fp16": {"enabled": True, "initial_scale_power": 12,
                                                           "loss_scale": "auto"}, "bf16": {"enabled": False}}))
    assert settings.engine_config(cfg, dp=2)["fp16"]["initial_scale_power"] == 12
    (tmp_path / "ds.json").write_text(json.dumps({"fp16": {"enabled": True, "loss_scale_window": 100}}))
    err = _one_line_error(settings.validate_settings, cfg)
    assert "fp16.loss_scale_window=100 disagrees with optimizer.loss_scale_window=1000" in err, err
    (tmp_path / "ds.json").write_text(json.dumps({"fp16": {"enabled": True}}))
    cfg.student.params_dtype, cfg.optimizer.initial_loss_scale = "bfloat16", None
    err = _one_line_error(settings.validate_settings, cfg)
    assert "fp16.enabled=true disagrees with student.params_dtype (implies false)" in err, err


def test_fp16_bad_settings_are_one_line():
    from mgsr_megatron.deepspeed_engine import settings

    err = _one_line_error(settings.validate_settings, _fp16_config(initial_loss_scale=1000.0))
    assert err.startswith("optimizer.initial_loss_scale=1000.0 is not a power of two"), err
    err = _one_line_error(settings.validate_settings, _fp16_config(loss_scale=-1.0))
    assert err.startswith("optimizer.loss_scale=-1.0 must be positive"), err
    err = _one_line_error(settings.validate_settings, _fp16_config(min_loss_scale=0.5))
    assert err.startswith("optimizer.min_loss_scale=0.5: DeepSpeed's fp16.min_loss_scale is an integer"), err
    cfg = _fp16_config(loss_scale=1024.0)
    cfg.student.params_dtype = "bfloat16"
    err = _one_line_error(settings.validate_settings, cfg)
    assert "optimizer.loss_scale / initial_loss_scale" in err and "fp16 only" in err, err


def test_fp16_needs_an_fp16_accelerator(monkeypatch):
    """DeepSpeed's CPU accelerator has no fp16 here (DeepSpeed raises "Type fp16 is not supported on your
    device" in initialize): one line naming the key, before any model loads."""
    from deepspeed.accelerator import get_accelerator

    from mgsr_megatron.deepspeed_engine import runtime

    accelerator = get_accelerator()
    cfg = _fp16_config()
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: False)
    err = _one_line_error(runtime.check_fp16_support, cfg)
    assert err.startswith("student.params_dtype=float16 needs a GPU: DeepSpeed's"), err
    cfg.student.params_dtype, cfg.deepspeed.teacher_zero3 = "float32", True
    err = _one_line_error(runtime.check_fp16_support, cfg)
    assert err.startswith("teacher.params_dtype=float16 needs a GPU"), err
    cfg.deepspeed.teacher_zero3 = False  # a replicated teacher is plain torch: fp16 runs on CPU too
    runtime.check_fp16_support(cfg)
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: True)
    runtime.check_fp16_support(_fp16_config())


def test_fp16_loss_scaler_loads_from_checkpoint(tmp_path):
    """DeepSpeed pickles fp16's DynamicLossScaler (current scale, hysteresis, iteration) into the ZeRO optimizer
    state and restores it in load_checkpoint: the engine's weights_only loading allows it."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from mgsr_megatron.deepspeed_engine.checkpoint import _deepspeed_loading

    scaler = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    scaler.cur_scale, scaler.cur_hysteresis, scaler.cur_iter = 2.0 ** 13, 1, 7
    torch.save({"loss_scaler": scaler, "dynamic_loss_scale": True}, tmp_path / "optim.pt")
    with _deepspeed_loading():
        loaded = torch.load(tmp_path / "optim.pt")["loss_scaler"]
    assert isinstance(loaded, DynamicLossScaler)
    assert (loaded.cur_scale, loaded.cur_hysteresis, loaded.cur_iter) == (2.0 ** 13, 1, 7)


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


# ------------------------------------------------------------------------------------------ mpirun
def test_mpirun_launch_matches_torchrun(launch, tmp_path):
    """`mpirun -np 2 python -m mgsr_megatron train` (MPICH's hydra from the mpich wheel: ranks from PMI_RANK /
    PMI_SIZE, the rendezvous address broadcast through mpi4py) runs the DeepSpeed engine with the losses of the
    launch's torchrun ZeRO-3 run (relative 1e-5)."""
    pytest.importorskip("mpi4py")
    from tests.dist.deepspeed_checks import assert_close, base_config, losses_of
    from tests.test_mpi import _mpirun

    expected = {int(step): loss for step, loss in launch["results"]["losses"].get("zero3", {}).items()}
    assert sorted(expected) == [1, 2, 3, 4, 5, 6], f"the launch's ZeRO-3 run is missing:\n{launch['log'][-4000:]}"
    cfg = base_config(launch["root"], "mpirun", zero_stage=3)
    cfg.logging.output_dir = str(tmp_path / "mpirun")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK",
                                                                     "SLURM_", "PMI_", "OMPI_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCH_EXTENSIONS_DIR=str(launch["extensions"]))
    proc = subprocess.run([_mpirun(), "-np", "2", sys.executable, "-m", "mgsr_megatron", "train", "--config",
                           str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_close(losses_of(cfg.logging.output_dir), expected, "mpirun vs torchrun (ZeRO-3)")


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
    expect("never generates", _config(root, mgsr={"data_schedule": "off_policy", "max_new_tokens": 8},
                                      schedule={"eval_interval": 0}))
    expect("no_cache: no manifest.json",
           _config(root, teacher={"load": str(root / "teacher_hf"), "cache": str(root / "no_cache")}))
    expect("deepspeed.offload_params=true needs deepspeed.zero_stage=3",
           _config(root, deepspeed={"offload_params": True}))
    expect("deepspeed.zero_stage': 4 is not one of 1, 2, 3", _config(root, deepspeed={"zero_stage": 4}))
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():  # DeepSpeed's CPU accelerator: fp16 only with oneDNN's
        expect("student.params_dtype=float16 needs a GPU", _config(root, student={"params_dtype": "float16"}))
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
