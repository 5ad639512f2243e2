"""Checkpoints that say where they come from (issue 15): the tokenizer hash and training / import
provenance in every checkpoint, refusals of another tokenizer and of a teacher that may be untrained,
imports without a tokenizer, and the remaining early input checks (eval without references, an empty
JSONL, a changed global batch before the teacher loads).

One tiny SFT run (a subprocess) writes the checkpoint; the command-line contract (one `mgsr: error:`
line, exit 2, nothing written) is checked in subprocesses, the checks themselves also in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mgsr_megatron.errors import UserError
from tests.test_cli_inference import _assert_one_line_error as _one_error_line
from tests.test_cli_inference import _mgsr

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
OTHER_HASH = "0123456789abcdef"


def _train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return _mgsr("train", "--config", config, *extra)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mgsr_megatron.training.smoke import build_files
    from tests.test_training_process import write_config

    root = tmp_path_factory.mktemp("provenance")
    data = root / "data"
    data.mkdir()
    build_files(data)
    config = write_config(data, root / "run", train_iters=2)
    result = _train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "data": data, "config": config, "run_dir": root / "run",
            "ckpt": root / "run" / "checkpoints" / "iter_0000002", "tokenizer": data / "tok.model"}


def _copy_with_provenance(source: Path, target: Path, record: dict | None) -> Path:
    """A copy of a checkpoint whose provenance.json is `record` (None: removed, as in older
    checkpoints), with its manifest rewritten to match."""
    from mgsr_megatron.models.trust import write_manifest

    shutil.copytree(source, target)
    (target / "manifest.json").unlink()
    if record is None:
        (target / "provenance.json").unlink()
    else:
        (target / "provenance.json").write_text(json.dumps(record))
    write_manifest(target)
    return target


def _recorded(ckpt: Path) -> dict:
    return json.loads((ckpt / "provenance.json").read_text())


# ---- the record ------------------------------------------------------------------------------------------

def test_training_checkpoints_record_tokenizer_and_training(run):
    from mgsr_megatron.data.tokenizer import load_tokenizer

    record = _recorded(run["ckpt"])
    tok = load_tokenizer(run["tokenizer"])
    assert record["tokenizer_hash"] == tok.vocab_hash() and record["tokenizer_vocab_size"] == tok.vocab_size == 256
    assert record["training"]["iterations"] == 2
    losses = [json.loads(line) for line in (run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    last = [row["loss"] for row in losses if row["kind"] == "train" and row["step"] == 2][-1]
    assert record["training"]["final_loss"] == pytest.approx(last)
    manifest = json.loads((run["ckpt"] / "manifest.json").read_text())["files"]
    assert "provenance.json" in manifest


# ---- another tokenizer -----------------------------------------------------------------------------------

def test_another_tokenizer_is_refused_naming_both_hashes(run, tmp_path):
    from mgsr_megatron.config import load_config
    from mgsr_megatron.data.tokenizer import load_tokenizer
    from mgsr_megatron.training.checkpoint import check_checkpoint_origins

    other = _copy_with_provenance(run["ckpt"], tmp_path / "other", {**_recorded(run["ckpt"]),
                                                                    "tokenizer_hash": OTHER_HASH})
    tok = load_tokenizer(run["tokenizer"])
    for key in ("teacher.load", "student.load", "checkpoint.resume"):
        cfg = load_config(run["config"], [f"--{key}={other}", f"--checkpoint.save={tmp_path / 'new'}"])
        with pytest.raises(UserError) as info:
            check_checkpoint_origins(cfg, tok, uses_teacher=True)
        message = str(info.value)
        assert OTHER_HASH in message and tok.vocab_hash() in message and str(other) in message, message
    # a checkpoint written before the record existed: no tokenizer check (a teacher's provenance still counts)
    older = _copy_with_provenance(run["ckpt"], tmp_path / "older", None)
    check_checkpoint_origins(load_config(run["config"], [f"--student.load={older}"]), tok, uses_teacher=False)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [5, 6, 7]}) + "\n")
    output = tmp_path / "out.jsonl"
    result = _mgsr("generate", "--load", other, "--tokenizer", run["tokenizer"], "--prompts", prompts,
                   "--output", output, "--max-new-tokens", 4)
    _one_error_line(result, OTHER_HASH, tok.vocab_hash(), str(other))
    assert not output.exists()  # refused before any generation
    result = _train(run["config"], f"--teacher.load={other}", "--mgsr.w_dac=1.0",
                    f"--checkpoint.save={tmp_path / 'new'}")
    _one_error_line(result, "teacher.load", OTHER_HASH, tok.vocab_hash(), str(other))


# ---- teacher provenance ----------------------------------------------------------------------------------

def test_a_teacher_without_training_or_import_is_refused(run, tmp_path):
    from mgsr_megatron.config import load_config
    from mgsr_megatron.data.tokenizer import load_tokenizer
    from mgsr_megatron.training.checkpoint import check_checkpoint_origins
    from tests.test_training_process import write_config

    zero_config = write_config(run["data"], tmp_path / "zero", train_iters=0)
    assert _train(zero_config).returncode == 0
    untrained = tmp_path / "zero" / "checkpoints" / "iter_0000000"
    assert _recorded(untrained)["training"]["iterations"] == 0
    result = _train(run["config"], f"--teacher.load={untrained}", "--mgsr.w_dac=1.0",
                    f"--checkpoint.save={tmp_path / 'new'}")
    _one_error_line(result, str(untrained), "teacher.allow_untrained")

    tok = load_tokenizer(run["tokenizer"])
    hand_made = _copy_with_provenance(run["ckpt"], tmp_path / "hand_made", None)
    imported = _copy_with_provenance(run["ckpt"], tmp_path / "imported", {"import": {"source": "/models/hf"}})

    def check(teacher, *extra):
        cfg = load_config(run["config"], [f"--teacher.load={teacher}", *extra])
        check_checkpoint_origins(cfg, tok, uses_teacher=True)

    for refused in (untrained, hand_made):
        with pytest.raises(UserError, match="records neither training nor an import"):
            check(refused)
        check(refused, "--teacher.allow_untrained=true")
    check(imported)
    check(run["ckpt"])
    with pytest.raises(UserError, match="teacher.allow_untrained"):
        load_config(None, ["--teacher.allow_untrained=maybe"])


# ---- an import without tokenizer files -------------------------------------------------------------------

def test_import_without_tokenizer_writes_no_tokenizer_dir_and_generates_from_ids(tmp_path):
    import torch

    from tests.dist.check_conversion import tiny_hf_model

    model = tiny_hf_model("llama_gqa")
    model.save_pretrained(tmp_path / "hf")
    assert not list((tmp_path / "hf").glob("tokenizer*")) and not (tmp_path / "hf" / "vocab.json").exists()
    assert (tmp_path / "hf" / "generation_config.json").is_file()  # what used to make a tokenizer/ of its own
    meg = tmp_path / "meg"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "import", "--hf-path",
                             str(tmp_path / "hf"), "--megatron-path", str(meg), "--no-progress"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (meg / "tokenizer").exists()
    assert (meg / "generation_config.json").is_file()
    assert _recorded(meg) == {"import": {"source": str((tmp_path / "hf").resolve())}}

    prompt = [5, 6, 7]
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt_ids": prompt}) + "\n")
    output = tmp_path / "out.jsonl"
    result = _mgsr("generate", "--load", meg, "--prompts", tmp_path / "prompts.jsonl", "--output", output,
                   "--greedy", "--max-new-tokens", 4)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert "output" not in row  # no tokenizer: ids only
    tokens, expected = list(prompt), []
    with torch.no_grad():  # greedy decoding in transformers' model, the independent reference
        for _ in range(4):
            expected.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
            tokens.append(expected[-1])
    eos = model.config.vocab_size - 1  # no tokenizer: the last id stands for EOS
    assert row["output_ids"] == expected[:len(row["output_ids"])]
    assert len(row["output_ids"]) == 4 or row["output_ids"][-1] == eos


# ---- small validations -----------------------------------------------------------------------------------

def test_eval_refuses_rows_without_references(run, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"prompt": "sort 3 1 2", "response": "1 2 3"}) + "\n\n"
                    + json.dumps({"prompt": "sort 9 8"}) + "\n")
    result = _mgsr("eval", "--load", run["ckpt"], "--tokenizer", run["tokenizer"], "--data", data, "--greedy",
                   "--max-new-tokens", 4)
    _one_error_line(result, f"{data}:3", "no reference answer")


def test_preprocessing_an_empty_jsonl_is_refused(run, tmp_path, capsys):
    import importlib.util

    from mgsr_megatron.data.preprocess import PreprocessOptions, preprocess

    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_text("")
    blank.write_text("\n  \n")
    for path in (empty, blank):
        with pytest.raises(UserError, match=f"{path}: empty input file") as info:
            preprocess([path], str(tmp_path / "out"), str(run["tokenizer"]),
                       options=PreprocessOptions(workers=1, progress=False))
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out.train.json").exists()
    spec = importlib.util.spec_from_file_location("preprocess_tool", ROOT / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--input", str(empty), "--output-prefix", str(tmp_path / "out"), "--tokenizer",
                      str(run["tokenizer"]), "--no-progress"]) == 2
    assert f"error: {empty}: empty input file" in capsys.readouterr().err


def test_changed_global_batch_is_refused_before_the_teacher_loads(run, tmp_path):
    """The teacher named here does not exist: the resume check must come first."""
    result = _train(run["config"], "--resume", run["ckpt"], "--schedule.global_batch_size=8",
                    "--schedule.train_iters=8", "--mgsr.w_dac=1.0", f"--teacher.load={tmp_path / 'no_teacher'}",
                    f"--checkpoint.save={tmp_path / 'new'}")
    _one_error_line(result, "the run used schedule.global_batch_size=4, this run has 8")
