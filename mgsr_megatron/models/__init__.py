"""Megatron-Core GPTModel builders (LLaMA, GPT-2, OPT styles), the frozen teacher, vocabulary padding."""

from mgsr_megatron.models.builder import build_model, build_teacher, resolve, transformer_config
from mgsr_megatron.models.vocab import mask_padded_logits, padded_vocab_size, vocab_shard_range

__all__ = ["build_model", "build_teacher", "resolve", "transformer_config", "mask_padded_logits",
           "padded_vocab_size", "vocab_shard_range"]
