"""The model-family registry (mgsr_megatron/architectures): the built-in families' options, the registry
API, and a FOURTH family defined only in this file and registered through the public API alone
(`register_family`), which is then built, converted and planned like the built-in ones.

The fourth family, `qwen2_test`, is a Qwen2-style llama variant: the llama family's spec with a QKV bias
that is always on (whatever ModelConfig.add_qkv_bias says), tied embeddings and an FFN of 3 * hidden
by default, and its own Hugging Face name (`MgsrTestQwen2ForCausalLM`, the Qwen2 layout). Nothing outside
this file knows it.

Building and converting need a process group and the CPU adapter, so that part runs in a subprocess
(`python -m tests.test_architecture_registry TMP OUT.json`, which registers the family itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mgsr_megatron.architectures import (
    REGISTRY,
    ModelFamily,
    family_names,
    for_hf_config,
    get_family,
    hf_architectures,
    register_family,
    unregister_family,
)
from mgsr_megatron.architectures.llama import Llama
from mgsr_megatron.config import Config, ModelConfig, load_config, validate
from mgsr_megatron.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
NAME = "qwen2_test"
HF_NAME = "MgsrTestQwen2ForCausalLM"
VOCAB = 200


class Qwen2TestHF(Llama):
    """The Qwen2 layout (llama's mapping with QKV biases) under a test-only HF architecture name."""

    hf_architectures = (HF_NAME,)
    export_architecture = HF_NAME
    template_model_types = ()

    @staticmethod
    def model_config(hf: dict) -> ModelConfig:
        cfg = Llama.model_config({**hf, "architectures": ["Qwen2ForCausalLM"]})
        return dataclasses.replace(cfg, arch=NAME, add_qkv_bias=False)  # the family implies the QKV bias

    def hf_config(self):
        return {**super().hf_config(), "architectures": [HF_NAME], "model_type": "mgsr_test_qwen2"}


def _three_times(hidden: int) -> int:
    return 3 * hidden


FAMILY = dataclasses.replace(
    get_family("llama"), name=NAME, summary="test only: Qwen2 style (llama + QKV bias always, tied)",
    add_qkv_bias=True, tie_embeddings=True, default_ffn_hidden_size=_three_times, hf=Qwen2TestHF)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(arch=NAME, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                vocab_size=VOCAB, make_vocab_size_divisible_by=64, max_position_embeddings=32)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def registered():
    register_family(FAMILY)
    try:
        yield FAMILY
    finally:
        unregister_family(NAME)


def _message(fn) -> str:
    with pytest.raises(UserError) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------ built-in families
def test_builtin_families_and_their_options():
    import torch.nn.functional as F

    from mgsr_megatron import config
    from mgsr_megatron.architectures.gpt2 import gelu_tanh

    assert family_names() == tuple(REGISTRY) == config.ARCHITECTURES == ("llama", "gpt2", "opt")
    assert all(family.name == name for name, family in REGISTRY.items())
    table = {  # normalization, activation, gated, linear bias, QKV bias, positions, tied, GQA, ffn(96)
        "llama": ("RMSNorm", F.silu, True, False, None, "rope", False, True, 256),
        "gpt2": ("LayerNorm", gelu_tanh, False, True, True, "learned_absolute", True, False, 384),
        "opt": ("LayerNorm", F.relu, False, True, True, "learned_absolute", True, False, 384),
    }
    for name, expected in table.items():
        f = get_family(name)
        assert (f.normalization, f.activation_func(), f.gated_linear_unit, f.add_bias_linear, f.add_qkv_bias,
                f.position_embedding_type, f.tie_embeddings, f.supports_gqa,
                f.default_ffn_hidden_size(96)) == expected, name
    assert get_family("llama").transformer_options(ModelConfig(add_qkv_bias=True))["add_qkv_bias"] is True
    assert get_family("gpt2").transformer_options(ModelConfig(arch="gpt2"))["add_qkv_bias"] is True
    assert list(hf_architectures()) == ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                        "GPT2LMHeadModel", "OPTForCausalLM"]


