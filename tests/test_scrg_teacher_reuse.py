"""SCRG's teacher logits reused for the loss (mgsr.reuse_scrg_teacher_logits, docs/generation.md).

SCRG's teacher (generation/teacher_scores.py) scores every row as the loss pass sees it (collated: padded
with the tokenizer's pad to the step's `generated_length`, the longest prompt + max_new_tokens rounded up,
at most seq_length), and after the last regeneration recomputes the corrected rows from their j with its
KV cache: the loss pass then needs no teacher forward. Here, single process: those logits equal the
teacher's training forward of the collated micro-batches (Megatron's GPTModel, to float rounding), and
training with reuse equals training without it (the same SCRG decisions; losses and weights to rounding).
The TP=2 / PP=2 version is tests/dist/check_training.py::scrg_teacher_logit_reuse_matches_recompute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def root(smoke_root):
    return smoke_root  # conftest.py: the tiny smoke setup, one per module


def _trainer(root, reuse: bool, delta: float):
    from mgsr_megatron.training.run import build_trainer
    from mgsr_megatron.training.smoke import base_config

    cfg = base_config(root)  # 4 micro-batches of 2 rows per step
    cfg.mgsr.on_policy_lambda = 1.0  # every step generates (SCRG, one round)
    # a threshold between the rows' divergences on this toy setup: some rows are corrected, some not
    cfg.mgsr.scrg_delta = delta
    cfg.mgsr.reuse_scrg_teacher_logits = reuse
    cfg.logging.time_phases = True  # the step's phase timings are checked below
    return build_trainer(cfg)


def test_scrg_teacher_logits_equal_a_full_teacher_forward(root):
    trainer = _trainer(root, True, 0.11)
    batch = trainer.next_batch()
    assert batch.source == "generate" and all(batch.teacher_reused)
    assert 0.0 < batch.stats["scrg_corrected"] < 1.0, batch.stats  # both kinds of rows
    # only the rows corrected after the last detection ran again, from their j on
    assert 0.0 < batch.stats["teacher_recomputed"] < batch.stats["scrg_corrected"], batch.stats
    kept = trainer.step_teacher_logits(batch)
    reference = trainer.teacher_forward(batch.micro_batches)
    for got, want in zip(kept, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_micro_batch_not_scored_as_collated_runs_the_teacher(root):
    trainer = _trainer(root, True, 0.11)
    batch = trainer.next_batch()
    batch.teacher_reused[1] = False  # as if its collated tokens were not the ones SCRG scored
    batch.teacher_logits[1] = None
    logits = trainer.step_teacher_logits(batch)
    assert torch.equal(logits[1], trainer.teacher_forward(batch.micro_batches[1:2])[0])


def test_training_with_reuse_equals_training_without(root):
    runs, lengths = {}, []
    for reuse in (True, False):
        trainer = _trainer(root, reuse, 0.11)
        next_batch = trainer.next_batch

        def recorded(next_batch=next_batch):
            batch = next_batch()
            lengths.append({tuple(mb["tokens"].shape) for mb in batch.micro_batches})
            return batch

        trainer.next_batch = recorded
        params = [*trainer.student.parameters(), *trainer.clipnet.parameters()]
        initial = [p.detach().clone() for p in params]
        metrics = [trainer.train_step() for _ in range(3)]
        runs[reuse] = (metrics, [p.detach() - p0 for p, p0 in zip(params, initial)])
    (with_reuse, updates), (without, updates_ref) = runs[True], runs[False]
    assert all(m["source"] == "generate" for m in with_reuse + without)
    # one shape per step, and steps collated shorter than seq_length (40) as well as at it
    assert all(len(shapes) == 1 for shapes in lengths), lengths
    assert {shape[1] for shapes in lengths for shape in shapes} == {24, 40}, lengths
    assert [m["teacher_recomputed"] for m in without] == [1.0] * 3
    assert max(m["teacher_recomputed"] for m in with_reuse) < 1.0, with_reuse
    # the same SCRG decisions (one detection path); the loss's teacher logits differ by float rounding
    assert [m["scrg_corrected"] for m in with_reuse] == [m["scrg_corrected"] for m in without]
    for key in ("loss", "sft", "dac_kl", "span", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in with_reuse], [m[key] for m in without], rtol=1e-5, err_msg=key)
    # the three steps' weight updates, as a whole per tensor: Adam divides each gradient element by its own
    # scale, so where an element's gradient is at rounding level its update can differ by up to ~lr
    for got, want in zip(updates, updates_ref, strict=True):
        assert float((got - want).norm()) <= 1e-3 * float(want.norm()), float((got - want).norm() / want.norm())
    # the step's phase timings (tools/bench_step.py prints them)
    phases = {k for k in with_reuse[0] if k.startswith("time/")}
    assert phases == {f"time/{p}" for p in ("data", "generation", "teacher_forward", "student_forward_backward",
                                            "loss_forward", "loss_backward", "optimizer", "bookkeeping")}
    assert all(with_reuse[0][k] >= 0 for k in phases)


def test_generated_length():
    from mgsr_megatron.training.trainer import generated_length

    prompts = [[[1] * 5, [1] * 13], [[1] * 9]]  # two micro-batches; the longest prompt has 13 tokens
    assert generated_length(prompts, 12, 64) == 32  # 13 + 12 = 25 -> a multiple of 8
    assert generated_length(prompts, 11, 64) == 24  # 24 exactly
    assert generated_length(prompts, 12, 30) == 30  # never past seq_length
