"""Hugging Face <-> Megatron GPTModel parameter mappings, one class per architecture family.

Megatron's layout (TP=1, `decoder.layers.{i}.` prefix for layer tensors):
  self_attention.linear_qkv   fused QKV in per-query-group order: for g in groups:
                              [q rows of the heads/groups heads of group g; k_g; v_g] (head_dim rows each)
  mlp.linear_fc1              SwiGLU: [gate; up]; otherwise the plain up projection
  embedding / output_layer    vocabulary padded with zero rows to a multiple of
                              make_vocab_size_divisible_by (TP-independent, see models/vocab.py)
HF Linear weights are [out, in] like Megatron's; GPT-2's Conv1D stores [in, out] (transposed).
"""

from __future__ import annotations

import math
import re

import torch

from mgsr_megatron.config import ModelConfig
from mgsr_megatron.errors import UserError
from mgsr_megatron.models.builder import resolve
from mgsr_megatron.models.vocab import padded_vocab_size

# Megatron's Llama-3 RoPE scaling has these fixed (megatron/core/models/common/embeddings/rotary_pos_embedding.py)
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """[heads*hd, ...], [groups*hd, ...] x2 -> Megatron's [(heads + 2*groups)*hd, ...] per-group order."""
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """The inverse of `fuse_qkv`."""
    rest = qkv.shape[1:]
    q_rows = heads // groups * head_dim
    q, k, v = qkv.reshape(groups, q_rows + 2 * head_dim, *rest).split([q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _layer(name: str) -> tuple[int, str] | None:
    match = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else None


class Architecture:
    """Subclasses define the HF names. `cfg` is a resolved ModelConfig."""

    hf_architectures: tuple[str, ...] = ()
    export_architecture = ""

    def __init__(self, cfg: ModelConfig):
        self.cfg = resolve(cfg)
        c = self.cfg
        self.head_dim = c.kv_channels or c.hidden_size // c.num_attention_heads
        self.padded_vocab = padded_vocab_size(c.vocab_size, c.make_vocab_size_divisible_by)

    # --- to be defined per architecture
    @staticmethod
    def model_config(hf: dict) -> ModelConfig:
        raise NotImplementedError

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def to_megatron(self, name: str, get) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, group, get) -> dict[str, torch.Tensor]:
        """HF tensors of one group: "embedding", a layer number, or "final"."""
        raise NotImplementedError

    def hf_config(self) -> dict:
        raise NotImplementedError

    # --- shared
    optional_hf: tuple[str, ...] = ()  # e.g. a tied lm_head.weight some checkpoints still store
    ignored_hf = re.compile(r"$^")  # non-parameter buffers some checkpoints contain

    def check_tensors(self, found: dict[str, tuple[int, ...]], where: str) -> None:
        """Every expected tensor present with its shape; nothing unexpected."""
        expected = self.hf_shapes()
        missing = sorted(set(expected) - set(found))
        if missing:
            raise UserError(f"{where}: missing tensor(s) {_name_list(missing)}")
        extra = sorted(n for n in set(found) - set(expected)
                       if n not in self.optional_hf and not self.ignored_hf.search(n))
        if extra:
            raise UserError(f"{where}: unexpected tensor(s) {_name_list(extra)} "
                            f"(not part of {self.export_architecture} with this config.json)")
        for name, shape in expected.items():
            if tuple(found[name]) != tuple(shape):
                raise UserError(f"{where}: tensor {name} has shape {list(found[name])}, "
                                f"config.json implies {list(shape)}")

    def groups(self) -> list:
        return ["embedding", *range(self.cfg.num_layers), "final"]


def _name_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _require(hf: dict, key: str, arch: str):
    if key not in hf:
        raise UserError(f"config.json: {arch} config has no '{key}'")
    return hf[key]


def _dtype_name(hf: dict) -> str:
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(dtype), "float32")


