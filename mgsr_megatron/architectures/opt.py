"""The opt family: OPT (pre-LN only).

Megatron model: LayerNorm (pre-LN), ReLU, learned absolute positions, biases everywhere, tied embeddings
by default, multi-head attention only, FFN width 4 * hidden by default.
Hugging Face: OPTForCausalLM (`OPT` below). HF's learned positions start at row 2 (an offset of 2);
Megatron's at 0: import drops the two offset rows from the table and keeps them in `hf_extra`, export
puts them back (zeros for a model that was never imported).
"""

from __future__ import annotations

import math

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

NAME = "opt"


class OPT(HFMapping):
    """OPTForCausalLM (pre-LN only). HF's learned positions start at row 2 (offset); Megatron's at 0."""

    hf_architectures = ("OPTForCausalLM",)
    export_architecture = "OPTForCausalLM"
    POSITION_OFFSET = 2
    OFFSET_ROWS = "model.decoder.embed_positions.offset_rows"  # kept by import, given back by export
    extra_hf = (OFFSET_ROWS,)

    @staticmethod
    def model_config(hf):
        arch = "OPTForCausalLM"
        hidden = require(hf, "hidden_size", arch)
        if hf.get("do_layer_norm_before", True) is False:
            raise UserError("config.json: do_layer_norm_before=false (post-LN OPT, e.g. opt-350m) is not "
                            "supported: Megatron's GPTModel is pre-LN")
        if hf.get("word_embed_proj_dim", hidden) != hidden:
            raise UserError(f"config.json: word_embed_proj_dim={hf['word_embed_proj_dim']} differs from "
                            f"hidden_size={hidden} (project_in/project_out variant) and is not supported")
        if hf.get("activation_function", "relu") != "relu":
            raise UserError(f"config.json: activation_function={hf['activation_function']!r} is not "
                            f"supported for OPT (only relu)")
        for flag in ("enable_bias", "layer_norm_elementwise_affine"):
            if hf.get(flag, True) is False:
                raise UserError(f"config.json: {flag}=false is not supported for OPT")
        if hf.get("_remove_final_layer_norm"):
            raise UserError("config.json: _remove_final_layer_norm=true is not supported for OPT")
        return ModelConfig(
            arch=NAME, num_layers=require(hf, "num_hidden_layers", arch), hidden_size=hidden,
            ffn_hidden_size=require(hf, "ffn_dim", arch), num_attention_heads=require(hf, "num_attention_heads", arch),
            vocab_size=require(hf, "vocab_size", arch),
            max_position_embeddings=require(hf, "max_position_embeddings", arch),
            norm_epsilon=1e-5,  # HF's OPT uses nn.LayerNorm's default
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), params_dtype=dtype_name(hf))

    def hf_shapes(self):
        c = self.cfg
        H, F = c.hidden_size, c.ffn_hidden_size
        d = "model.decoder."
        shapes = {d + "embed_tokens.weight": (c.vocab_size, H),
                  d + "embed_positions.weight": (c.max_position_embeddings + self.POSITION_OFFSET, H),
                  d + "final_layer_norm.weight": (H,), d + "final_layer_norm.bias": (H,)}
        if not c.tie_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, H)
        for i in range(c.num_layers):
            p = f"{d}layers.{i}."
            for x in ("q", "k", "v", "out"):
                shapes[f"{p}self_attn.{x}_proj.weight"] = (H, H)
                shapes[f"{p}self_attn.{x}_proj.bias"] = (H,)
            shapes.update({p + "self_attn_layer_norm.weight": (H,), p + "self_attn_layer_norm.bias": (H,),
                           p + "final_layer_norm.weight": (H,), p + "final_layer_norm.bias": (H,),
                           p + "fc1.weight": (F, H), p + "fc1.bias": (F,),
                           p + "fc2.weight": (H, F), p + "fc2.bias": (H,)})
        return shapes

    @property
    def optional_hf(self):
        return ("lm_head.weight",) if self.cfg.tie_embeddings else ()

    _simple = {"input_layernorm": "self_attn_layer_norm", "pre_mlp_layernorm": "final_layer_norm",
               "self_attention.linear_proj": "self_attn.out_proj", "mlp.linear_fc1": "fc1", "mlp.linear_fc2": "fc2"}

    def to_megatron(self, name, get):
        c = self.cfg
        d = "model.decoder."
        if name == "embedding.word_embeddings.weight":
            return pad_rows(get(d + "embed_tokens.weight"), self.padded_vocab)
        if name == "embedding.position_embeddings.weight":
            return get(d + "embed_positions.weight")[self.POSITION_OFFSET:]
        if name == "output_layer.weight":
            return pad_rows(get("lm_head.weight"), self.padded_vocab)
        if name.startswith("decoder.final_layernorm."):
            return get(d + "final_layer_norm." + name.rsplit(".", 1)[1])
        i, rest = layer_name(name)
        p = f"{d}layers.{i}."
        module, kind = rest.rsplit(".", 1)
        if module in self._simple:
            return get(f"{p}{self._simple[module]}.{kind}")
        if module == "self_attention.linear_qkv":
            return fuse_qkv(*(get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), c.num_attention_heads,
                            self.head_dim)
        raise KeyError(name)

    def hf_extra(self, get):
        """HF's offset rows of the position table: only used for left-padding positions, no Megatron
        counterpart; kept so that an exported converted model is bit-identical."""
        return {self.OFFSET_ROWS: get("model.decoder.embed_positions.weight")[:self.POSITION_OFFSET].clone()}

    def to_hf(self, group, get):
        import torch

        c = self.cfg
        d = "model.decoder."
        if group == "embedding":
            positions = get("embedding.position_embeddings.weight")
            offset_rows = None if self.extra is None else self.extra[self.OFFSET_ROWS]
            if offset_rows is None:  # rows HF only uses for left-padding positions; unknown after training
                offset_rows = positions.new_zeros(self.POSITION_OFFSET, positions.shape[1])
            return {d + "embed_tokens.weight": get("embedding.word_embeddings.weight")[:c.vocab_size],
                    d + "embed_positions.weight": torch.cat([offset_rows.to(positions.dtype), positions])}
        if group == "final":
            out = {f"{d}final_layer_norm.{k}": get(f"decoder.final_layernorm.{k}") for k in ("weight", "bias")}
            if not c.tie_embeddings:
                out["lm_head.weight"] = get("output_layer.weight")[:c.vocab_size]
            return out
        m, p = f"decoder.layers.{group}.", f"{d}layers.{group}."
        out = {}
        for meg, hf in self._simple.items():
            for kind in ("weight", "bias"):
                out[f"{p}{hf}.{kind}"] = get(f"{m}{meg}.{kind}")
        heads = c.num_attention_heads
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(get(f"{m}self_attention.linear_qkv.{kind}"), heads, heads, self.head_dim)
            out.update({f"{p}self_attn.q_proj.{kind}": q, f"{p}self_attn.k_proj.{kind}": k,
                        f"{p}self_attn.v_proj.{kind}": v})
        return out

    def hf_config(self):
        c = self.cfg
        if not math.isclose(c.norm_epsilon, 1e-5):
            raise UserError(f"norm_epsilon={c.norm_epsilon} cannot be expressed in an HF OPT config (fixed 1e-5)")
        return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "ffn_dim": c.ffn_hidden_size,
                "num_attention_heads": c.num_attention_heads, "max_position_embeddings": c.max_position_embeddings,
                "do_layer_norm_before": True, "word_embed_proj_dim": c.hidden_size, "activation_function": "relu",
                "enable_bias": True, "layer_norm_elementwise_affine": True, "tie_word_embeddings": c.tie_embeddings,
                "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0}


FAMILY = ModelFamily(
    name=NAME, summary="OPT (pre-LN)",
    normalization="LayerNorm", activation="relu", gated_linear_unit=False, add_bias_linear=True,
    add_qkv_bias=True, position_embedding_type="learned_absolute",
    tie_embeddings=True, supports_gqa=False,
    hf=OPT,
)
