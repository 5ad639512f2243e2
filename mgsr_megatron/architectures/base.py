"""`ModelFamily`, the description of one model family, and what every family's Hugging Face mapping shares.

A family is one frozen `ModelFamily` (the Megatron model's options, defaults, rules, the planner's
formula pieces) plus an `HFMapping` subclass (the Hugging Face <-> Megatron parameter names and layouts).
Both live in the family's own module (llama.py, gpt2.py, opt.py); the registry is `__init__.py`.

Nothing here imports torch or Megatron at module level: `mgsr_megatron.config` validates `arch` against
the registry and must stay importable without them. Tensor code imports torch where it runs.

Megatron's layout (TP=1, `decoder.layers.{i}.` prefix for layer tensors):
  self_attention.linear_qkv   fused QKV in per-query-group order: for g in groups:
                              [q rows of the heads/groups heads of group g; k_g; v_g] (head_dim rows each)
  mlp.linear_fc1              SwiGLU: [gate; up]; otherwise the plain up projection
  embedding / output_layer    vocabulary padded with zero rows to a multiple of
                              make_vocab_size_divisible_by (TP-independent, see models/vocab.py)
HF Linear weights are [out, in] like Megatron's; GPT-2's Conv1D stores [in, out] (transposed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mgsr_megatron.errors import UserError

if TYPE_CHECKING:
    import torch

    from mgsr_megatron.config import ModelConfig


def _four_times(hidden: int) -> int:
    return 4 * hidden


@dataclass(frozen=True)
class ModelFamily:
    """Everything the framework knows about one model family; `ModelConfig.arch` names it.

    The builder (models/builder.py), the converter (conversion/) and the planner (planner.py) ask this
    object; none of them compares family names. Register a new one with
    `mgsr_megatron.architectures.register_family` (or add it to `REGISTRY`).
    """

    name: str  # the ModelConfig.arch value
    summary: str  # one line: what the family covers
    # --- the Megatron GPTModel: TransformerConfig options and the local layer spec
    normalization: str  # Megatron's name: "RMSNorm" | "LayerNorm" (LayerNorm has a bias)
    activation: str | Callable  # a torch.nn.functional name ("silu", "relu") or the function itself
    gated_linear_unit: bool  # fc1 = [gate; up] (SwiGLU); its output is 2 * ffn_hidden_size wide
    add_bias_linear: bool  # biases on every linear layer (QKV included, as in Megatron)
    add_qkv_bias: bool | None  # QKV bias; None: ModelConfig.add_qkv_bias decides (Qwen2 on llama)
    position_embedding_type: str  # "rope" (ModelConfig.rope_theta / rope_scaling_factor) | "learned_absolute"
    # --- defaults and rules
    tie_embeddings: bool  # default of ModelConfig.tie_embeddings
    supports_gqa: bool  # whether num_query_groups may differ from num_attention_heads
    default_ffn_hidden_size: Callable[[int], int] = _four_times  # hidden_size -> ffn_hidden_size
    # --- conversion: the HFMapping subclass (None: no Hugging Face import/export for this family)
    hf: type[HFMapping] | None = None

    # ---------------------------------------------------------------- the Megatron model
    def activation_func(self) -> Callable:
        if callable(self.activation):
            return self.activation
        import torch.nn.functional as F

        return getattr(F, self.activation)

    def qkv_bias(self, cfg: ModelConfig) -> bool:
        """Whether the model's linear_qkv has a bias (Megatron: add_bias_linear or add_qkv_bias)."""
        return self.add_bias_linear or (cfg.add_qkv_bias if self.add_qkv_bias is None else self.add_qkv_bias)

    def transformer_options(self, cfg: ModelConfig) -> dict:
        """This family's TransformerConfig keyword arguments."""
        return dict(normalization=self.normalization, gated_linear_unit=self.gated_linear_unit,
                    activation_func=self.activation_func(), add_bias_linear=self.add_bias_linear,
                    add_qkv_bias=cfg.add_qkv_bias if self.add_qkv_bias is None else self.add_qkv_bias)

    def layer_spec(self, config):
        """The transformer layer spec for a TransformerConfig: Megatron's local (non-TE) spec."""
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization=config.normalization)

    @property
    def uses_rope(self) -> bool:
        return self.position_embedding_type == "rope"

    # ---------------------------------------------------------------- config validation
    def check_config(self, model: ModelConfig, name: str) -> None:
        """Family-specific checks of a (teacher or student) ModelConfig, run by `config.validate`."""
        head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
        if self.uses_rope and head_dim % 2:
            raise UserError(f"{name}: head dimension {head_dim} (hidden_size / num_attention_heads or "
                            f"kv_channels) must be even for rotary position embeddings")

    # ---------------------------------------------------------------- the planner's formula pieces
    # Column-parallel weights and biases are split over TP; norms, row-parallel biases and learned
    # position embeddings are replicated (Megatron's layout). `m` is a resolved ModelConfig.
    def norm_params(self, hidden: int) -> int:
        """Parameters of one norm: RMSNorm a weight, LayerNorm a weight and a bias."""
        return hidden if self.normalization == "RMSNorm" else 2 * hidden

    @property
    def fc1_multiple(self) -> int:
        """linear_fc1's output width in units of ffn_hidden_size (SwiGLU: gate and up)."""
        return 2 if self.gated_linear_unit else 1

    @property
    def mlp_activation_factor(self) -> int:
        """MLP activations kept for backward, in units of s*b*ffn_hidden_size elements: fc1's output
        and fc2's input (GELU/ReLU: 2), SwiGLU: fc1's 2f output, silu(gate), fc2's input (4)."""
        return 4 if self.gated_linear_unit else 2

    def layer_params(self, m: ModelConfig, tp: int) -> int:
        """Parameters of one transformer layer held by one TP rank."""
        h, f, a, g = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups
        d = m.kv_channels or h // a
        qkv_rows = a * d + 2 * g * d
        bias = self.add_bias_linear
        attention = (h * qkv_rows + (qkv_rows if self.qkv_bias(m) else 0)) // tp + a * d * h // tp \
            + (h if bias else 0)
        fc1_rows = self.fc1_multiple * f
        mlp = (h * fc1_rows + f * h + (fc1_rows if bias else 0)) // tp + (h if bias else 0)
        return attention + mlp + 2 * self.norm_params(h)

    def position_params(self, m: ModelConfig) -> int:
        """Learned position embeddings (replicated over TP, on the first pipeline stage)."""
        return m.max_position_embeddings * m.hidden_size if self.position_embedding_type == "learned_absolute" else 0

    # ---------------------------------------------------------------- conversion
    def hf_mapping(self, cfg: ModelConfig) -> HFMapping:
        if self.hf is None:
            raise UserError(f"model arch '{self.name}' has no Hugging Face mapping (conversion not supported)")
        return self.hf(cfg)


