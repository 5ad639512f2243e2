"""Logits of the columns the loss reads only (models.pipeline.logits_from, LossTargets.first_column).

The objective reads no column before the first SFT / DAC-KL weight or span pair of any row of a
micro-batch (the prompt), so the trainer runs the student's and the teacher's output layers from there
on. References here: Megatron's GPTModel forward over every column (no hook), sliced; and the same
training steps with the restriction switched off (first_column = 0: the model's own full forward).
The TP=2 / PP=2 trainer checks against dense references (tests/dist) run the restricted path too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mgsr_megatron.losses.objective import LossTargets


def _targets(first_per_row: list[int], s: int = 10, span_first: int | None = None) -> LossTargets:
    b = len(first_per_row)
    mask = torch.zeros(b, s)
    for row, first in enumerate(first_per_row):
        mask[row, first:] = 1.0
    pairs = torch.zeros(b, s, dtype=torch.bool)
    if span_first is not None:
        pairs[0, span_first] = True
    return LossTargets(torch.zeros(b, s, dtype=torch.int64), mask * 0, mask, pairs)


def test_first_column_is_the_first_read_position_of_any_row():
    assert _targets([6, 3]).first_column() == 3
    assert _targets([6, 7], span_first=2).first_column() == 2  # a span pair (2, 3) is read too
    sft_only = _targets([10, 10])._replace(sft_mask=torch.zeros(2, 10).index_fill_(1, torch.tensor([4]), 1.0))
    assert sft_only.first_column() == 4
    assert _targets([10, 10]).first_column() == 0  # nothing read: keep every column
    cut = _targets([6, 3]).from_column(3)
    assert [tuple(field.shape) for field in cut] == [(2, 7)] * 4
    assert torch.equal(cut.kd_mask, _targets([6, 3]).kd_mask[:, 3:])


@pytest.fixture(scope="module")
def root(smoke_root):
    return smoke_root  # conftest.py: the tiny smoke setup, one per module


def _trainer(root, source: str):
    from mgsr_megatron.training.run import build_trainer
    from mgsr_megatron.training.smoke import base_config

    cfg = base_config(root)
    if source == "ground_truth":
        cfg.mgsr.data_schedule = "ground_truth"
    else:
        cfg.mgsr.on_policy_lambda = 1.0  # every step: SCRG samples (one round), logits reused for the loss
    return build_trainer(cfg)


def test_logits_from_equal_the_full_forward_sliced(root):
    from mgsr_megatron.models.pipeline import logits_from, position_ids_like

    trainer = _trainer(root, "ground_truth")
    model = trainer.teacher  # a bare GPTModel (the student's DDP wrapper keeps its gradients elsewhere)
    for param in model.parameters():
        param.requires_grad_(True)
    tokens = trainer.next_batch().micro_batches[0]["tokens"]
    positions = position_ids_like(tokens)
    weights = torch.randn(tokens.shape[0], tokens.shape[1] - 7, model.vocab_size,
                          generator=torch.Generator().manual_seed(0))
    grads = []
    for first in (0, 7):
        model.zero_grad(set_to_none=True)
        with logits_from(model, first):
            logits = model(tokens, positions, None)
        assert logits.shape[1] == tokens.shape[1] - first
        if first == 0:
            full = logits.detach()
            logits = logits[:, 7:]
        else:
            torch.testing.assert_close(logits.detach(), full[:, 7:], rtol=1e-5, atol=1e-6)
        (logits * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the hook is gone after the block
    assert model(tokens, positions, None).shape[1] == tokens.shape[1]
    # with sequence parallelism (hidden states sharded over the sequence) the logits are sliced after the
    # output layer instead: the same values (the branch's mechanics; this TP=1 layer does not shard)
    model.config.sequence_parallel = True
    try:
        with logits_from(model, 7):
            torch.testing.assert_close(model(tokens, positions, None).detach(), full[:, 7:], rtol=1e-5, atol=1e-6)
    finally:
        model.config.sequence_parallel = False


def _run(root, source: str, restricted: bool, monkeypatch) -> tuple[list[dict], list[torch.Tensor], list[int]]:
    """Three training steps; with `restricted` False every column is computed (first_column() = 0)."""
    if not restricted:
        monkeypatch.setattr(LossTargets, "first_column", lambda self: 0)
    trainer = _trainer(root, source)
    seen = []  # the columns each output layer computed (student and teacher)
    hooks = [model.output_layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
             for model in (trainer.student, trainer.teacher)]
    params = [*trainer.student.parameters(), *trainer.clipnet.parameters()]
    initial = [p.detach().clone() for p in params]
    metrics = [trainer.train_step() for _ in range(3)]
    for hook in hooks:
        hook.remove()
    monkeypatch.undo()
    return metrics, [p.detach() - p0 for p, p0 in zip(params, initial)], seen


@pytest.mark.parametrize("source", ["ground_truth", "generate"])
def test_training_on_the_loss_columns_equals_training_on_every_column(root, source, monkeypatch):
    metrics, updates, columns = _run(root, source, True, monkeypatch)
    reference, updates_ref, all_columns = _run(root, source, False, monkeypatch)
    assert all(m["source"] == source for m in metrics + reference)
    # the restricted run computed fewer columns in its output layers (the prompts'), never more
    assert sum(columns) < sum(all_columns), (columns, all_columns)
    for key in ("loss", "sft", "dac_kl", "span", "grad_norm", "teacher_entropy"):
        np.testing.assert_allclose([m[key] for m in metrics], [m[key] for m in reference], rtol=1e-5, err_msg=key)
    # weight updates as a whole per tensor (Adam rescales each element: see test_scrg_teacher_reuse.py)
    for got, want in zip(updates, updates_ref, strict=True):
        assert float((got - want).norm()) <= 1e-3 * float(want.norm()), float((got - want).norm() / want.norm())