def test_unknown_family_is_refused_with_the_list():
    assert _message(lambda: get_family("bert")) == "model arch 'bert' is not supported (supported: llama, gpt2, opt)"
    assert "'qwen2_test' is not one of llama, gpt2, opt" in _message(
        lambda: load_config(None, [f"--student.arch={NAME}"]))
    cfg = Config()
    cfg.student.arch = NAME  # set directly, past load_config: validate() checks it too
    assert _message(lambda: validate(cfg)) == "config key 'student.arch': 'qwen2_test' is not one of llama, gpt2, opt"


def test_rope_head_dimension_check_belongs_to_rope_families():
    cfg = load_config(None, ["--student.hidden_size=132", "--student.num_attention_heads=4"])  # head dim 33
    assert "head dimension 33" in _message(lambda: validate(cfg))
    cfg = load_config(None, ["--student.arch=gpt2", "--student.hidden_size=132", "--student.num_attention_heads=4"])
    validate(cfg)  # learned positions: any head dimension


# ------------------------------------------------------------------------------------------ registry API
def test_register_and_unregister(registered):
    from mgsr_megatron import config
    from mgsr_megatron.models.builder import resolve

    assert family_names() == ("llama", "gpt2", "opt", NAME) == config.ARCHITECTURES
    assert get_family(NAME) is FAMILY and hf_architectures()[HF_NAME] is FAMILY
    cfg = load_config(None, [f"--student.arch={NAME}", f"--teacher.arch={NAME}"])
    validate(cfg)
    # the GQA rule lists every family that allows it
    message = _message(lambda: resolve(ModelConfig(arch="gpt2", num_query_groups=2)))
    assert message == "grouped-query attention (num_query_groups) is only supported for arch llama, qwen2_test"


