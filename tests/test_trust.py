"""Inputs and checkpoints that can be trusted (issue 15).

* no file of a checkpoint runs code (`.metadata`, `common.pt`, byte objects inside `.distcp` shards,
  optimizer state, trainer state, RNG state) on any load path;
* damaged checkpoints and failing saves are one-line errors naming the file / path and cause;
* no self-inflicted loss (pruning, rollback, export into its input, saving over a loaded checkpoint);
* the integrity manifest; the whole-config validation.

One small SFT run (a subprocess) writes the checkpoints; most checks then run in this process (one
rank, gloo); the command-line contract (one `mgsr: error:` line, exit 2) is checked in subprocesses.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgsr_megatron.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mgsr_megatron.training.smoke import build_files
    from tests.test_training_process import write_config

    root = tmp_path_factory.mktemp("trust")
    data = root / "data"
    data.mkdir()
    build_files(data)
    config = write_config(data, root / "run", train_iters=2)
    result = subprocess.run([sys.executable, "-m", "mgsr_megatron", "train", "--config", str(config),
                             "--checkpoint.save_interval=1", "--checkpoint.keep_last=0"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = root / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    return {"root": root, "config": config, "ckpts": ckpts, "good": ckpts / "iter_0000002"}


@pytest.fixture(scope="module")
def trainer(run):
    """A one-rank trainer of the run's config, built in this process."""
    from mgsr_megatron.config import load_config
    from mgsr_megatron.training.checkpoint import load_checkpoint
    from mgsr_megatron.training.run import build_trainer

    trainer = build_trainer(load_config(run["config"]))
    load_checkpoint(trainer, run["good"])  # full optimizer state: saves are as large as the run's
    return trainer


def _copy(run, tmp_path, name="ckpt") -> Path:
    target = tmp_path / name
    shutil.copytree(run["good"], target)
    return target


