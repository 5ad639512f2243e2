"""The data schedule: DistiLLM's threshold rule, decisions, replay buffer, checkpoint state."""

import pytest

from mgsr_megatron.config import MGSRConfig
from mgsr_megatron.data.schedule import DataSchedule
from mgsr_megatron.errors import UserError


def test_threshold_follows_distillm_rule_on_scripted_losses():
    schedule = DataSchedule("off_policy", init_threshold=0.0, loss_eps=0.1)
    # loss:       first  down   +0.05  +0.15  +0.10 (== eps)  down  +0.3
    losses = [2.0, 1.8, 1.85, 2.0, 2.1, 1.7, 2.0]
    expected = [0.0, 0.0, 0.0, 0.1, 0.2, 0.2, 0.3]
    got = [schedule.report_validation_loss(loss) for loss in losses]
    assert got == pytest.approx(expected)


def test_threshold_is_capped_at_one():
    schedule = DataSchedule("off_policy", init_threshold=0.85, loss_eps=0.1)
    thresholds = [schedule.report_validation_loss(loss) for loss in (1.0, 2.0, 3.0, 4.0)]
    assert thresholds == pytest.approx([0.85, 0.95, 1.0, 1.0])


def test_other_schedules_ignore_validation_loss():
    schedule = DataSchedule("on_policy", init_threshold=0.3)
    for loss in (1.0, 5.0, 9.0):
        schedule.report_validation_loss(loss)
    assert schedule.threshold == 0.3


def test_off_policy_decisions():
    total = 1000
    zero = DataSchedule("off_policy", init_threshold=0.0, seed=1)
    assert {zero.decide(step, total) for step in range(200)} == {"ground_truth"}
    # threshold 1, empty buffer: always generate
    one = DataSchedule("off_policy", init_threshold=1.0, seed=1, capacity=10)
    assert {one.decide(step, total) for step in range(200)} == {"generate"}
    # full buffer, threshold 0.5, late in training (samp ~ 0): replay ~50%, ground truth ~50%
    half = DataSchedule("off_policy", init_threshold=0.5, seed=2, capacity=4)
    half.push([{"id": i} for i in range(4)])
    late = [half.decide(step, total) for step in range(total - 400, total)]
    assert set(late) == {"replay", "ground_truth"} | ({"generate"} & set(late))
    assert 0.4 < late.count("replay") / 400 < 0.6
    # early in training samp ~ threshold: mostly generate, even with a full buffer
    early = [half.decide(step, 100_000) for step in range(400)]
    assert 0.4 < early.count("generate") / 400 < 0.6 and early.count("replay") < 10


def test_on_policy_and_fixed_schedules():
    on = DataSchedule("on_policy", on_policy_lambda=0.25, seed=3)
    decisions = [on.decide(step, 100) for step in range(2000)]
    assert set(decisions) == {"generate", "ground_truth"}
    assert 0.21 < decisions.count("generate") / 2000 < 0.29
    assert {DataSchedule("ground_truth").decide(s, 10) for s in range(50)} == {"ground_truth"}
    seqkd = DataSchedule("seqkd")
    assert {seqkd.decide(s, 10) for s in range(50)} == {"generate"}
    assert seqkd.generator == "teacher" and not seqkd.use_scrg
    assert on.generator == "student" and on.use_scrg


def test_decisions_are_a_function_of_seed_and_step():
    a = DataSchedule("off_policy", init_threshold=0.5, seed=9)
    b = DataSchedule("off_policy", init_threshold=0.5, seed=9)
    assert [a.decide(s, 100) for s in range(100)] == [b.decide(s, 100) for s in reversed(range(100))][::-1]
    c = DataSchedule("off_policy", init_threshold=0.5, seed=10)
    assert [a.decide(s, 100) for s in range(100)] != [c.decide(s, 100) for s in range(100)]


def test_replay_buffer_fifo_and_sampling():
    schedule = DataSchedule("off_policy", capacity=3, seed=0)
    schedule.push([1, 2])
    schedule.push([3, 4])
    assert list(schedule.buffer.samples) == [2, 3, 4] and schedule.buffer.full()
    batch = schedule.replay(2, step=5)
    assert len(batch) == 2 and set(batch) <= {2, 3, 4} and len(set(batch)) == 2
    assert schedule.replay(2, step=5) == batch
    assert len(schedule.replay(5, step=6)) == 5  # more than stored: with replacement
    with pytest.raises(RuntimeError):
        DataSchedule("off_policy").replay(1, step=0)


def test_state_dict_round_trip_resumes_identically():
    first = DataSchedule("off_policy", init_threshold=0.2, seed=4, capacity=5)
    first.push([[1, 2], [3]])
    first.report_validation_loss(1.0)
    first.report_validation_loss(1.5)
    state = first.state_dict()
    second = DataSchedule("off_policy", seed=0, capacity=5)
    second.load_state_dict(state)
    assert second.threshold == pytest.approx(0.3) and second.prev_loss == 1.5
    assert list(second.buffer.samples) == [[1, 2], [3]]
    assert [first.decide(s, 50) for s in range(10, 40)] == [second.decide(s, 50) for s in range(10, 40)]
    assert first.replay(3, 7) == second.replay(3, 7)
    with pytest.raises(UserError, match="on_policy"):
        DataSchedule("on_policy").load_state_dict(state)


def test_from_config_and_bad_values():
    cfg = MGSRConfig(data_schedule="on_policy", on_policy_lambda=0.7, replay_capacity=12)
    schedule = DataSchedule.from_config(cfg, seed=5)
    assert schedule.kind == "on_policy" and schedule.on_policy_lambda == 0.7 and schedule.buffer.capacity == 12
    for kwargs, field in ((dict(kind="sometimes"), "data_schedule"), (dict(init_threshold=1.5), "init_threshold"),
                          (dict(on_policy_lambda=-0.1), "on_policy_lambda"), (dict(capacity=0), "replay_capacity")):
        with pytest.raises(UserError, match=field):
            DataSchedule(**kwargs)