def test_registry_refusals(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_family(FAMILY)
    assert register_family(FAMILY, replace=True) is FAMILY
    with pytest.raises(ValueError, match="LlamaForCausalLM, .* already belong to model family .llama."):
        register_family(dataclasses.replace(FAMILY, name="other", hf=Llama))
    with pytest.raises(TypeError, match="expects a ModelFamily"):
        register_family({"name": "dict"})
    with pytest.raises(KeyError):
        unregister_family("never_registered")
    assert isinstance(FAMILY, ModelFamily)


def test_registered_family_defaults_formulas_and_hf_config(registered):
    from mgsr_megatron.models.builder import resolve
    from mgsr_megatron.planner import layer_params, stage_params

    m = resolve(tiny_config())
    assert (m.ffn_hidden_size, m.tie_embeddings, m.num_query_groups) == (192, True, 2)
    # QKV 64*(64 + 2*32) + QKV bias 128, out-projection 64*64, SwiGLU 3*64*192, two RMSNorms 2*64
    assert layer_params(m, 1) == 64 * 128 + 128 + 64 * 64 + 3 * 64 * 192 + 2 * 64
    assert layer_params(m, 2) == (64 * 128 + 128) // 2 + 64 * 64 // 2 + 3 * 64 * 192 // 2 + 2 * 64
    # + embedding 256*64 (tied, no learned positions) + final RMSNorm 64
    assert stage_params(m, 1, 1, 0) == 2 * layer_params(m, 1) + 256 * 64 + 64
    family, cfg = for_hf_config(FAMILY.hf_mapping(m).hf_config())
    assert family is FAMILY
    assert dataclasses.asdict(resolve(dataclasses.replace(cfg, make_vocab_size_divisible_by=64))) \
        == dataclasses.asdict(m)


def test_unregistered_family_is_gone():
    assert NAME not in family_names()
    with pytest.raises(UserError, match=f"architecture {HF_NAME} is not supported"):
        for_hf_config({"architectures": [HF_NAME]})


# ------------------------------------------------------------------------------------------ build, convert, plan
def test_fourth_family_builds_converts_and_plans(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "tests.test_architecture_registry", str(tmp_path), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    # build: the family's choices reached Megatron, and a forward pass gives finite logits
    assert r["position_embedding_type"] == "rope" and r["tied"] and r["has_qkv_bias"]
    assert r["logits_shape"] == [2, 12, 256] and r["logits_finite"]
    # plan: the planner's count is the built model's real parameter count
    assert r["planned_params"] == r["stage_params"] == r["real_params"]
    # convert: Megatron -> HF -> Megatron -> HF, every tensor equal, the config unchanged
    assert r["hf_architectures"] == [HF_NAME]
    assert r["config_round_trip"] and r["megatron_round_trip_equal"] and r["hf_round_trip_equal"]
    assert r["hf_tensors"] > 0
    # and the exported weights ARE a Qwen2 model: transformers' Qwen2ForCausalLM gives Megatron's logits
    assert r["transformers_max_abs_error"] < 1e-4


def _main(tmp: Path, out: Path) -> None:
    import shutil

    import torch

    register_family(FAMILY)  # the only place the subprocess learns about the family

    from mgsr_megatron import parallel
    from mgsr_megatron.conversion import export_hf, import_hf
    from mgsr_megatron.conversion.hf_io import HFCheckpoint
    from mgsr_megatron.models import build_model, resolve
    from mgsr_megatron.models.checkpoint import load_model, read_model_config, save_model
    from mgsr_megatron.models.pipeline import forward_logits
    from mgsr_megatron.planner import plan, stage_params
    from tests.dist.check_conversion import real_cuda_stream

    result = {}
    cfg = Config()
    cfg.student, cfg.teacher = tiny_config(), tiny_config(num_layers=4)
    cfg.schedule.seq_length = 32
    cfg = validate(cfg)
    parallel.initialize_model_parallel(1, 1, seed=1)

    # build
    model = build_model(cfg.student)
    with torch.no_grad():  # move every weight off its initial value (norms 1, biases 0)
        gen = torch.Generator().manual_seed(5)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
        model.embedding.word_embeddings.weight[VOCAB:] = 0  # padded rows: export drops them, import pads zeros
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    logits = forward_logits(model, [tokens])[0]
    result.update(position_embedding_type=model.position_embedding_type,
                  tied=bool(model.share_embeddings_and_output_weights),
                  has_qkv_bias="decoder.layers.0.self_attention.linear_qkv.bias" in state,
                  logits_shape=list(logits.shape), logits_finite=bool(torch.isfinite(logits).all()))

    # plan
    result["real_params"] = sum(p.numel() for p in model.parameters())
    result["stage_params"] = stage_params(resolve(cfg.student), 1, 1, 0)
    result["planned_params"] = plan(cfg, world_size=1).stages[0].student_params

    # convert: save, export, import, load, export again
    save_model(model, tmp / "ckpt", cfg.student)
    export_hf(tmp / "ckpt", tmp / "hf", progress=False)
    hf_config = json.loads((tmp / "hf" / "config.json").read_text())
    result["hf_architectures"] = hf_config["architectures"]
    imported = import_hf(tmp / "hf", tmp / "back", make_vocab_size_divisible_by=64, progress=False)
    back_cfg = read_model_config(tmp / "back")
    result["config_round_trip"] = (dataclasses.asdict(back_cfg) == dataclasses.asdict(imported)
                                   == dataclasses.asdict(resolve(cfg.student)))
    again = build_model(back_cfg)
    load_model(again, tmp / "back")
    loaded = again.state_dict()
    result["megatron_round_trip_equal"] = all(torch.equal(loaded[k], v) for k, v in state.items())
    export_hf(tmp / "back", tmp / "hf2", progress=False)
    first, second = HFCheckpoint(tmp / "hf"), HFCheckpoint(tmp / "hf2")
    result["hf_tensors"] = len(first.shapes)
    result["hf_round_trip_equal"] = (first.shapes == second.shapes
                                     and all(torch.equal(first.get(n), second.get(n)) for n in first.shapes))

    # the exported directory under its real name is a transformers Qwen2ForCausalLM with Megatron's logits
    shutil.copytree(tmp / "hf", tmp / "qwen2")
    (tmp / "qwen2" / "config.json").write_text(json.dumps(
        {**hf_config, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    with real_cuda_stream():
        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(tmp / "qwen2").eval()
        with torch.no_grad():
            hf_logits = reference(tokens).logits.float()
    result["transformers_max_abs_error"] = (hf_logits - logits[..., :VOCAB].float()).abs().max().item()
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    _main(Path(sys.argv[1]), Path(sys.argv[2]))
