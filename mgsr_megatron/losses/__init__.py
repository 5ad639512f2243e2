"""Vocab-parallel losses of MGSR: SFT, the baseline divergences, DAC-KL with ClipNet, the span loss.

Every function takes vocab-parallel logits shards (`[tokens, V/TP]` or `[b, s, V/TP]`, padded columns
already -inf) and a TP process group (default: Megatron's, when initialised), and is exact for any TP.
See docs/losses.md.

Public (re-exported here):
  mgsr_objective              objective.py: SFT + DAC-KL + span in one chunked pass (what the trainer runs)
  ObjectiveSettings, LossTargets   objective.py: its settings (built once from cfg.mgsr) and [b, s] inputs
  DacSettings                 dac_kl.py: the DAC-KL / token-level divergence settings (inside ObjectiveSettings)
  divergence, KINDS           divergences.py: the token-level divergences of the baselines
  ClipNet, band_kl, bounds    dac_kl.py: DAC-KL's learned band
  count_communication         vocab_parallel.py: payload bytes of the collectives in a block
vocab_parallel.py also holds the tensor-parallel collectives every package uses (all_reduce, all_gather,
all_gather_last).
"""

from mgsr_megatron.losses.dac_kl import ClipNet, DacSettings, band_kl, bounds
from mgsr_megatron.losses.divergences import KINDS, divergence
from mgsr_megatron.losses.objective import LossTargets, ObjectiveSettings, mgsr_objective
from mgsr_megatron.losses.vocab_parallel import count_communication

__all__ = ["ClipNet", "DacSettings", "KINDS", "LossTargets", "ObjectiveSettings", "band_kl", "bounds",
           "count_communication", "divergence", "mgsr_objective"]