# --------------------------------------------------------------------------------------------------
# Hugging Face mappings: shared tensor helpers and the base class.

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """[heads*hd, ...], [groups*hd, ...] x2 -> Megatron's [(heads + 2*groups)*hd, ...] per-group order."""
    import torch

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
    import torch

    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def layer_name(name: str) -> tuple[int, str] | None:
    """"decoder.layers.3.mlp.linear_fc1.weight" -> (3, "mlp.linear_fc1.weight")."""
    match = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else None


def require(hf: dict, key: str, arch: str):
    """config.json's `key`, or a one-line error naming it."""
    if key not in hf:
        raise UserError(f"config.json: {arch} config has no '{key}'")
    return hf[key]


def dtype_name(hf: dict) -> str:
    """config.json's torch_dtype as a ModelConfig.params_dtype (float32 when absent or unknown)."""
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(dtype), "float32")


def _name_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class HFMapping:
    """One family's Hugging Face names and layouts. Subclasses define the HF side; `cfg` is resolved."""

    hf_architectures: tuple[str, ...] = ()  # config.json "architectures" names this mapping imports
    export_architecture = ""
    # config.json model_types (besides the exported one) whose original config.json export keeps as a
    # template (architecture name, token ids, ...)
    template_model_types: tuple[str, ...] = ()
    # names of the HF tensors with no Megatron counterpart that import keeps beside the checkpoint
    # (convert.HF_EXTRA) and export gives back (`self.extra`); () for most families
    extra_hf: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig):
        from mgsr_megatron.architectures import get_family
        from mgsr_megatron.models.builder import resolve
        from mgsr_megatron.models.vocab import padded_vocab_size

        self.cfg = resolve(cfg)
        c = self.cfg
        self.family = get_family(c.arch)
        self.head_dim = c.kv_channels or c.hidden_size // c.num_attention_heads
        self.padded_vocab = padded_vocab_size(c.vocab_size, c.make_vocab_size_divisible_by)
        self.extra: dict[str, torch.Tensor] | None = None  # the kept `extra_hf` tensors, set before export

    # --- to be defined per family
    @classmethod
    def model_config(cls, hf: dict) -> ModelConfig:
        """The ModelConfig of an HF config.json (refusing what the family cannot represent)."""
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

    def hf_extra(self, get) -> dict[str, torch.Tensor]:
        """The `extra_hf` tensors of an HF checkpoint being imported (`get` reads HF tensors)."""
        return {}

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
