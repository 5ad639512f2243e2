"""The trainer gives the same losses at every TP/PP/DP layout, and resumes exactly across layouts."""

import math
import shutil

from mgsr_megatron.training.smoke import base_config, ensure_teacher
from tests.dist.harness import dist_check
from tests.dist.training_setup import ensure_student_init, shared_root


def _run(cfg, steps: int, resume_from=None, save_to=None) -> tuple[list[float], list[str]]:
    from mgsr_megatron.training.checkpoint import load_checkpoint, save_checkpoint
    from mgsr_megatron.training.run import build_trainer

    trainer = build_trainer(cfg)
    if resume_from is not None:
        load_checkpoint(trainer, resume_from)
    losses, sources = [], []
    for _ in range(steps):
        metrics = trainer.train_step()
        losses.append(metrics["loss"])
        sources.append(metrics["source"])
    if save_to is not None:
        save_checkpoint(trainer, save_to)
    return losses, sources


def _assert_close(actual, expected, what, rel=1e-5):
    for step, (a, e) in enumerate(zip(actual, expected), 1):
        if not math.isclose(a, e, rel_tol=rel, abs_tol=1e-7):
            raise AssertionError(f"{what}: step {step} loss {a!r} != reference {e!r} (all: {actual} vs {expected})")


@dist_check(world_size=4)
def training_losses_identical_across_layouts():
    root = shared_root()
    ensure_teacher(root)
    init = ensure_student_init(root)

    def config(tp, pp):
        cfg = base_config(root, tp, pp)
        cfg.student.load = init
        return cfg

    reference, sources = _run(config(1, 1), 6)  # TP1 PP1 DP4
    assert "generate" in sources and "ground_truth" in sources, sources  # SCRG steps and ground truth
    assert all(math.isfinite(x) for x in reference), reference
    assert reference[-1] < reference[0], f"training does not reduce the loss: {reference}"
    for tp, pp in ((2, 2), (2, 1), (1, 2)):
        losses, _ = _run(config(tp, pp), 6)
        _assert_close(losses, reference, f"TP={tp} PP={pp}")


@dist_check(world_size=4)
def resume_at_another_layout_continues_exactly():
    import torch.distributed as dist

    root = shared_root()
    ensure_teacher(root)
    for (tp, pp), (tp2, pp2) in (((2, 2), (1, 1)),):  # TP=2 -> 1 and PP=2 -> 1 at once
        ckpt = root / f"ckpt_{tp}{pp}"
        cfg = base_config(root, tp, pp)
        first, _ = _run(cfg, 3, save_to=ckpt)  # steps 1-3, checkpoint at step 3
        continued, _ = _run(cfg, 3, resume_from=ckpt)  # steps 4-6 at the same layout
        moved, _ = _run(base_config(root, tp2, pp2), 3, resume_from=ckpt)  # steps 4-6 after resharding
        _assert_close(moved, continued, f"resume TP{tp}PP{pp} -> TP{tp2}PP{pp2}")
        full, _ = _run(cfg, 6)  # and the uninterrupted run agrees with the resumed one
        _assert_close(first + continued, full, f"uninterrupted TP{tp}PP{pp}")
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(ckpt)


@dist_check(world_size=4)
def teacher_left_at_random_init_is_refused():
    """If loading the teacher changed no weight (a loader that silently did nothing), training stops."""
    from mgsr_megatron.errors import UserError
    from mgsr_megatron.models import checkpoint

    root = shared_root()
    ensure_teacher(root)
    real_load = checkpoint.load_model
    checkpoint.load_model = lambda model, directory, **checks: None
    try:
        _run(base_config(root, 2, 1), 1)
    except UserError as exc:
        assert "left every weight at its random initialisation" in str(exc), exc
    else:
        raise AssertionError("a teacher still at its random initialisation was accepted")
    finally:
        checkpoint.load_model = real_load


@dist_check(world_size=4)
def scrg_teacher_logit_reuse_matches_recompute():
    """mgsr.reuse_scrg_teacher_logits at TP=2 PP=2 (4 micro-batches per step): the step's losses,
    gradient norms and the student's weights equal those of the full teacher forward, to rounding."""
    import torch

    from mgsr_megatron.training.run import build_trainer

    root = shared_root()
    ensure_teacher(root)
    init = ensure_student_init(root)

    def run(reuse: bool):
        cfg = base_config(root, 2, 2)
        cfg.student.load = init
        cfg.mgsr.on_policy_lambda = 1.0  # every step is an SCRG step
        cfg.mgsr.scrg_delta = 0.11  # some rows corrected, some not (see tests/test_scrg_teacher_reuse.py)
        cfg.mgsr.reuse_scrg_teacher_logits = reuse
        trainer = build_trainer(cfg)
        metrics = [trainer.train_step() for _ in range(3)]
        return metrics, [p.detach().clone() for p in trainer.student.parameters()]

    (reused, weights), (recomputed, reference) = run(True), run(False)
    shares = [m["teacher_recomputed"] for m in reused]
    assert all(share < 1.0 for share in shares) and any(share > 0.0 for share in shares), shares
    assert [m["teacher_recomputed"] for m in recomputed] == [1.0] * 3
    # the same SCRG decisions; the loss's teacher logits (KV-cached suffix passes vs a full forward) to rounding
    assert [m["scrg_corrected"] for m in reused] == [m["scrg_corrected"] for m in recomputed]
    for key in ("loss", "sft", "dac_kl", "span", "grad_norm"):
        got, want = torch.tensor([m[key] for m in reused]), torch.tensor([m[key] for m in recomputed])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    # Adam divides by the gradient's own scale, so a weight whose gradient is near zero moves by up to lr per step
    # whatever its rounding: such an element differed by 1.06e-5 (0.1% of lr 1e-2) on a Xeon with another MKL
    # kernel; wrong logits move most weights by ~lr
    for got, want in zip(weights, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
