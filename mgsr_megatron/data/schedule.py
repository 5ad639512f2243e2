"""Which data a training step uses: ground truth, fresh student (SCRG) samples, or a replay.

    schedule = DataSchedule.from_config(cfg.mgsr, seed=cfg.parallel.seed)
    kind = schedule.decide(step, total_steps)          # "ground_truth" | "generate" | "replay"
    if kind == "generate":
        samples = ...SCRG (or the teacher, for seqkd: schedule.generator == "teacher")...
        schedule.push(samples)                          # off_policy: into the replay buffer
    elif kind == "replay":
        samples = schedule.replay(batch_size, step)
    ...
    schedule.report_validation_loss(valid_loss)         # after each evaluation (off_policy)

Schedules (`mgsr.data_schedule`, method.md section 1):
  off_policy    DistiLLM's adaptive off-policy schedule. threshold starts at `init_threshold` and
                rises by 0.1 (capped at 1) whenever the validation loss rose by >= `loss_eps` since
                the previous evaluation. Per step: samp = threshold * (1 - step / total_steps),
                r ~ U(0, 1);  r < samp, or (buffer not full and r < threshold) -> "generate"
                (push the samples); else r < threshold -> "replay"; else -> "ground_truth".
  on_policy     GKD: "generate" with probability `on_policy_lambda`, else "ground_truth".
  ground_truth  always "ground_truth" (supervised KD).
  seqkd         always "generate", by the TEACHER (`generator == "teacher"`, `use_scrg` False).

Every rank takes the same decision without communicating: r comes from a generator seeded by
(seed, step) only, and the rest of the state changes identically on every rank as long as every rank
reports the same validation loss (reduce it over data-parallel ranks first) and pushes the same
NUMBER of samples (its own local micro-batch). The replay buffer holds each rank's own samples; it is
part of the checkpoint (`state_dict()` per rank).
"""

from __future__ import annotations

import random
from collections import deque

from mgsr_megatron.errors import UserError

SCHEDULES = ("off_policy", "on_policy", "ground_truth", "seqkd")
THRESHOLD_STEP = 0.1  # DistiLLM's increment of the replay threshold


class ReplayBuffer:
    """FIFO buffer of generated samples (any picklable objects), `capacity` samples at most."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.samples: deque = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.samples)

    def full(self) -> bool:
        return len(self.samples) >= self.capacity

    def push(self, samples) -> None:
        self.samples.extend(samples)

    def sample(self, n: int, rng: random.Random) -> list:
        if not self.samples:
            raise RuntimeError("replay requested from an empty buffer")
        pool = list(self.samples)
        if n <= len(pool):
            return rng.sample(pool, n)
        return rng.choices(pool, k=n)


class DataSchedule:
    def __init__(self, kind: str = "off_policy", *, seed: int = 0, capacity: int = 1000,
                 init_threshold: float = 0.0, loss_eps: float = 0.1, on_policy_lambda: float = 0.5):
        if kind not in SCHEDULES:
            raise UserError(f"mgsr.data_schedule '{kind}' is not one of {', '.join(SCHEDULES)}")
        if not 0.0 <= init_threshold <= 1.0:
            raise UserError(f"mgsr.init_threshold must be in [0, 1], got {init_threshold}")
        if not 0.0 <= on_policy_lambda <= 1.0:
            raise UserError(f"mgsr.on_policy_lambda must be in [0, 1], got {on_policy_lambda}")
        if capacity < 1:
            raise UserError(f"mgsr.replay_capacity must be >= 1, got {capacity}")
        self.kind = kind
        self.seed = seed
        self.threshold = init_threshold
        self.loss_eps = loss_eps
        self.on_policy_lambda = on_policy_lambda
        self.prev_loss: float | None = None
        self.buffer = ReplayBuffer(capacity)

    @classmethod
    def from_config(cls, mgsr_cfg, seed: int = 0) -> DataSchedule:
        return cls(mgsr_cfg.data_schedule, seed=seed, capacity=mgsr_cfg.replay_capacity,
                   init_threshold=mgsr_cfg.init_threshold, loss_eps=mgsr_cfg.loss_eps,
                   on_policy_lambda=mgsr_cfg.on_policy_lambda)

    @property
    def generator(self) -> str:
        """Who writes the generated responses: "student" (SCRG) or "teacher" (seqkd)."""
        return "teacher" if self.kind == "seqkd" else "student"

    @property
    def use_scrg(self) -> bool:
        return self.kind != "seqkd"

    def _rng(self, step: int, salt: int = 0) -> random.Random:
        # a pure function of (seed, step, salt): the same on every rank, and after a resume
        return random.Random(f"mgsr-schedule:{self.seed}:{step}:{salt}")

    def decide(self, step: int, total_steps: int) -> str:
        """"ground_truth" | "generate" | "replay" for this step (the same on every rank)."""
        if self.kind == "ground_truth":
            return "ground_truth"
        if self.kind == "seqkd":
            return "generate"
        r = self._rng(step).random()
        if self.kind == "on_policy":
            return "generate" if r < self.on_policy_lambda else "ground_truth"
        samp = self.threshold * (1.0 - step / max(total_steps, 1))
        if r < samp or (not self.buffer.full() and r < self.threshold):
            return "generate"
        if r < self.threshold:
            return "replay"
        return "ground_truth"

    def push(self, samples) -> None:
        """Store freshly generated samples (off_policy only; other schedules keep no buffer)."""
        if self.kind == "off_policy":
            self.buffer.push(samples)

    def replay(self, n: int, step: int) -> list:
        return self.buffer.sample(n, self._rng(step, salt=1))

    def report_validation_loss(self, loss: float) -> float:
        """DistiLLM's rule: raise the threshold by 0.1 (max 1) when the loss rose by >= loss_eps
        since the previous evaluation. Returns the threshold now in force."""
        loss = float(loss)
        if self.kind == "off_policy" and self.prev_loss is not None and loss - self.prev_loss >= self.loss_eps:
            self.threshold = min(1.0, round(self.threshold + THRESHOLD_STEP, 10))
        self.prev_loss = loss
        return self.threshold

    def state_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "threshold": self.threshold, "prev_loss": self.prev_loss,
                "capacity": self.buffer.capacity, "buffer": list(self.buffer.samples)}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise UserError(f"checkpoint data schedule '{state['kind']}' differs from the configured "
                            f"mgsr.data_schedule '{self.kind}'")
        self.seed = state["seed"]
        self.threshold = state["threshold"]
        self.prev_loss = state["prev_loss"]
        self.buffer = ReplayBuffer(self.buffer.capacity)
        self.buffer.push(state["buffer"][-self.buffer.capacity:])
