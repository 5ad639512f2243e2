"""Issue 14: Megatron's distributed optimizer equals the plain one (fp32), resumes exactly across layouts,
works in bf16, and activation recomputation leaves the losses unchanged."""

import shutil

from tests.dist.check_training import _assert_close, _run
from tests.dist.harness import dist_check
from tests.dist.training_setup import base_config, ensure_student_init, ensure_teacher, shared_root


def _config(root, tp, pp, distributed=False, dtype="float32", **model):
    cfg = base_config(root, tp, pp)
    cfg.student.load = ensure_student_init(root) if dtype == "float32" else None
    cfg.student.params_dtype = dtype
    cfg.optimizer.use_distributed_optimizer = distributed
    for key, value in model.items():
        setattr(cfg.student, key, value)
    return cfg


def _cleanup(path):
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


@dist_check(world_size=4)
def distributed_optimizer_losses_equal_plain():
    """6 steps (SCRG and ground-truth steps) at DP=4, TP2xDP2 and PP2xDP2: the same losses as the plain
    optimizer's at DP=4 (fp32, relative 1e-5)."""
    root = shared_root()
    ensure_teacher(root)
    ensure_student_init(root)
    reference, _ = _run(_config(root, 1, 1), 6)
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        losses, _ = _run(_config(root, tp, pp, distributed=True), 6)
        _assert_close(losses, reference, f"distributed optimizer TP={tp} PP={pp}")


@dist_check(world_size=4)
def distributed_optimizer_resumes_across_layouts():
    """A TP2xDP2 run with the distributed optimizer, checkpointed at step 3 through Megatron's
    optimizer.sharded_state_dict, continues exactly at TP2xDP2, TP1xDP4 and TP1xPP2xDP2."""
    root = shared_root()
    ensure_teacher(root)
    ckpt = root / "ckpt_distopt"
    cfg = _config(root, 2, 1, distributed=True)
    first, _ = _run(cfg, 3, save_to=ckpt)
    continued, _ = _run(cfg, 3, resume_from=ckpt)
    full, _ = _run(cfg, 6)
    _assert_close(first + continued, full, "uninterrupted TP2xDP2 (distributed optimizer)")
    for tp, pp in ((1, 1), (1, 2)):
        moved, _ = _run(_config(root, tp, pp, distributed=True), 3, resume_from=ckpt)
        _assert_close(moved, continued, f"resume TP2xDP2 -> TP{tp}xPP{pp}")
    _cleanup(ckpt)


@dist_check(world_size=4)
def bf16_distributed_optimizer_trains_and_resumes():
    """bf16 student, fp32 main weights sharded over DP (TP2xDP2): close to the fp32 losses, and a resume
    (fp32 main weights and Adam moments from the checkpoint) continues exactly."""
    root = shared_root()
    ensure_teacher(root)
    ckpt = root / "ckpt_bf16"
    cfg = _config(root, 2, 1, distributed=True, dtype="bfloat16")
    first, _ = _run(cfg, 3, save_to=ckpt)
    continued, _ = _run(cfg, 3, resume_from=ckpt)
    full, _ = _run(cfg, 6)
    _assert_close(first + continued, full, "bf16 resume", rel=1e-6)
    fp32 = _config(root, 2, 1, distributed=True)
    fp32.student.load = None  # the same random init as the bf16 run (rounded)
    reference, _ = _run(fp32, 6)
    _assert_close(full, reference, "bf16 vs fp32 losses", rel=3e-2)
    _cleanup(ckpt)


@dist_check(world_size=4)
def recomputation_gives_the_same_losses():
    """Full (uniform and block) and selective recomputation: the losses of no recomputation (fp32)."""
    root = shared_root()
    ensure_teacher(root)
    ensure_student_init(root)
    reference, _ = _run(_config(root, 2, 2), 6)
    for options in (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
                    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
                    dict(recompute_granularity="selective")):
        losses, _ = _run(_config(root, 2, 2, **options), 6)
        _assert_close(losses, reference, f"recomputation {options}")
