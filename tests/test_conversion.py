"""HF <-> Megatron conversion: exact round trips for every architecture, and every bad-input message.

Conversions that touch Megatron run in ONE subprocess (the first job through the real command line,
the rest through its `main`), so this pytest process never starts a process group or the CPU adapter.
The Megatron-side logits (TP/PP) are checked against transformers in tests/dist/check_conversion.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "convert_checkpoint.py"
KINDS = ["llama_gqa", "qwen2", "mistral", "llama3_rope", "gpt2", "opt"]

sys.path.insert(0, str(ROOT / "tools"))


def _hf(kind):
    from tests.dist.check_conversion import tiny_hf_model

    return tiny_hf_model(kind)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{kind: (original HF model, exported dir)} plus variants: sharded safetensors, pytorch_model.bin, bf16."""
    tmp = tmp_path_factory.mktemp("conversion")
    models, jobs = {}, []
    for kind in KINDS:
        models[kind] = _hf(kind)
        models[kind].save_pretrained(tmp / f"{kind}_hf")
        jobs.append(["import", "--hf-path", str(tmp / f"{kind}_hf"), "--megatron-path", str(tmp / f"{kind}_meg"),
                     "--tp", "2", "--pp", "2", "--no-progress"])
        jobs.append(["export", "--megatron-path", str(tmp / f"{kind}_meg"), "--hf-path", str(tmp / f"{kind}_out"),
                     "--no-progress"])
    llama = models["llama_gqa"]
    llama.save_pretrained(tmp / "sharded_hf", max_shard_size="20KB")
    llama.save_pretrained(tmp / "bin_hf")
    from safetensors.torch import load_file

    weights = load_file(str(tmp / "bin_hf" / "model.safetensors"))
    os.remove(tmp / "bin_hf" / "model.safetensors")
    torch.save(weights, tmp / "bin_hf" / "pytorch_model.bin")
    for variant in ("sharded", "bin"):
        jobs.append(["import", "--hf-path", str(tmp / f"{variant}_hf"), "--megatron-path", str(tmp / f"{variant}_meg"),
                     "--no-progress"])
        jobs.append(["export", "--megatron-path", str(tmp / f"{variant}_meg"), "--hf-path",
                     str(tmp / f"{variant}_out"), "--no-progress"])
    jobs.append(["import", "--hf-path", str(tmp / "llama_gqa_hf"), "--megatron-path", str(tmp / "bf16_meg"),
                 "--dtype", "bf16", "--no-progress"])
    jobs.append(["export", "--megatron-path", str(tmp / "bf16_meg"), "--hf-path", str(tmp / "bf16_out"),
                 "--no-progress"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.run([sys.executable, str(TOOL), *jobs[0]], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    script = ("import sys, json; sys.path.insert(0, 'tools'); from convert_checkpoint import main\n"
              "if __name__ == '__main__':\n"
              "    for job in json.loads(sys.argv[1]):\n"
              "        assert main(job) == 0, job\n")
    rest = subprocess.run([sys.executable, "-c", script, json.dumps(jobs[1:])], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert rest.returncode == 0, rest.stderr[-4000:]
    return tmp, models


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _assert_same_tensors(original, exported):
    a, b = original.state_dict(), exported.state_dict()
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _assert_same_logits(original, exported, atol=0.0):
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = (original(tokens).logits - exported(tokens).logits).abs().max().item()
    assert err <= atol, err


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_exact(converted, kind):
    tmp, models = converted
    exported = _load(tmp / f"{kind}_out")
    assert type(exported).__name__ == type(models[kind]).__name__
    _assert_same_tensors(models[kind], exported)
    _assert_same_logits(models[kind], exported)


@pytest.mark.parametrize("variant", ["sharded", "bin"])
def test_round_trip_other_weight_formats(converted, variant):
    tmp, models = converted
    if variant == "sharded":
        assert (tmp / "sharded_hf" / "model.safetensors.index.json").is_file()
    _assert_same_tensors(models["llama_gqa"], _load(tmp / f"{variant}_out"))


def test_bf16_import(converted):
    tmp, models = converted
    from mgsr_megatron.models.checkpoint import read_model_config

    assert read_model_config(tmp / "bf16_meg").params_dtype == "bfloat16"
    exported = _load(tmp / "bf16_out")
    for name, tensor in models["llama_gqa"].state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_imported_directory_layout(converted):
    tmp, _ = converted
    from mgsr_megatron.config import ModelConfig
    from mgsr_megatron.models.checkpoint import read_model_config

    cfg = read_model_config(tmp / "qwen2_meg")
    assert isinstance(cfg, ModelConfig)
    assert (cfg.arch, cfg.add_qkv_bias, cfg.tie_embeddings, cfg.num_query_groups) == ("llama", True, True, 2)
    assert read_model_config(tmp / "llama3_rope_meg").rope_scaling_factor == 8.0
    assert read_model_config(tmp / "opt_meg").arch == "opt"
    assert (tmp / "gpt2_meg" / "model" / "metadata.json").is_file()
    assert not list(tmp.glob(".*.tmp")), "temporary directories left behind"
    for kind in KINDS:  # save_pretrained writes no tokenizer: no tokenizer/ (generate then needs none)
        assert not (tmp / f"{kind}_meg" / "tokenizer").exists(), kind
        has_generation_config = (tmp / f"{kind}_hf" / "generation_config.json").is_file()
        assert (tmp / f"{kind}_meg" / "generation_config.json").is_file() == has_generation_config, kind
        assert (tmp / f"{kind}_out" / "generation_config.json").is_file() == has_generation_config, kind


# ---------------------------------------------------------------------------------------------------
# Bad input: every case raises UserError whose one-line message names the problem.

def _error(fn):
    from mgsr_megatron.errors import UserError

    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def _import(hf, out, **kw):
    from mgsr_megatron.conversion import import_hf

    return import_hf(hf, out, progress=False, **kw)


def _save(model, path):
    model.save_pretrained(path)
    return path


def _rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    edit(weights)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_no_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(lambda: _import(tmp_path / "empty", tmp_path / "out"))


def test_unsupported_architecture_lists_supported(tmp_path):
    hf = _save(_hf("llama_gqa"), tmp_path / "hf")
    _edit_config(hf, architectures=["BertForMaskedLM"])
    message = _error(lambda: _import(hf, tmp_path / "out"))
    assert "BertForMaskedLM" in message
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM"):
        assert name in message


def test_missing_tensor_named(tmp_path):
    hf = _save(_hf("llama_gqa"), tmp_path / "hf")
    _rewrite_weights(hf, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    assert "missing tensor(s) model.layers.1.mlp.up_proj.weight" in _error(lambda: _import(hf, tmp_path / "out"))


def test_extra_tensor_named(tmp_path):
    hf = _save(_hf("gpt2"), tmp_path / "hf")
    _rewrite_weights(hf, lambda w: w.__setitem__("transformer.h.0.attn.rotary.weight", torch.zeros(3)))
    assert "unexpected tensor(s) transformer.h.0.attn.rotary.weight" in _error(lambda: _import(hf, tmp_path / "out"))


def test_shape_mismatch_named(tmp_path):
    hf = _save(_hf("opt"), tmp_path / "hf")
    _rewrite_weights(hf, lambda w: w.__setitem__("model.decoder.layers.2.fc1.weight", torch.zeros(100, 64)))
    message = _error(lambda: _import(hf, tmp_path / "out"))
    assert "model.decoder.layers.2.fc1.weight" in message and "[100, 64]" in message and "[128, 64]" in message
    assert not (tmp_path / "out").exists()  # no partial output that looks like a checkpoint


def test_failure_while_writing_leaves_no_checkpoint(tmp_path, monkeypatch):
    """A crash after the weights are written (before the metadata) leaves nothing at the output path."""
    from mgsr_megatron.conversion import convert

    hf = _save(_hf("llama_gqa"), tmp_path / "hf")

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(convert, "write_model_config", crash)
    with pytest.raises(OSError, match="disk full"):
        _import(hf, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # neither out/ nor a temporary left


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
                                  {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}])
def test_unsupported_rope_scaling(tmp_path, rope):
    hf = _save(_hf("llama_gqa"), tmp_path / "hf")
    _edit_config(hf, rope_parameters=rope, rope_scaling=None)
    assert f"rope scaling type '{rope['rope_type']}' is not supported" in _error(lambda: _import(hf, tmp_path / "out"))


def test_llama3_rope_with_other_constants_refused(tmp_path):
    hf = _save(_hf("llama3_rope"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["rope_parameters"]["high_freq_factor"] = 2.0
    (hf / "config.json").write_text(json.dumps(config))
    assert "high_freq_factor" in _error(lambda: _import(hf, tmp_path / "out"))


def test_tp_must_divide_heads(tmp_path):
    hf = _save(_hf("gpt2"), tmp_path / "hf")
    assert "TP=3 does not divide num_attention_heads=4" in _error(lambda: _import(hf, tmp_path / "out", tp=3))


def test_tp_must_divide_vocabulary(tmp_path):
    hf = _save(_hf("gpt2"), tmp_path / "hf")
    message = _error(lambda: _import(hf, tmp_path / "out", tp=4, make_vocab_size_divisible_by=1))
    assert "padded vocabulary 250" in message and "TP=4" in message


def test_pp_must_divide_layers(tmp_path):
    hf = _save(_hf("opt"), tmp_path / "hf")
    assert "PP=3 does not divide num_layers=4" in _error(lambda: _import(hf, tmp_path / "out", pp=3))


def test_existing_output_refused_without_overwrite(tmp_path):
    hf = _save(_hf("llama_gqa"), tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model_config.yaml").write_text("arch: llama\n")
    message = _error(lambda: _import(hf, tmp_path / "out"))
    assert "already holds a checkpoint" in message and "--overwrite" in message
    assert (tmp_path / "out" / "model_config.yaml").read_text() == "arch: llama\n"


def test_export_existing_output_refused(tmp_path):
    from mgsr_megatron.conversion import export_hf

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model_config.yaml").write_text("arch: gpt2\nnum_layers: 2\n")
    (tmp_path / "ckpt" / "model").mkdir()
    assert "no weights" in _error(lambda: export_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False))


def test_opt_post_ln_refused(tmp_path):
    hf = _save(_hf("opt"), tmp_path / "hf")
    _edit_config(hf, do_layer_norm_before=False)
    assert "post-LN" in _error(lambda: _import(hf, tmp_path / "out"))


def test_opt_project_in_refused(tmp_path):
    hf = _save(_hf("opt"), tmp_path / "hf")
    _edit_config(hf, word_embed_proj_dim=32)
    assert "project_in" in _error(lambda: _import(hf, tmp_path / "out"))


def test_mistral_sliding_window_refused(tmp_path):
    hf = _save(_hf("mistral"), tmp_path / "hf")
    _edit_config(hf, sliding_window=16)
    assert "sliding_window=16" in _error(lambda: _import(hf, tmp_path / "out"))


def test_no_weights_found(tmp_path):
    hf = _save(_hf("gpt2"), tmp_path / "hf")
    os.remove(hf / "model.safetensors")
    assert "no weights" in _error(lambda: _import(hf, tmp_path / "out"))


def test_resolve_checkpoint_and_read_config_errors(tmp_path):
    from mgsr_megatron.config import ModelConfig
    from mgsr_megatron.models.checkpoint import read_model_config, resolve_checkpoint, write_model_config

    assert "not found" in _error(lambda: resolve_checkpoint(tmp_path / "nope"))
    (tmp_path / "run" / "checkpoints" / "iter_0000002").mkdir(parents=True)
    write_model_config(tmp_path / "run" / "checkpoints" / "iter_0000002", ModelConfig(arch="gpt2"))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter_0000002\n")
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints").name == "iter_0000002"
    assert resolve_checkpoint(tmp_path / "run").name == "iter_0000002"
    assert read_model_config(tmp_path / "run").arch == "gpt2"
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter_0000009\n")
    assert "iter_0000009" in _error(lambda: resolve_checkpoint(tmp_path / "run"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_config.yaml").write_text("arch: llama\nlayers: 3\n")
    assert "unknown ModelConfig field(s) layers" in _error(lambda: read_model_config(tmp_path / "bad"))


def test_help_documents_every_flag():
    from convert_checkpoint import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subparsers.choices) == {"import", "export"}
    for name, sub in subparsers.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            assert action.help, (name, action.option_strings)
    for flag in ("--hf-path", "--megatron-path", "--tp", "--pp", "--dtype", "--overwrite"):
        assert flag in subparsers.choices["import"].format_help()
