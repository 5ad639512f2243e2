"""Deterministic, resumable micro-batch sampler sharded over data-parallel ranks.

One GLOBAL order per epoch — a permutation of all sample indices drawn from (seed, epoch) — is cut into
windows of `micro_batch_size * dp_size` consecutive entries; DP rank r takes the r-th slice of
`micro_batch_size` of each window. So the ranks of one window hold disjoint samples, every rank walks
the same global order. An epoch's tail shorter than one training STEP (`step_samples`, the global
batch) is skipped, and only at a step boundary: skipping a tail shorter than a window instead would skip
a different tail at each DP size, and the layouts would part ways after the first epoch.

The state is the position in that global order (`epoch`, `position` = samples of the epoch handed out
over all ranks), not per-rank counters: a run resumed with another DP size or micro-batch size
continues the same global order where it stopped.
"""

from __future__ import annotations

import numpy as np

from mgsr_megatron.errors import UserError


class DistributedResumableSampler:
    """Iterate to get lists of sample indices, one micro-batch of THIS rank per item, endlessly
    (epoch after epoch); `state_dict()` after k items resumes at item k+1."""

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 1234, shuffle: bool = True, step_samples: int | None = None):
        window = micro_batch_size * dp_size
        step_samples = step_samples or window
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise UserError(f"sampler: bad micro_batch_size={micro_batch_size} / dp_rank={dp_rank} / dp_size={dp_size}")
        if num_samples < window:
            raise UserError(f"the dataset has {num_samples} samples, fewer than one micro-batch on every "
                            f"data-parallel rank ({micro_batch_size} x {dp_size} = {window})")
        if step_samples % window or num_samples < step_samples:
            raise UserError(f"the dataset has {num_samples} samples; one training step takes {step_samples}, "
                            f"which must be a multiple of micro-batch x DP = {window} and fit in the dataset")
        self.step_samples = step_samples
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        """The global sample order of `epoch` (the same on every rank)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples)
            self._order_epoch = epoch
        return self._order

    @property
    def window(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        at_step_start = self.position % self.step_samples == 0
        if at_step_start and self.position + self.step_samples > self.num_samples:  # skip the epoch's tail
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.dp_rank * self.micro_batch_size
        indices = self.order(self.epoch)[start:start + self.micro_batch_size]
        self.position += self.window
        return [int(i) for i in indices]

    def micro_batches_per_epoch(self) -> int:
        return self.num_samples // self.step_samples * (self.step_samples // self.window)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise UserError(f"data sampler state from the checkpoint does not fit this run: it saw "
                            f"{state['num_samples']} samples with seed {state['seed']}, this run has "
                            f"{self.num_samples} samples with seed {self.seed} (did the dataset change?)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
