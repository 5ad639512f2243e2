"""The gpt2 family: GPT-2.

Megatron model: LayerNorm, tanh-GELU ("gelu_new"), learned absolute positions, biases everywhere, tied
embeddings by default, multi-head attention only, FFN width 4 * hidden by default.
Hugging Face: GPT2LMHeadModel (`GPT2` below; Conv1D weights are stored transposed).
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

NAME = "gpt2"


def gelu_tanh(x):
    """GPT-2's "gelu_new". (Megatron's openai_gelu is torch.compile'd: ~30 s to compile on CPU.)"""
    import torch.nn.functional as F

    return F.gelu(x, approximate="tanh")


class GPT2(HFMapping):
    """GPT2LMHeadModel: Conv1D weights are [in, out] (transposed), embeddings tied, learned positions."""

    hf_architectures = ("GPT2LMHeadModel",)
    export_architecture = "GPT2LMHeadModel"
    optional_hf = ("lm_head.weight",)
    ignored_hf = re.compile(r"\.attn\.(bias|masked_bias)$")  # causal-mask buffers of older checkpoints

    @staticmethod
    def model_config(hf):
        arch = "GPT2LMHeadModel"
        if hf.get("activation_function", "gelu_new") != "gelu_new":
            raise UserError(f"config.json: activation_function={hf['activation_function']!r} is not "
                            f"supported for GPT-2 (only gelu_new)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise UserError(f"config.json: {flag}=true is not supported for GPT-2")
        if hf.get("scale_attn_weights") is False:
            raise UserError("config.json: scale_attn_weights=false is not supported for GPT-2")
        if hf.get("tie_word_embeddings") is False:
            raise UserError("config.json: tie_word_embeddings=false is not supported for GPT-2")
        hidden = require(hf, "n_embd", arch)
        return ModelConfig(
            arch=NAME, num_layers=require(hf, "n_layer", arch), hidden_size=hidden,
            ffn_hidden_size=hf.get("n_inner") or 4 * hidden, num_attention_heads=require(hf, "n_head", arch),
            vocab_size=require(hf, "vocab_size", arch), max_position_embeddings=require(hf, "n_positions", arch),
            norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), tie_embeddings=True,
            params_dtype=dtype_name(hf))

    def hf_shapes(self):
        c = self.cfg
        H, F = c.hidden_size, c.ffn_hidden_size
        shapes = {"transformer.wte.weight": (c.vocab_size, H), "transformer.wpe.weight": (c.max_position_embeddings, H),
                  "transformer.ln_f.weight": (H,), "transformer.ln_f.bias": (H,)}
        for i in range(c.num_layers):
            p = f"transformer.h.{i}."
            shapes.update({p + "ln_1.weight": (H,), p + "ln_1.bias": (H,),
                           p + "ln_2.weight": (H,), p + "ln_2.bias": (H,),
                           p + "attn.c_attn.weight": (H, 3 * H), p + "attn.c_attn.bias": (3 * H,),
                           p + "attn.c_proj.weight": (H, H), p + "attn.c_proj.bias": (H,),
                           p + "mlp.c_fc.weight": (H, F), p + "mlp.c_fc.bias": (F,),
                           p + "mlp.c_proj.weight": (F, H), p + "mlp.c_proj.bias": (H,)})
        return shapes

    # Megatron suffix -> (HF suffix, transposed Conv1D weight)
    _simple = {"input_layernorm.weight": ("ln_1.weight", False), "input_layernorm.bias": ("ln_1.bias", False),
               "pre_mlp_layernorm.weight": ("ln_2.weight", False), "pre_mlp_layernorm.bias": ("ln_2.bias", False),
               "self_attention.linear_proj.weight": ("attn.c_proj.weight", True),
               "self_attention.linear_proj.bias": ("attn.c_proj.bias", False),
               "mlp.linear_fc1.weight": ("mlp.c_fc.weight", True), "mlp.linear_fc1.bias": ("mlp.c_fc.bias", False),
               "mlp.linear_fc2.weight": ("mlp.c_proj.weight", True), "mlp.linear_fc2.bias": ("mlp.c_proj.bias", False)}

    def to_megatron(self, name, get):
        c = self.cfg
        if name == "embedding.word_embeddings.weight":
            return pad_rows(get("transformer.wte.weight"), self.padded_vocab)
        if name == "embedding.position_embeddings.weight":
            return get("transformer.wpe.weight")
        if name.startswith("decoder.final_layernorm."):
            return get("transformer.ln_f." + name.rsplit(".", 1)[1])
        i, rest = layer_name(name)
        p = f"transformer.h.{i}."
        if rest in self._simple:
            hf, transposed = self._simple[rest]
            return get(p + hf).t() if transposed else get(p + hf)
        if rest == "self_attention.linear_qkv.weight":  # Conv1D [H, 3H] -> rows [q; k; v]
            q, k, v = get(p + "attn.c_attn.weight").t().chunk(3)
            return fuse_qkv(q, k, v, c.num_attention_heads, self.head_dim)
        if rest == "self_attention.linear_qkv.bias":
            return fuse_qkv(*get(p + "attn.c_attn.bias").chunk(3), c.num_attention_heads, self.head_dim)
        raise KeyError(name)

    def to_hf(self, group, get):
        import torch

        c = self.cfg
        if group == "embedding":
            return {"transformer.wte.weight": get("embedding.word_embeddings.weight")[:c.vocab_size],
                    "transformer.wpe.weight": get("embedding.position_embeddings.weight")}
        if group == "final":
            return {f"transformer.ln_f.{k}": get(f"decoder.final_layernorm.{k}") for k in ("weight", "bias")}
        m, p = f"decoder.layers.{group}.", f"transformer.h.{group}."
        out = {}
        for meg, (hf, transposed) in self._simple.items():
            tensor = get(m + meg)
            out[p + hf] = tensor.t().contiguous() if transposed else tensor
        heads = c.num_attention_heads
        q, k, v = split_qkv(get(m + "self_attention.linear_qkv.weight"), heads, heads, self.head_dim)
        out[p + "attn.c_attn.weight"] = torch.cat([q, k, v]).t().contiguous()
        out[p + "attn.c_attn.bias"] = torch.cat(split_qkv(get(m + "self_attention.linear_qkv.bias"),
                                                          heads, heads, self.head_dim))
        return out

    def hf_config(self):
        c = self.cfg
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_attention_heads,
                "n_inner": c.ffn_hidden_size, "n_positions": c.max_position_embeddings,
                "layer_norm_epsilon": c.norm_epsilon, "activation_function": "gelu_new",
                "tie_word_embeddings": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


FAMILY = ModelFamily(
    name=NAME, summary="GPT-2",
    normalization="LayerNorm", activation=gelu_tanh, gated_linear_unit=False, add_bias_linear=True,
    add_qkv_bias=True, position_embedding_type="learned_absolute",
    tie_embeddings=True, supports_gqa=False,
    hf=GPT2,
)
