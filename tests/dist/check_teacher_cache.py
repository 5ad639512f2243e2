"""The offline teacher cache: TP=1 and TP=2 teachers write the same cache (within bf16 rounding), and
training from it runs at TP=1 (DP=2) and TP=2 without loading the teacher, with the first step's losses
matching the online teacher's (SFT exactly, DAC-KL within bf16 storage; the span loss difference printed)."""

import math

import numpy as np
import torch
import torch.distributed as dist

from mgsr_megatron.training.smoke import base_config, ensure_teacher
from tests.dist.harness import dist_check
from tests.dist.training_setup import ensure_student_init, shared_root


def _cache(root, tp: int):
    from mgsr_megatron.training.teacher_cache import write_cache

    path = root / f"teacher_cache_tp{tp}"
    if not (path / "manifest.json").is_file():
        write_cache(base_config(root, tp), path, None, rows_per_shard=100)  # 239 rows: 3 shards over DP
    return path


def _dense_rows(cache, rows):
    from mgsr_megatron.training.teacher_cache import dense_from_topk

    out = []
    for r in rows:
        log_p, ids, rest, _ = cache.row(r)
        mask = torch.ones(1, log_p.shape[0])
        out.append(dense_from_topk(log_p, ids, rest, mask, 256, 0, cache.vocab_size, 1.0)[0])
    return torch.cat(out)


@dist_check(world_size=2)
def teacher_cache_same_at_tp1_and_tp2():
    from mgsr_megatron.training.teacher_cache import TeacherCache

    root = shared_root()
    ensure_teacher(root)
    one, two = TeacherCache(_cache(root, 1)), TeacherCache(_cache(root, 2))
    for key in ("k", "temperature", "rows", "tokens", "shards", "tokenizer_hash", "data", "teacher"):
        assert one.manifest[key] == two.manifest[key], key
    assert np.array_equal(one.offsets, two.offsets)
    rows = range(one.manifest["rows"])
    a, b = _dense_rows(one, rows), _dense_rows(two, rows)  # [tokens, V] log-probs (ties may swap ids)
    # one bf16 step at each value's magnitude: float32 rounding differences of the two layouts may land on
    # neighbouring bf16 values
    ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp(min=1e-30))) - 7)
    assert bool(((a - b).abs() <= ulp + 1e-6).all()), float(((a - b).abs() / ulp).max())
    same_ids = sum(bool(torch.equal(one.row(r)[1], two.row(r)[1])) for r in rows) / len(rows)
    if dist.get_rank() == 0:
        print(f"[teacher cache] TP1 vs TP2: max |diff| {float((a - b).abs().max()):.3e} "
              f"(<= 1 bf16 step), rows with identical top-K ids {same_ids:.3f}", flush=True)


def _first_steps(cfg, steps):
    from mgsr_megatron.training.run import build_trainer

    trainer = build_trainer(cfg)
    metrics = [trainer.train_step() for _ in range(steps)]
    return trainer, metrics


@dist_check(world_size=2)
def training_from_teacher_cache_at_tp1_and_tp2():
    root = shared_root()
    ensure_teacher(root)
    init = ensure_student_init(root)
    cache = _cache(root, 1)
    runs = {}
    for tp in (1, 2):
        for cached in (True, False):
            cfg = base_config(root, tp)
            cfg.student.load = init
            cfg.mgsr.data_schedule = "ground_truth"
            cfg.teacher.cache = str(cache) if cached else None
            trainer, metrics = _first_steps(cfg, 3)
            assert (trainer.teacher is None) == cached, "teacher loaded despite the cache" if cached else "no teacher"
            assert all(m["source"] == "ground_truth" and math.isfinite(m["loss"]) for m in metrics), metrics
            runs[tp, cached] = metrics
    for tp in (1, 2):
        cached, online = runs[tp, True][0], runs[tp, False][0]  # step 1: the same student weights
        assert math.isclose(cached["sft"], online["sft"], rel_tol=1e-6), (cached["sft"], online["sft"])
        assert math.isclose(cached["dac_kl"], online["dac_kl"], rel_tol=5e-3), (cached["dac_kl"], online["dac_kl"])
        if dist.get_rank() == 0:
            print(f"[teacher cache] TP{tp} step 1 cached vs online: dac_kl {cached['dac_kl']:.6f} vs "
                  f"{online['dac_kl']:.6f}, span {cached['span']:.6f} vs {online['span']:.6f} (rel "
                  f"{abs(cached['span'] - online['span']) / online['span']:.2e}), loss {cached['loss']:.6f} vs "
                  f"{online['loss']:.6f}; 3-step losses cached {[round(m['loss'], 5) for m in runs[tp, True]]} "
                  f"online {[round(m['loss'], 5) for m in runs[tp, False]]}", flush=True)
    for step, (a, b) in enumerate(zip(runs[1, True], runs[2, True]), 1):  # any layout, the same cached run
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (step, a["loss"], b["loss"])


@dist_check(world_size=2)
def generating_schedule_with_teacher_cache_keeps_the_online_teacher():
    """on_policy + teacher.cache at TP=2: the teacher is loaded for the generated batches, ground-truth
    batches (the warm start) come from the cache."""
    root = shared_root()
    ensure_teacher(root)
    cfg = base_config(root, 2)
    cfg.teacher.cache = str(_cache(root, 1))
    cfg.mgsr.sft_warmup_iters = 1
    trainer, metrics = _first_steps(cfg, 3)
    assert trainer.teacher is not None and trainer.cache is not None
    sources = [m["source"] for m in metrics]
    assert sources[0] == "ground_truth" and "generate" in sources, sources
    assert all(math.isfinite(m["loss"]) for m in metrics), metrics
