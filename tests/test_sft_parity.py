"""SFT parity with an independent reference at TP=1, DP=1 (issue 13, item 1).

The framework's SFT-only run (mgsr.w_dac = w_span = 0, data_schedule = ground_truth; the demo's
sft_student variant) and tests/sft_reference.py (transformers' LlamaForCausalLM + hand-written AdamW,
global-norm clipping and warm-up + cosine LR, fp32) start from the same weights (the framework's
initial student exported with `export_hf`) and read the same token stream (training/data.py at DP=1).
Over 80 steps from the random init they must give the same step losses (1e-4 relative), gradient norms
(1e-3), learning rates and trained weights (1e-3), and the same greedy answers on the 12 held-out
prompts (hence the same ROUGE-L, also through the framework's evaluate()). A reference whose learning
rate is 1% off must NOT match: the comparison can fail. The DP/TP/PP layouts are
tests/dist/check_sft_parity.py.
"""

import pytest

from tests import sft_reference as ref
from tests.dist.check_sft_parity import (
    LOSS_RTOL,
    compare,
    compare_steps,
    framework_run,
    initial_weights,
    pick_clip,
    reference_run,
    sft_config,
)

STEPS = 80


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from mgsr_megatron import parallel
    from mgsr_megatron.training.smoke import build_files

    parallel.init_distributed()
    path = tmp_path_factory.mktemp("sft_parity")
    build_files(path)  # corpus (incl. 12 held-out prompts), SentencePiece tokenizer of 256, indexed rows
    return path


def test_sft_matches_independent_reference(root):
    ckpt, hf = initial_weights(root, tie=False)
    cfg = sft_config(root, steps=STEPS)
    cfg.student.load = ckpt
    cfg.optimizer.clip_grad = pick_clip(cfg, hf, STEPS)
    reference = reference_run(cfg, hf, STEPS, root)
    framework = framework_run(cfg, STEPS, root)
    worst = compare(framework, reference, "TP=1")
    print(f"\nclip_grad {cfg.optimizer.clip_grad}; max relative difference over {STEPS} steps: "
          f"loss {worst['loss']:.2e}, grad norm "
          f"{worst['grad_norm']:.2e}, trained weights {worst['weights']:.2e}; greedy answers "
          f"{worst['greedy_same']}/{len(reference['tokens'])} identical (smallest top-2 logit gap "
          f"{worst['margin']:.1e}); held-out ROUGE-L {reference['rouge_l']:.2f} (framework's evaluate() "
          f"{framework['evaluate_rouge_l']:.2f})")
    losses = [r["loss"] for r in reference["records"]]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), f"the SFT loss does not fall: {losses}"
    answers = reference["answers"]
    assert reference["rouge_l"] > 0, f"the trained model gets no held-out answer even partly right: {answers}"
    assert len({tuple(t) for t in reference["tokens"]}) > 3, f"degenerate answers: {answers}"

    # the comparison has teeth: 1% more learning rate in the reference breaks the 1e-4 match
    prefix = 15
    off = reference_run(cfg, hf, prefix, root, decode=False, lr=cfg.optimizer.lr * 1.01)["records"]
    drift = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(off, reference["records"]))
    print(f"reference with lr x 1.01: losses move by up to {drift:.2e} (relative) in {prefix} steps")
    assert drift > 10 * LOSS_RTOL, f"a 1% learning-rate change moved the losses by only {drift:.2e}"
    with pytest.raises(AssertionError, match="loss"):
        compare_steps(framework["records"][:prefix], off, "reference with lr x 1.01")


def test_reference_schedule_is_warmup_then_cosine():
    """The reference's own LR schedule, checked by hand (not against the framework)."""
    values = [ref.learning_rate(s, 1.0, 0.1, 4, 14) for s in range(16)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and abs(values[9] - 0.55) < 1e-12 and values[14] == values[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    assert ref.learning_rate(7, 1.0, 0.1, 4, 14, style="constant") == 1.0