def _one_line_error(fn, *names: str) -> str:
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
    return message


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ payloads
def _plant(ckpt: Path, target: str, marker: Path) -> Path:
    """Put a code-running pickle into one file of a checkpoint (keeping its manifest consistent, as an
    attacker would). Returns the file that holds it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from mgsr_megatron.models.trust import read_metadata_file, write_manifest

    payload = Payload(marker)
    if target.endswith(".metadata"):
        (ckpt / target).write_bytes(pickle.dumps(payload))
        planted = ckpt / target
    elif target.endswith(".pt"):
        torch.save({"weights": torch.zeros(2), "x": payload}, ckpt / target)
        planted = ckpt / target
    else:  # "model/distcp-bytes": a byte object inside a shard, which torch loads with weights_only=False
        directory = ckpt / target.split("/")[0]
        metadata = read_metadata_file(directory / ".metadata")
        byte_keys = {k for k, m in metadata.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)}
        index = next(i for i in metadata.storage_data if i.fqn in byte_keys)
        info = metadata.storage_data[index]
        planted = directory / info.relative_path
        import io

        buffer = io.BytesIO()
        torch.save(payload, buffer)
        offset = planted.stat().st_size
        with open(planted, "ab") as stream:
            stream.write(buffer.getvalue())
        metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(buffer.getvalue()))
        (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    write_manifest(ckpt)
    return planted


MODEL_FILES = ["model/.metadata", "model/common.pt", "model/distcp-bytes"]
TRAINING_FILES = ["optimizer/.metadata", "optimizer/common.pt", "common.pt", "rng/rank0.pt"]


def _loaders(trainer, tmp_path):
    from mgsr_megatron.conversion import export_hf
    from mgsr_megatron.models.checkpoint import load_model
    from mgsr_megatron.training.checkpoint import load_checkpoint

    return {
        "student/teacher/generate load_model": lambda ckpt: load_model(trainer.student, ckpt),
        "resume": lambda ckpt: load_checkpoint(trainer, ckpt),
        "export": lambda ckpt: export_hf(ckpt, tmp_path / "hf_out", progress=False),
    }


@pytest.mark.parametrize("target", MODEL_FILES + TRAINING_FILES)
def test_crafted_checkpoint_runs_no_code_on_any_load_path(run, trainer, tmp_path, target):
    marker = tmp_path / "PAYLOAD_RAN"
    ckpt = _copy(run, tmp_path)
    planted = _plant(ckpt, target, marker)
    for label, load in _loaders(trainer, tmp_path).items():
        if target in TRAINING_FILES and label != "resume":
            continue  # only the resume reads the trainer's files
        message = _one_line_error(lambda load=load: load(ckpt), str(planted))
        assert "refused" in message, (label, message)
        assert not marker.exists(), f"{label}: the payload in {target} ran"


def _cli(args, tool=False):
    cmd = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")] if tool else \
        [sys.executable, "-m", "mgsr_megatron"]
    return subprocess.run(cmd + args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _assert_cli_error(result, prefix, *names):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]


def test_crafted_metadata_on_the_command_line(run, tmp_path):
    """Every command that loads a checkpoint: one `mgsr: error:` line (`error:` for the tool), exit 2,
    and the payload never runs."""
    marker = tmp_path / "PAYLOAD_RAN"
    ckpt = _copy(run, tmp_path)
    planted = _plant(ckpt, "model/.metadata", marker)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [5, 6, 7]}\n')
    config = str(run["config"])
    new_save = f"--checkpoint.save={tmp_path / 'new_run'}"
    commands = {
        "generate": (["generate", "--load", str(ckpt), "--prompts", str(prompts), "--output",
                      str(tmp_path / "out.jsonl"), "--max-new-tokens", "8"], False),
        "teacher.load": (["train", "--config", config, f"--teacher.load={ckpt}", "--mgsr.w_dac=1.0", new_save],
                         False),
        "student.load": (["train", "--config", config, f"--student.load={ckpt}", new_save], False),
        "resume": (["train", "--config", config, "--resume", str(ckpt), new_save], False),
        "export": (["export", "--megatron-path", str(ckpt), "--hf-path", str(tmp_path / "hf")], True),
    }
    for label, (args, tool) in commands.items():
        result = _cli(args, tool)
        _assert_cli_error(result, "error:" if tool else "mgsr: error:", str(planted), "refused")
        assert not marker.exists(), f"{label}: the payload ran"


# ------------------------------------------------------------------------------------------ damage
def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "truncated model shard": ("model/__0_0.distcp", lambda p: _truncate(p), "model"),
    "deleted model shard": ("model/__0_1.distcp", lambda p: p.unlink(), "model"),
    "garbage .metadata": ("model/.metadata", lambda p: p.write_bytes(b"\x00garbage" * 50), "model"),
    "garbage model common.pt": ("model/common.pt", lambda p: p.write_bytes(b"garbage" * 50), "model"),
    "truncated optimizer shard": ("optimizer/__0_0.distcp", lambda p: _truncate(p, 0.9), "resume"),
    "garbage optimizer .metadata": ("optimizer/.metadata", lambda p: p.write_bytes(b"\x80\x04garbage"), "resume"),
    "foreign common.pt": ("common.pt", lambda p: torch.save({"step": 1}, p), "resume"),
}


@pytest.mark.parametrize("with_manifest", [False, True], ids=["no-manifest", "manifest"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_one_line_naming_the_file(run, trainer, tmp_path, case, with_manifest):
    from mgsr_megatron.models.checkpoint import load_model
    from mgsr_megatron.training.checkpoint import load_checkpoint

    name, damage, path = DAMAGE[case]
    ckpt = _copy(run, tmp_path)
    if not with_manifest:
        (ckpt / "manifest.json").unlink(missing_ok=True)
    damage(ckpt / name)
    load = (lambda: load_model(trainer.student, ckpt)) if path == "model" else (lambda: load_checkpoint(trainer, ckpt))
    _one_line_error(load, str(ckpt / name))


def test_export_of_a_damaged_checkpoint_names_the_file(run, tmp_path):
    from mgsr_megatron.conversion import export_hf

    ckpt = _copy(run, tmp_path)
    (ckpt / "manifest.json").unlink()
    _truncate(ckpt / "model" / "__0_0.distcp")
    _one_line_error(lambda: export_hf(ckpt, tmp_path / "hf", progress=False), str(ckpt / "model" / "__0_0.distcp"))
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_records_every_file_and_catches_changes(run, trainer, tmp_path):
    import hashlib
    import json

    from mgsr_megatron.models.checkpoint import load_model

    manifest = json.loads((run["good"] / "manifest.json").read_text())["files"]
    files = {p.relative_to(run["good"]).as_posix() for p in run["good"].rglob("*") if p.is_file()}
    assert set(manifest) == files - {"manifest.json"}
    for name, entry in manifest.items():
        data = (run["good"] / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ckpt = _copy(run, tmp_path)
    load_model(trainer.student, ckpt, verify=True)  # intact: loads
    shard = ckpt / "model" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    _one_line_error(lambda: load_model(trainer.student, ckpt, verify=True), str(shard), "SHA-256")
    (ckpt / "model_config.yaml").write_text((ckpt / "model_config.yaml").read_text() + "\n")
    _one_line_error(lambda: load_model(trainer.student, ckpt), str(ckpt / "model_config.yaml"), "manifest")
    (ckpt / "manifest.json").unlink()
    _one_line_error(lambda: load_model(trainer.student, ckpt, verify=True), "manifest.json")
    # a teacher: hashes whenever recorded, a checkpoint without manifest only with --verify-checkpoint
    load_model(trainer.student, _copy(run, tmp_path, "teacher_ok"), verify=True, require_manifest=False)
    older = _copy(run, tmp_path, "teacher_old")
    (older / "manifest.json").unlink()
    load_model(trainer.student, older, verify=True, require_manifest=False)


# ------------------------------------------------------------------------------------------ saving
def _save_at(trainer, root: Path, step: int) -> Path:
    from mgsr_megatron.training.checkpoint import save_checkpoint

    trainer.step = step
    return save_checkpoint(trainer, root)


def _assert_failed_save_left_previous(trainer, root: Path, previous: str, message: str) -> None:
    from mgsr_megatron.training.checkpoint import load_checkpoint

    assert "\n" not in message
    assert (root / "latest").read_text().strip() == previous
    assert sorted(p.name for p in root.iterdir()) == [previous, "latest"], sorted(p.name for p in root.iterdir())
    load_checkpoint(trainer, root)
    assert trainer.step == int(previous.split("_")[1])


def test_disk_full_during_save_simulated(trainer, tmp_path, monkeypatch):
    import errno

    root = tmp_path / "ckpts"
    _save_at(trainer, root, 1)
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        if str(path).endswith("common.pt") and ".iter_0000002.tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    message = _one_line_error(lambda: _save_at(trainer, root, 2), "iter_0000002", "No space left on device")
    monkeypatch.undo()
    _assert_failed_save_left_previous(trainer, root, "iter_0000001", message)


def test_disk_full_on_a_small_tmpfs(run, trainer, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    one = sum(p.stat().st_size for p in run["good"].rglob("*") if p.is_file())
    size_kib = int(1.5 * one / 1024) + 64  # one checkpoint of the tiny run (~650 KiB) fits, a second one does not
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); test_disk_full_during_save_simulated "
                    f"covers the same path")
    try:
        root = mount / "ckpts"
        _save_at(trainer, root, 1)
        message = _one_line_error(lambda: _save_at(trainer, root, 2), "iter_0000002", "No space left on device")
        _assert_failed_save_left_previous(trainer, root, "iter_0000001", message)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ------------------------------------------------------------------------------------------ no self-inflicted loss
def test_rollback_sets_later_iterations_aside_and_keeps_the_new_checkpoint(trainer, tmp_path):
    root = tmp_path / "ckpts"
    keep_last = trainer.cfg.checkpoint.keep_last
    try:
        trainer.cfg.checkpoint.keep_last = 0
        for step in (2, 3, 4):  # the abandoned run went to step 4
            _save_at(trainer, root, step)
        # resumed from iter_0000002 (rolled back), trained one step, saves step 3 with keep_last=1
        trainer.cfg.checkpoint.keep_last = 1
        _save_at(trainer, root, 3)
    finally:
        trainer.cfg.checkpoint.keep_last = keep_last
    assert (root / "latest").read_text().strip() == "iter_0000003"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["abandoned_iter_0000003", "abandoned_iter_0000004", "iter_0000003", "latest"], names
    assert (root / "iter_0000003" / "manifest.json").is_file()


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    from mgsr_megatron.training.checkpoint import prune_checkpoints

    for name in ("iter_0000009", "iter_0000010", "iter_0000100"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("iter_0000009\n")
    prune_checkpoints(tmp_path, 1, keep="iter_0000009")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000009", "iter_0000100", "latest"]
    prune_checkpoints(tmp_path, 1, keep="iter_0000100")  # by step number, not by name
    assert (tmp_path / "iter_0000100").is_dir()


def test_export_refuses_an_output_overlapping_its_input(run, tmp_path):
    from mgsr_megatron.conversion import export_hf

    run_dir = tmp_path / "run"
    shutil.copytree(run["ckpts"], run_dir / "checkpoints")
    before = _snapshot(run_dir)
    for output in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "iter_0000002",
                   run_dir / "checkpoints" / "iter_0000002" / "hf"):
        _one_line_error(lambda output=output: export_hf(run_dir / "checkpoints", output, overwrite=True,
                                                         progress=False),
                        "--hf-path", "overlaps")
    assert _snapshot(run_dir) == before


def test_import_refuses_an_output_overlapping_its_input(tmp_path):
    from mgsr_megatron.conversion import import_hf
    from tests.dist.check_conversion import tiny_hf_model

    tiny_hf_model("llama_gqa").save_pretrained(tmp_path / "hf")
    before = _snapshot(tmp_path / "hf")
    for output in (tmp_path / "hf", tmp_path, tmp_path / "hf" / "meg"):
        _one_line_error(lambda output=output: import_hf(tmp_path / "hf", output, overwrite=True, progress=False),
                        "--megatron-path", "overlaps")
    assert _snapshot(tmp_path / "hf") == before


def test_latest_must_name_a_directory_beside_it(run, tmp_path):
    from mgsr_megatron.models.checkpoint import resolve_checkpoint

    shutil.copytree(run["ckpts"], tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "latest").write_text("../checkpoints/iter_0000002\n")
    _one_line_error(lambda: resolve_checkpoint(tmp_path / "checkpoints"), "latest")


def test_export_tool_refuses_its_own_input(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run["ckpts"], run_dir / "checkpoints")
    before = _snapshot(run_dir)
    result = _cli(["export", "--megatron-path", str(run_dir / "checkpoints"), "--hf-path", str(run_dir),
                   "--overwrite", "--no-progress"], tool=True)
    _assert_cli_error(result, "error:", "overlaps")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("load_key", ["teacher.load", "student.load"])
@pytest.mark.parametrize("relation", ["equal", "contains"])
def test_save_may_not_overlap_a_loaded_checkpoint(run, trainer, tmp_path, load_key, relation):
    from mgsr_megatron.config import load_config, validate
    from mgsr_megatron.training.checkpoint import save_checkpoint

    loaded = run["ckpts"] if relation == "equal" else run["good"]
    cfg = load_config(run["config"], [f"--{load_key}={loaded}", f"--checkpoint.save={run['ckpts']}"])
    _one_line_error(lambda: validate(cfg), "checkpoint.save", load_key)
    before = _snapshot(run["ckpts"])
    saved_cfg = trainer.cfg
    trainer.cfg = cfg
    try:
        _one_line_error(lambda: save_checkpoint(trainer, run["ckpts"]), load_key)
    finally:
        trainer.cfg = saved_cfg
    assert _snapshot(run["ckpts"]) == before


# ------------------------------------------------------------------------------------------ config validation
@pytest.mark.parametrize("override,message", [
    ("--schedule.lr_decay_style=linear", "'linear' is not one of cosine, constant"),
    ("--mgsr.dac_mode=learnd", "'learnd' is not one of learned, fixed, off"),
    ("--mgsr.data_schedule=offpolicy", "mgsr.data_schedule"),
    ("--student.arch=bert", "student.arch"),
    ("--student.params_dtype=fp64", "student.params_dtype"),
    ("--data.format=csv", "data.format"),
    ("--mgsr.scrg_divergence=tvd", "mgsr.scrg_divergence"),
])
def test_enum_settings_are_checked_at_load(override, message):
    from mgsr_megatron.config import load_config

    _one_line_error(lambda: load_config(None, [override]), message)


@pytest.mark.parametrize("overrides,message", [
    (["--student.hidden_size=130", "--student.num_attention_heads=3"],
     "student.hidden_size=130 is not divisible by student.num_attention_heads=3"),
    (["--student.hidden_size=129", "--student.num_attention_heads=3"],
     "student: head dimension 43 (hidden_size / num_attention_heads or kv_channels) must be even"),
    (["--student.hidden_size=-4"], "'student.hidden_size': must be >= 1, got -4"),
    (["--teacher.num_attention_heads=0"], "teacher.num_attention_heads"),
    (["--schedule.global_batch_size=0"], "'schedule.global_batch_size': must be >= 1, got 0"),
    (["--schedule.train_iters=-2"], "'schedule.train_iters': must be >= 0, got -2"),
    (["--schedule.global_batch_size=6", "--schedule.micro_batch_size=4"], "not a multiple of"),
    (["--student.num_query_groups=3"], "not divisible by student.num_query_groups=3"),
    (["--mgsr.rho=1.5"], "mgsr.rho"),
    (["--data.span_extractor=window:x"], "data.span_extractor"),
    (["--optimizer.adam_beta2=1.0"], "optimizer.adam_beta2"),
])
def test_validate_refuses_impossible_settings(overrides, message):
    from mgsr_megatron.config import load_config, validate

    _one_line_error(lambda: validate(load_config(None, overrides)), message)


def test_validate_accepts_the_shipped_configs():
    from mgsr_megatron.config import load_config, validate

    configs = sorted((ROOT / "examples").glob("*/config.yaml"))
    assert configs
    for path in configs:
        validate(load_config(path))
    validate(load_config(None))
    from mgsr_megatron.demo import default_config

    validate(default_config(Path("runs/demo")))


def test_verify_checkpoint_flag():
    from mgsr_megatron.config import load_config

    assert load_config(None, ["--verify-checkpoint"]).checkpoint.verify is True
    assert load_config(None, []).checkpoint.verify is False


def test_import_writes_a_manifest_and_export_verifies_it(trainer, tmp_path):
    import json

    from mgsr_megatron.conversion import export_hf, import_hf
    from tests.dist.check_conversion import tiny_hf_model

    tiny_hf_model("llama_gqa").save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "meg", progress=False)
    files = json.loads((tmp_path / "meg" / "manifest.json").read_text())["files"]
    assert {"model_config.yaml", "model/.metadata", "hf_config.json"} <= set(files)
    export_hf(tmp_path / "meg", tmp_path / "out", progress=False, verify=True)
    shard = next((tmp_path / "meg" / "model").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    _one_line_error(lambda: export_hf(tmp_path / "meg", tmp_path / "out2", progress=False, verify=True),
                    str(shard), "SHA-256")
