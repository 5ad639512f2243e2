"""Build Megatron-Core GPTModels for the registered model families (mgsr_megatron/architectures:
llama, gpt2, opt). The family (`get_family(cfg.arch)`) gives the TransformerConfig options, the layer
spec, the position embedding and the defaults; this module holds what every family shares.

Models use Megatron's local (non-TransformerEngine) layer spec and CPU initialisation, so the same
seed gives the same full weights at every TP size. Dropout is off: distillation targets are exact.
"""

from __future__ import annotations

import dataclasses

import torch

from mgsr_megatron import platform
from mgsr_megatron.architectures import REGISTRY, get_family
from mgsr_megatron.config import ModelConfig
from mgsr_megatron.errors import UserError
from mgsr_megatron.models.vocab import padded_vocab_size

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(cfg: ModelConfig) -> ModelConfig:
    """Fill the family's defaults (FFN size, tied embeddings) and check the fields."""
    family = get_family(cfg.arch)
    if cfg.params_dtype not in _DTYPES:
        raise UserError(f"params_dtype '{cfg.params_dtype}' is not one of {', '.join(_DTYPES)}")
    if cfg.hidden_size % cfg.num_attention_heads and cfg.kv_channels is None:
        raise UserError(f"hidden_size={cfg.hidden_size} is not divisible by "
                        f"num_attention_heads={cfg.num_attention_heads}; set kv_channels")
    groups = cfg.num_query_groups or cfg.num_attention_heads
    if cfg.num_attention_heads % groups:
        raise UserError(f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                        f"num_query_groups={groups}")
    if not family.supports_gqa and cfg.num_query_groups not in (None, cfg.num_attention_heads):
        gqa = ", ".join(name for name, other in REGISTRY.items() if other.supports_gqa)
        raise UserError(f"grouped-query attention (num_query_groups) is only supported for arch {gqa}")
    ffn = cfg.ffn_hidden_size
    if ffn is None:
        ffn = family.default_ffn_hidden_size(cfg.hidden_size)
    tie = cfg.tie_embeddings if cfg.tie_embeddings is not None else family.tie_embeddings
    return dataclasses.replace(cfg, ffn_hidden_size=ffn, tie_embeddings=tie, num_query_groups=groups)


def transformer_config(cfg: ModelConfig, tp: int = 1, pp: int = 1):
    from megatron.core.transformer import TransformerConfig

    cfg = resolve(cfg)
    dtype = _DTYPES[cfg.params_dtype]
    family_options = get_family(cfg.arch).transformer_options(cfg)
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels, layernorm_epsilon=cfg.norm_epsilon,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, perform_initialization=True, params_dtype=dtype,
        bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16, pipeline_dtype=dtype,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        # activation recomputation (training only: Megatron skips it in eval mode, i.e. generation)
        recompute_granularity=cfg.recompute_granularity, recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        **family_options,
    )


def build_model(cfg: ModelConfig, pre_process: bool | None = None, post_process: bool | None = None):
    """A GPTModel for this rank's TP/PP position (parallel_state must be initialised)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cfg = resolve(cfg)
    config = transformer_config(cfg, tp, pp)
    family = get_family(cfg.arch)
    spec = family.layer_spec(config)
    model = GPTModel(
        config=config, transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=family.position_embedding_type,
        rotary_base=int(cfg.rope_theta),
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
    )
    model.true_vocab_size = cfg.vocab_size
    if config.params_dtype is not torch.float32:
        # the local spec builds its norms in torch's default dtype; as Megatron's Float16Module does,
        # the whole model runs in the 16-bit dtype (a GPT-2/OPT LayerNorm's fp32 output cannot enter a
        # bf16 linear layer); the optimizer keeps fp32 main weights of every parameter
        model.to(config.params_dtype)
    if platform.cuda_available() and not any(p.is_meta for p in model.parameters()):
        model.to(platform.device())  # CPU initialisation (layout-independent), then onto the GPU
    return model


def build_teacher(cfg: ModelConfig):
    """The teacher: same TP/PP groups as the student, frozen and in eval mode, never optimised or saved."""
    model = build_model(cfg)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def check_same_vocab(teacher: ModelConfig, student: ModelConfig) -> None:
    if teacher.vocab_size != student.vocab_size:
        raise UserError(f"teacher vocab_size={teacher.vocab_size} differs from student "
                        f"vocab_size={student.vocab_size}: distillation needs one shared tokenizer")
