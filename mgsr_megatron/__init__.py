"""mgsr_megatron: MGSR LLM distillation (SCRG + DAC-KL + span loss) on Megatron-Core."""

import warnings

# Megatron-Core announces every optional accelerator library it does not find (Apex, Transformer
# Engine) and a few of its own deprecations at import time; none is actionable for users here.
for _pattern in (r".*(Apex|Transformer Engine).* not installed.*", r".*full scope is deprecated.*",
                 r".*torch\.jit\.script_method.*", r".*dynamic_context.*", r".*custom_layers\.transformer_engine.*",
                 r".*MLP requires ffn_hidden_size.*", r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
                 r".*deprecating ShardedTensor.*"):
    warnings.filterwarnings("ignore", message=_pattern)

__version__ = "0.1.0"
