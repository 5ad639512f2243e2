"""Vocab-parallel losses of MGSR: SFT, the baseline divergences, DAC-KL with ClipNet, the span loss.

Every function takes vocab-parallel logits shards (`[tokens, V/TP]` or `[b, s, V/TP]`, padded columns
already -inf) and a TP process group (default: Megatron's, when initialised), and is exact for any TP.
See docs/losses.md.
"""

from mgsr_megatron.losses.dac_kl import ClipNet, band_kl, bounds
from mgsr_megatron.losses.divergences import KINDS, divergence
from mgsr_megatron.losses.objective import mgsr_objective
from mgsr_megatron.losses.vocab_parallel import count_communication

__all__ = ["ClipNet", "KINDS", "band_kl", "bounds", "count_communication", "divergence", "mgsr_objective"]