# --------------------------------------------------------------------------------------------------
class Llama(Architecture):
    """LlamaForCausalLM; MistralForCausalLM and Qwen2ForCausalLM without sliding window (Qwen2: QKV bias)."""

    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    export_architecture = "LlamaForCausalLM"
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
        heads = _require(hf, "num_attention_heads", arch)
        hidden = _require(hf, "hidden_size", arch)
        head_dim = hf.get("head_dim") or hidden // heads
        return ModelConfig(
            arch="llama", num_layers=_require(hf, "num_hidden_layers", arch), hidden_size=hidden,
            ffn_hidden_size=_require(hf, "intermediate_size", arch), num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=None if head_dim * heads == hidden else head_dim,
            vocab_size=_require(hf, "vocab_size", arch),
            max_position_embeddings=_require(hf, "max_position_embeddings", arch),
            rope_theta=theta, rope_scaling_factor=factor, norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            add_qkv_bias=arch == "Qwen2ForCausalLM", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            params_dtype=_dtype_name(hf))

    def hf_shapes(self):
        c, hd = self.cfg, self.head_dim
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
            if c.add_qkv_bias:
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
        c = self.cfg
        if name == "embedding.word_embeddings.weight":
            return pad_rows(get("model.embed_tokens.weight"), self.padded_vocab)
        if name == "output_layer.weight":
            return pad_rows(get("lm_head.weight"), self.padded_vocab)
        if name == "decoder.final_layernorm.weight":
            return get("model.norm.weight")
        i, rest = _layer(name)
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
        kinds = ("weight", "bias") if c.add_qkv_bias else ("weight",)
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
        qwen = c.add_qkv_bias
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
            "rope_scaling": None if c.rope_scaling_factor is None else {k: v for k, v in rope.items() if k != "rope_theta"},
            "tie_word_embeddings": c.tie_embeddings, "attention_dropout": 0.0,
        }
        if qwen:
            config.update(use_sliding_window=False, sliding_window=None)
        else:
            config.update(attention_bias=False, mlp_bias=False)
        return config


# --------------------------------------------------------------------------------------------------
class GPT2(Architecture):
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
        hidden = _require(hf, "n_embd", arch)
        return ModelConfig(
            arch="gpt2", num_layers=_require(hf, "n_layer", arch), hidden_size=hidden,
            ffn_hidden_size=hf.get("n_inner") or 4 * hidden, num_attention_heads=_require(hf, "n_head", arch),
            vocab_size=_require(hf, "vocab_size", arch), max_position_embeddings=_require(hf, "n_positions", arch),
            norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)), tie_embeddings=True,
            params_dtype=_dtype_name(hf))

    def hf_shapes(self):
        c = self.cfg
        H, F = c.hidden_size, c.ffn_hidden_size
        shapes = {"transformer.wte.weight": (c.vocab_size, H), "transformer.wpe.weight": (c.max_position_embeddings, H),
                  "transformer.ln_f.weight": (H,), "transformer.ln_f.bias": (H,)}
        for i in range(c.num_layers):
            p = f"transformer.h.{i}."
            shapes.update({p + "ln_1.weight": (H,), p + "ln_1.bias": (H,), p + "ln_2.weight": (H,), p + "ln_2.bias": (H,),
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
        i, rest = _layer(name)
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


# --------------------------------------------------------------------------------------------------
class OPT(Architecture):
    """OPTForCausalLM (pre-LN only). HF's learned positions start at row 2 (offset); Megatron's at 0."""

    hf_architectures = ("OPTForCausalLM",)
    export_architecture = "OPTForCausalLM"
    POSITION_OFFSET = 2

    @staticmethod
    def model_config(hf):
        arch = "OPTForCausalLM"
        hidden = _require(hf, "hidden_size", arch)
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
            arch="opt", num_layers=_require(hf, "num_hidden_layers", arch), hidden_size=hidden,
            ffn_hidden_size=_require(hf, "ffn_dim", arch), num_attention_heads=_require(hf, "num_attention_heads", arch),
            vocab_size=_require(hf, "vocab_size", arch),
            max_position_embeddings=_require(hf, "max_position_embeddings", arch),
            norm_epsilon=1e-5,  # HF's OPT uses nn.LayerNorm's default
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)), params_dtype=_dtype_name(hf))

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
                           p + "fc1.weight": (F, H), p + "fc1.bias": (F,), p + "fc2.weight": (H, F), p + "fc2.bias": (H,)})
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
        i, rest = _layer(name)
        p = f"{d}layers.{i}."
        module, kind = rest.rsplit(".", 1)
        if module in self._simple:
            return get(f"{p}{self._simple[module]}.{kind}")
        if module == "self_attention.linear_qkv":
            return fuse_qkv(*(get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), c.num_attention_heads, self.head_dim)
        raise KeyError(name)

    def to_hf(self, group, get, offset_rows: torch.Tensor | None = None):
        c = self.cfg
        d = "model.decoder."
        if group == "embedding":
            positions = get("embedding.position_embeddings.weight")
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


ARCHITECTURES: dict[str, type[Architecture]] = {name: cls for cls in (Llama, GPT2, OPT) for name in cls.hf_architectures}
BY_ARCH = {"llama": Llama, "gpt2": GPT2, "opt": OPT}


def for_hf_config(hf: dict) -> tuple[type[Architecture], ModelConfig]:
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        shown = ", ".join(names) if names else f"none (model_type={hf.get('model_type')!r})"
        raise UserError(f"config.json: architecture {shown} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    cls = ARCHITECTURES[names[0]]
    return cls, cls.model_config(hf)
