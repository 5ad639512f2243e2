"""Trainer.state_dict() / load_state_dict(): the trainer's own resumable state, without process groups or
models (the checkpoint files around it are tested in test_training_process.py and tests/dist)."""

from __future__ import annotations

import torch

from mgsr_megatron.data.schedule import DataSchedule
from mgsr_megatron.losses import ClipNet
from mgsr_megatron.training.trainer import Trainer


class _Data:
    """The data position part of TrainingData."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _trainer(schedule: bool = True, seed: int = 0) -> Trainer:
    trainer = Trainer.__new__(Trainer)  # the state methods only need these fields
    trainer.clipnet = ClipNet(k_feat=4, hidden=8, seed=seed)
    trainer.clipnet_optimizer = torch.optim.AdamW(trainer.clipnet.parameters(), lr=0.1)
    trainer.data = _Data()
    trainer.schedule = DataSchedule("off_policy", seed=5, capacity=4) if schedule else None
    trainer.step, trainer.skipped_steps, trainer.nan_steps_in_row, trainer.last_loss = 0, 0, 0, None
    return trainer


def test_state_round_trip():
    source = _trainer(seed=1)
    source.clipnet(torch.randn(3, 6))[0].sum().backward()
    source.clipnet_optimizer.step()
    source.data.position = 24
    source.schedule.push([("prompt", "response")] * 3)
    source.schedule.report_validation_loss(1.0)
    source.schedule.report_validation_loss(1.5)  # the loss rose: the threshold moves
    source.step, source.skipped_steps, source.nan_steps_in_row, source.last_loss = 7, 2, 1, 0.25
    state = source.state_dict()
    assert set(state) == {"step", "skipped_steps", "nan_steps_in_row", "last_loss", "clipnet", "clipnet_optimizer",
                          "data", "schedule"}
    target = _trainer(seed=2)
    target.load_state_dict(state)
    assert (target.step, target.skipped_steps, target.nan_steps_in_row, target.last_loss) == (7, 2, 1, 0.25)
    assert target.data.position == 24
    assert target.schedule.state_dict() == source.schedule.state_dict()
    for mine, theirs in zip(target.clipnet.parameters(), source.clipnet.parameters()):
        assert torch.equal(mine, theirs)
    assert target.clipnet_optimizer.state_dict()["state"][0]["step"] == 1


def test_older_state_without_the_newer_keys():
    """A checkpoint written before skipped_steps / nan_steps_in_row / the schedule file existed."""
    source = _trainer()
    state = {key: value for key, value in source.state_dict().items()
             if key in ("step", "clipnet", "clipnet_optimizer", "data")}
    state["step"] = 3
    target = _trainer()
    target.skipped_steps, target.nan_steps_in_row, target.last_loss = 5, 4, 1.0
    fresh = target.schedule.state_dict()
    target.load_state_dict(state)
    assert (target.step, target.skipped_steps, target.nan_steps_in_row, target.last_loss) == (3, 0, 0, None)
    assert target.schedule.state_dict() == fresh
    # a run without a schedule (no teacher) ignores a saved one
    plain = _trainer(schedule=False)
    plain.load_state_dict(_trainer().state_dict())
    assert plain.schedule is None and plain.state_dict()["schedule"] is None
