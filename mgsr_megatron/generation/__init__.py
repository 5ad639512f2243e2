"""On-policy generation: vocab-parallel sampling, the KV-cached TP/PP generator, SCRG (method.md §1).

Public (re-exported here):
  generate, GenerationOutput   generator.py: batched KV-cached generation under TP and PP
  sample, SamplingOptions      sampling.py: greedy / temperature / top-k / top-p on vocab-parallel logits;
                               the options object every function here takes whole
  scrg, ScrgSettings           scrg.py: a student sample plus the teacher's corrections
kv_decode.py (the lean decode stage) is internal; hf_stage.py (HfCausalLM) runs the same functions on a
Hugging Face causal LM (generator.GenerationModel, the interface for models that are not GPTModels).
"""

from mgsr_megatron.generation.generator import GenerationOutput, generate
from mgsr_megatron.generation.sampling import SamplingOptions, sample
from mgsr_megatron.generation.scrg import ScrgSettings, scrg

__all__ = ["GenerationOutput", "SamplingOptions", "ScrgSettings", "generate", "sample", "scrg"]
