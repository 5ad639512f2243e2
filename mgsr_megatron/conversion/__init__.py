"""Hugging Face <-> Megatron checkpoint conversion (LLaMA/Mistral/Qwen2, GPT-2, OPT); see docs/conversion.md.

Public (also re-exported here):
  import_hf, export_hf          convert.py: HF directory -> Megatron checkpoint directory, and back
                                (what `tools/convert_checkpoint.py` runs)
  hf_architectures, for_hf_config  the supported HF architectures and their families; each family's
                                parameter mapping lives in its module, mgsr_megatron/architectures/
hf_io.py and megatron_io.py (streaming readers/writers of both formats) are internal.
"""

from mgsr_megatron.architectures import for_hf_config, hf_architectures
from mgsr_megatron.conversion.convert import export_hf, import_hf

__all__ = ["hf_architectures", "for_hf_config", "export_hf", "import_hf"]
