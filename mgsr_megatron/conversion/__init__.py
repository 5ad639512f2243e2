"""Hugging Face <-> Megatron checkpoint conversion (LLaMA/Mistral/Qwen2, GPT-2, OPT); see docs/conversion.md.

Public (also re-exported here):
  import_hf, export_hf          convert.py: HF directory -> Megatron checkpoint directory, and back
                                (what `tools/convert_checkpoint.py` runs)
  ARCHITECTURES, for_hf_config  architectures.py: the supported HF architectures and their mapping
hf_io.py and megatron_io.py (streaming readers/writers of both formats) are internal.
"""

from mgsr_megatron.conversion.architectures import ARCHITECTURES, for_hf_config
from mgsr_megatron.conversion.convert import export_hf, import_hf

__all__ = ["ARCHITECTURES", "for_hf_config", "export_hf", "import_hf"]
