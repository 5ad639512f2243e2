"""The llama family: LLaMA and, without sliding window, Mistral and Qwen2 (QKV bias).

Megatron model: RMSNorm, SwiGLU (fc1 = [gate; up]), RoPE (integer theta, optional Llama-3 scaling),
grouped-query attention, no linear biases (Qwen2: QKV bias through ModelConfig.add_qkv_bias), untied
embeddings by default, FFN width 8/3 * hidden rounded up to a multiple of 64 by default.
Hugging Face: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (`Llama` below).
"""

from __future__ import annotations

import re

from mgsr_megatron.architectures.base import (
    HFMapping,
    ModelFamily,
    dtype_name,
    fuse_qkv,
    layer_name,
    pad_rows,
    require,
    split_qkv,
)
from mgsr_megatron.config import ModelConfig
from mgsr_megatron.errors import UserError

NAME = "llama"
# Megatron's Llama-3 RoPE scaling has these fixed (megatron/core/models/common/embeddings/rotary_pos_embedding.py)
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def swiglu_ffn_hidden_size(hidden: int) -> int:
    """LLaMA's default FFN width: 8/3 * hidden, rounded up to a multiple of 64."""
    return -(-(8 * hidden // 3) // 64) * 64


class Llama(HFMapping):
    """LlamaForCausalLM; MistralForCausalLM and Qwen2ForCausalLM without sliding window (Qwen2: QKV bias)."""

    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    export_architecture = "LlamaForCausalLM"
    template_model_types = ("mistral",)  # a Mistral import exports as Mistral
    ignored_hf = re.compile(r"\.rotary_emb\.inv_freq$")

    @staticmethod
    def model_config(hf: dict) -> ModelConfig:
        arch = hf["architectures"][0]
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported for {arch} (only silu)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise UserError(f"config.json: attention_bias/mlp_bias=true is not supported for {arch} "
                            f"(Megatron's llama layout has QKV biases only, as in Qwen2)")
        if arch == "MistralForCausalLM" and hf.get("sliding_window") is not None:
            raise UserError(f"config.json: sliding_window={hf['sliding_window']} is not supported "
                            f"(Mistral is converted only without a sliding window; set it to null)")
        if arch == "Qwen2ForCausalLM" and (hf.get("use_sliding_window") or any(
                t != "full_attention" for t in hf.get("layer_types") or [])):
            raise UserError("config.json: use_sliding_window/layer_types with sliding attention is not "
                            "supported (Qwen2 is converted only with full attention)")
        rope = dict(hf.get("rope_parameters") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        rope.update(hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        factor = None
        if rope_type == "llama3":
            for key, value in MEGATRON_LLAMA3_ROPE.items():
                if key in rope and float(rope[key]) != value:
                    raise UserError(f"config.json: rope_scaling {key}={rope[key]} is not supported "
                                    f"(Megatron's llama3 scaling fixes {key}={value})")
            factor = float(rope["factor"])
        elif rope_type != "default":
            raise UserError(f"config.json: rope scaling type '{rope_type}' is not supported "
                            f"(supported: default, llama3)")
        theta = float(rope["rope_theta"])
        if theta != int(theta):
            raise UserError(f"config.json: rope_theta={theta} must be an integer for Megatron's rotary_base")
        heads = require(hf, "num_attention_heads", arch)
        hidden = require(hf, "hidden_size", arch)
        head_dim = hf.get("head_dim") or hidden // heads
        return ModelConfig(
            arch=NAME, num_layers=require(hf, "num_hidden_layers", arch), hidden_size=hidden,
            ffn_hidden_size=require(hf, "intermediate_size", arch), num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=None if head_dim * heads == hidden else head_dim,
            vocab_size=require(hf, "vocab_size", arch),
            max_position_embeddings=require(hf, "max_position_embeddings", arch),
            rope_theta=theta, rope_scaling_factor=factor, norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            add_qkv_bias=arch == "Qwen2ForCausalLM", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            params_dtype=dtype_name(hf))

    def hf_shapes(self):
        c, hd = self.cfg, self.head_dim
        qkv_bias = self.family.qkv_bias(c)
        H, V = c.hidden_size, c.vocab_size
        shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
        if not c.tie_embeddings:
            shapes["lm_head.weight"] = (V, H)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (c.num_attention_heads * hd, H),
                p + "self_attn.k_proj.weight": (c.num_query_groups * hd, H),
                p + "self_attn.v_proj.weight": (c.num_query_groups * hd, H),
                p + "self_attn.o_proj.weight": (H, c.num_attention_heads * hd),
                p + "mlp.gate_proj.weight": (c.ffn_hidden_size, H), p + "mlp.up_proj.weight": (c.ffn_hidden_size, H),
                p + "mlp.down_proj.weight": (H, c.ffn_hidden_size)})
            if qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (c.num_attention_heads * hd,),
                               p + "self_attn.k_proj.bias": (c.num_query_groups * hd,),
                               p + "self_attn.v_proj.bias": (c.num_query_groups * hd,)})
        return shapes

    @property
    def optional_hf(self):
        return ("lm_head.weight",) if self.cfg.tie_embeddings else ()

    _simple = {"input_layernorm.weight": "input_layernorm.weight",
               "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
               "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
               "mlp.linear_fc2.weight": "mlp.down_proj.weight"}

    def to_megatron(self, name, get):
        import torch

        c = self.cfg
        if name == "embedding.word_embeddings.weight":
            return pad_rows(get("model.embed_tokens.weight"), self.padded_vocab)
        if name == "output_layer.weight":
            return pad_rows(get("lm_head.weight"), self.padded_vocab)
        if name == "decoder.final_layernorm.weight":
            return get("model.norm.weight")
        i, rest = layer_name(name)
        p = f"model.layers.{i}."
        if rest in self._simple:
            return get(p + self._simple[rest])
        if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            return fuse_qkv(*(get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), c.num_query_groups, self.head_dim)
        if rest == "mlp.linear_fc1.weight":
            return torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        raise KeyError(name)

    def to_hf(self, group, get):
        c = self.cfg
        if group == "embedding":
            return {"model.embed_tokens.weight": get("embedding.word_embeddings.weight")[:c.vocab_size]}
        if group == "final":
            out = {"model.norm.weight": get("decoder.final_layernorm.weight")}
            if not c.tie_embeddings:
                out["lm_head.weight"] = get("output_layer.weight")[:c.vocab_size]
            return out
        m, p = f"decoder.layers.{group}.", f"model.layers.{group}."
        out = {p + hf: get(m + meg) for meg, hf in self._simple.items()}
        kinds = ("weight", "bias") if self.family.qkv_bias(c) else ("weight",)
        for kind in kinds:
            q, k, v = split_qkv(get(f"{m}self_attention.linear_qkv.{kind}"), c.num_attention_heads,
                                c.num_query_groups, self.head_dim)
            out.update({f"{p}self_attn.q_proj.{kind}": q, f"{p}self_attn.k_proj.{kind}": k,
                        f"{p}self_attn.v_proj.{kind}": v})
        gate, up = get(m + "mlp.linear_fc1.weight").chunk(2)
        out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
        return out

    def hf_config(self):
        c = self.cfg
        qwen = self.family.qkv_bias(c)
        rope = {"rope_type": "default", "rope_theta": c.rope_theta}
        if c.rope_scaling_factor is not None:
            rope = {"rope_type": "llama3", "rope_theta": c.rope_theta, "factor": c.rope_scaling_factor,
                    **MEGATRON_LLAMA3_ROPE}
        config = {
            "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen else "llama",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_query_groups, "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_epsilon,
            "rope_theta": c.rope_theta, "rope_parameters": rope,
            "rope_scaling": None if c.rope_scaling_factor is None
            else {k: v for k, v in rope.items() if k != "rope_theta"},
            "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0,
        }
        if qwen:
            config.update(use_sliding_window=False, sliding_window=None)
        else:
            config.update(attention_bias=False, mlp_bias=False)
        return config


FAMILY = ModelFamily(
    name=NAME, summary="LLaMA; Mistral and Qwen2 without sliding window (Qwen2: add_qkv_bias)",
    normalization="RMSNorm", activation="silu", gated_linear_unit=True, add_bias_linear=False,
    add_qkv_bias=None, position_embedding_type="rope",
    tie_embeddings=False, supports_gqa=True, default_ffn_hidden_size=swiglu_ffn_hidden_size,
    hf=Llama,
)
