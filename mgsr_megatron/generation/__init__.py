"""On-policy generation: vocab-parallel sampling, the KV-cached TP/PP generator, SCRG (method.md §1).

Public (re-exported here):
  generate, GenerationOutput   generator.py: batched KV-cached generation under TP and PP
  sample                       sampling.py: greedy / temperature / top-k / top-p on vocab-parallel logits
  scrg                         scrg.py: a student sample plus the teacher's corrections
kv_decode.py (the lean decode stage) is internal.
"""

from mgsr_megatron.generation.generator import GenerationOutput, generate
from mgsr_megatron.generation.sampling import sample
from mgsr_megatron.generation.scrg import scrg

__all__ = ["GenerationOutput", "generate", "sample", "scrg"]
