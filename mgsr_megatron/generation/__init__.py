"""On-policy generation: vocab-parallel sampling, the KV-cached TP/PP generator, SCRG (method.md §1)."""

from mgsr_megatron.generation.generator import GenerationOutput, generate
from mgsr_megatron.generation.sampling import sample
from mgsr_megatron.generation.scrg import scrg

__all__ = ["GenerationOutput", "generate", "sample", "scrg"]
