"""Hugging Face <-> Megatron checkpoint conversion (LLaMA/Mistral/Qwen2, GPT-2, OPT); see docs/conversion.md."""

from mgsr_megatron.conversion.architectures import ARCHITECTURES, for_hf_config
from mgsr_megatron.conversion.convert import export_hf, import_hf

__all__ = ["ARCHITECTURES", "for_hf_config", "export_hf", "import_hf"]
