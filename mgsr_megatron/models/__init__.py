"""Megatron-Core GPTModel builders (LLaMA, GPT-2, OPT styles), the frozen teacher, vocabulary padding.

Public:
  build_model, build_teacher, resolve, transformer_config   builder.py (re-exported here)
  padded_vocab_size, vocab_shard_range, mask_padded_logits  vocab.py (re-exported here)
  checkpoint.save_model, checkpoint.load_model, checkpoint.read_model_config   model checkpoint directories
state_dict.py, pipeline.py and trust.py serve conversion, training and evaluation.
"""

from mgsr_megatron.models.builder import build_model, build_teacher, resolve, transformer_config
from mgsr_megatron.models.vocab import mask_padded_logits, padded_vocab_size, vocab_shard_range

__all__ = ["build_model", "build_teacher", "resolve", "transformer_config", "mask_padded_logits",
           "padded_vocab_size", "vocab_shard_range"]
