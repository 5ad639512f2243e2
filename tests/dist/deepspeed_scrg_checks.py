"""Generation, SCRG and the generating schedules under the DeepSpeed engine, one torchrun launch of 2 ranks
(tests/test_deepspeed_scrg.py):

    torchrun --nproc-per-node 2 tests/dist/deepspeed_scrg_checks.py --root DIR --out results.json

Setup: tests/dist/deepspeed_checks.py's tiny HF llama student (2x32) and teacher (2x64, embedding wider than
the tokenizer), tokenizer and data. Checks (each records ok/error on rank 0):
  * lockstep_generation_zero3: ZeRO-3 student and teacher, the ranks ask for different budgets (so they
    need different numbers of passes); generate and 2-round SCRG finish (no hang), the ranks ran the same
    number of forward passes (idle ones included), and the tokens equal a replicated (non-ZeRO) copy's;
  * on_policy_zero3_training: `deepspeed_engine.run.train` with ZeRO-3 student and teacher, mgsr.data_schedule
    on_policy with lambda 1 (every step generates by SCRG), 3 steps: finite losses, source "generate", and
    the ranks' real decode passes differed in some step (the lockstep was needed);
  * seqkd_zero3_training: the teacher (ZeRO-3) writes the responses, 1 step, finite loss.
Not named check_*.py: the Megatron harness (tests/dist/harness.py) imports those.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.dist.deepspeed_checks import base_config, build_setup, metrics_of  # noqa: E402

PROMPTS = ([[5, 6, 7, 8, 9, 10], [17, 4]], [[30, 31, 32], [40, 41, 42, 43, 44, 45, 46], [50]])


class PassCounter:
    """Counts HfStage passes (real) and HfCausalLM idle passes of this rank (patches the classes)."""

    def __init__(self):
        from mgsr_megatron.generation import hf_stage

        self.real = self.idle = 0
        stage_call, vote = hf_stage.HfStage.__call__, hf_stage.HfCausalLM._vote
        counter = self

        def counted_call(stage, tokens, received, offset):
            counter.real += 1
            return stage_call(stage, tokens, received, offset)

        def counted_vote(adapter, passing):
            someone = vote(adapter, passing)
            counter.idle += int(someone and not passing)
            return someone

        hf_stage.HfStage.__call__, hf_stage.HfCausalLM._vote = counted_call, counted_vote


def gathered(value):
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_lockstep_generation(root: Path, counter: PassCounter) -> dict:
    import dataclasses

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from mgsr_megatron.deepspeed_engine.run import build_trainer
    from mgsr_megatron.generation import SamplingOptions, ScrgSettings, generate, scrg
    from mgsr_megatron.generation.hf_stage import HfCausalLM

    cfg = base_config(root, "lockstep", zero_stage=3, teacher_zero3=True)
    trainer, _ = build_trainer(cfg)
    rank = dist.get_rank()
    student, teacher = trainer.generating_student, trainer.generating_teacher
    assert student.lockstep and teacher.lockstep
    vocab = trainer.vocab
    local = {name: HfCausalLM(AutoModelForCausalLM.from_pretrained(getattr(cfg, name).load, dtype=torch.float32),
                              vocab) for name in ("student", "teacher")}
    options = SamplingOptions(max_new_tokens=3 + 6 * rank, eos_id=trainer.data.eos_id, seed=11 + rank)
    settings = ScrgSettings(rounds=2)
    prompts = PROMPTS[rank]
    before = (counter.real, counter.idle)
    out = generate(student, prompts, options, vocab_size=vocab)
    passes = (counter.real - before[0]) + (counter.idle - before[1])
    real = counter.real - before[0]
    scrg_out, stats = scrg(student, teacher, prompts, dataclasses.replace(options, greedy=True),
                           settings=settings, vocab_size=vocab)
    reference = generate(local["student"], prompts, options, vocab_size=vocab)
    ref_scrg, ref_stats = scrg(local["student"], local["teacher"], prompts, dataclasses.replace(options, greedy=True),
                               settings=settings, vocab_size=vocab)
    all_passes, all_real = gathered(passes), gathered(real)  # before any assertion: both ranks gather
    assert torch.equal(out.tokens, reference.tokens), (out.tokens, reference.tokens)
    assert torch.equal(scrg_out.tokens, ref_scrg.tokens), (scrg_out.tokens, ref_scrg.tokens)
    assert torch.equal(stats["j"], ref_stats["j"]) and torch.equal(stats["teacher_token"], ref_stats["teacher_token"])
    assert len(set(all_passes)) == 1, f"ranks ran different numbers of forward passes: {all_passes}"
    assert len(set(all_real)) > 1, f"the ranks' own passes did not differ ({all_real}): lockstep not exercised"
    return {"passes": all_passes, "real_passes": all_real, "corrected": gathered(stats["corrected"].tolist())}


def check_training(root: Path, counter: PassCounter, schedule: str, steps: int) -> dict:
    import torch.distributed as dist

    from mgsr_megatron.deepspeed_engine.run import train

    cfg = base_config(root, schedule, zero_stage=3, teacher_zero3=True)
    cfg.mgsr.data_schedule, cfg.mgsr.on_policy_lambda, cfg.mgsr.sft_warmup_iters = schedule, 1.0, 0
    cfg.mgsr.max_new_tokens = 8
    cfg.schedule.train_iters = steps
    real_per_step = []

    def counting_step(trainer, step=None):
        start = counter.real
        metrics = step()
        real_per_step.append(counter.real - start)
        return metrics

    from mgsr_megatron.deepspeed_engine.engine import DeepSpeedTrainer

    original = DeepSpeedTrainer.train_step
    DeepSpeedTrainer.train_step = lambda self: counting_step(self, lambda: original(self))
    try:
        code, _ = train(cfg)
    finally:
        DeepSpeedTrainer.train_step = original
    assert code == 0, code
    per_rank = gathered(real_per_step)  # before any assertion: both ranks gather
    metrics = metrics_of(cfg.logging.output_dir) if dist.get_rank() == 0 else {}
    if dist.get_rank() == 0:
        assert sorted(metrics) == list(range(1, steps + 1)), sorted(metrics)
        for step, row in metrics.items():
            assert row["source"] == "generate", (step, row["source"])
            assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]), (step, row)
    return {"losses": {s: row["loss"] for s, row in metrics.items()}, "real_passes_per_step": per_rank,
            "rank_passes_differ": any(len(set(step)) > 1 for step in zip(*per_rank))}


def main(root: Path, out: Path) -> None:
    import torch.distributed as dist

    from mgsr_megatron.deepspeed_engine import runtime

    started = time.time()
    runtime.init_distributed(timeout_minutes=2)
    rank = dist.get_rank()
    if rank == 0:
        build_setup(root)
    dist.barrier()
    counter = PassCounter()
    results = {"checks": {}}

    def record(name: str, fn) -> None:
        start = time.time()
        error, value = None, None
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001
            error = "".join(traceback.format_exception(exc))[-4000:]
        errors = [e for e in gathered(error) if e]
        results["checks"][name] = {"ok": not errors, "error": "\n".join(errors), "value": value,
                                   "seconds": round(time.time() - start, 2)}
        if rank == 0:
            out.write_text(json.dumps(results, indent=1, default=str))
            print(f"{'PASS' if not errors else 'FAIL'} {name}", flush=True)

    def on_policy():
        value = check_training(root, counter, "on_policy", 3)
        assert value["rank_passes_differ"], f"the ranks ran the same passes in every step: {value}"
        return value

    record("lockstep_generation_zero3", lambda: check_lockstep_generation(root, counter))
    record("on_policy_zero3_training", on_policy)
    record("seqkd_zero3_training", lambda: check_training(root, counter, "seqkd", 1))
    results["seconds"] = round(time.time() - started, 1)
    if rank == 0:
        out.write_text(json.dumps(results, indent=1, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    main(args.root, args.out)
