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
  * seqkd_zero3_training: the teacher (ZeRO-3) writes the responses, 1 step, finite loss; with evaluation on
    (schedule.eval_interval 1, a held-out split of 12 prompts): ROUGE-L / exact match rows in metrics.jsonl;
  * evaluation_zero3: evaluation/evaluate.py answers_per_seed with the ZeRO-3 student (DP = 2 = the world)
    over 5 prompts in blocks of 2 (rank 0 has two blocks, rank 1 one and an idle round): the same answers
    per seed and prompt as the same HF weights single-process (DP = 1) and as the weights converted to a
    Megatron model (conversion import_hf, evaluated at DP = 2 through Megatron's parallel_state); the
    ranks ran the same number of forward passes;
  * off_policy_resume_zero2: off_policy under ZeRO-2, 4 steps deciding ground_truth, generate, replay, replay;
    2 steps + checkpoint + a fresh trainer loading it + 2 steps = the 4 steps straight (sources and losses
    bit-identical, the replay buffer restored); the checkpoint without schedule_dp*.pt is one line naming it;
  * off_policy_megatron_parity: the Megatron engine on the converted models (after evaluation_zero3, which
    installs Megatron's CPU adapter) takes the same decisions with the same losses (relative 1e-4).
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
from unittest import mock

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


def build_heldout(root: Path) -> None:
    """root/heldout.train: corpus/eval.jsonl (12 prompts with references, never trained on) preprocessed
    with the run's tokenizer, the validation split (data.valid_path) of runs that evaluate (rank 0)."""
    from mgsr_megatron.config import DataConfig
    from mgsr_megatron.data.preprocess import PreprocessOptions, preprocess
    from mgsr_megatron.training.smoke import TEMPLATE

    if (root / "heldout.train.json").is_file():
        return
    data_cfg = DataConfig(format="prompt_response", prompt_template=TEMPLATE, max_prompt_length=24, max_length=40,
                          valid_fraction=0.0)
    preprocess([root / "corpus" / "eval.jsonl"], str(root / "heldout"), str(root / "tok.model"), data_cfg,
               options=PreprocessOptions(workers=1, progress=False))


def with_evaluation(cfg, root: Path, interval: int, prompts: int):
    """`cfg` evaluating (validation loss, ROUGE-L) every `interval` steps on `prompts` held-out prompts."""
    cfg.data.valid_path = str(root / "heldout.train")
    cfg.schedule.eval_interval, cfg.schedule.eval_prompts, cfg.schedule.eval_max_new_tokens = interval, prompts, 6
    cfg.schedule.eval_iters = 1
    return cfg


def check_training(root: Path, counter: PassCounter, schedule: str, steps: int, eval_prompts: int = 0) -> dict:
    import torch.distributed as dist

    from mgsr_megatron.deepspeed_engine.run import train

    cfg = base_config(root, schedule, zero_stage=3, teacher_zero3=True)
    cfg.mgsr.data_schedule, cfg.mgsr.on_policy_lambda, cfg.mgsr.sft_warmup_iters = schedule, 1.0, 0
    cfg.mgsr.max_new_tokens = 8
    cfg.schedule.train_iters = steps
    if eval_prompts:
        with_evaluation(cfg, root, steps, eval_prompts)
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
    value = {"losses": {s: row["loss"] for s, row in metrics.items()}, "real_passes_per_step": per_rank,
             "rank_passes_differ": any(len(set(step)) > 1 for step in zip(*per_rank))}
    if eval_prompts and dist.get_rank() == 0:
        value["eval"] = check_eval_rows(cfg.logging.output_dir, steps)
    return value


def check_eval_rows(output_dir: str, step: int) -> dict:
    """metrics.jsonl holds one evaluation at `step` with the Megatron engine's metric names (finite values)."""
    rows = [row for row in map(json.loads, (Path(output_dir) / "metrics.jsonl").read_text().splitlines())
            if row["kind"] == "eval"]
    assert [row["step"] for row in rows] == [step], rows
    for key in ("rouge_l", "exact_match", "distinct_2", "rouge_l_std", "exact_match_std", "seeds"):
        assert key in rows[0] and math.isfinite(rows[0][key]), (key, rows[0])
    assert any(key.startswith("rouge_l/") for key in rows[0]), rows[0]
    return {key: rows[0][key] for key in ("rouge_l", "exact_match", "distinct_2")}


def check_evaluation(root: Path, counter: PassCounter) -> dict:
    """The ZeRO-3 engine's evaluation answers = single-process HF = the converted Megatron model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from mgsr_megatron.deepspeed_engine.run import build_trainer
    from mgsr_megatron.evaluation.evaluate import answers_per_seed
    from mgsr_megatron.generation import SamplingOptions
    from mgsr_megatron.generation.hf_stage import HfCausalLM

    cfg = with_evaluation(base_config(root, "evaluation", zero_stage=3), root, 1, 5)
    trainer, _ = build_trainer(cfg)
    items, tokenizer, vocab = trainer.data.evaluation_items(5), trainer.data.tokenizer, trainer.vocab
    assert len(items) == 5 and trainer.generating_student.lockstep
    options = [SamplingOptions(max_new_tokens=6, eos_id=tokenizer.eos_id, seed=seed) for seed in (10, 20)]
    before = (counter.real, counter.idle)
    zero3 = answers_per_seed(trainer.generating_student, items, tokenizer, options, vocab_size=vocab, batch_size=2)
    real, idle = counter.real - before[0], counter.idle - before[1]
    local = HfCausalLM(AutoModelForCausalLM.from_pretrained(cfg.student.load, dtype=torch.float32), vocab)
    with mock.patch("mgsr_megatron.parallel._replica_layout", return_value=(0, 1, None)):  # one process
        single = answers_per_seed(local, items, tokenizer, options, vocab_size=vocab, batch_size=2)
    megatron = megatron_answers(root, cfg.student.load, items, tokenizer, options, vocab)
    all_passes, all_real = gathered(real + idle), gathered(real)  # before any assertion: both ranks gather
    assert zero3 == single, f"ZeRO-3 {zero3} vs single process {single}"
    assert zero3 == megatron, f"ZeRO-3 {zero3} vs converted Megatron model {megatron}"
    assert len(set(all_passes)) == 1, f"ranks ran different numbers of forward passes: {all_passes}"
    assert len(set(all_real)) > 1, f"the ranks' own passes did not differ ({all_real}): padding not exercised"
    assert len({answer for answers in zero3 for answer in answers.values()}) > 1, zero3
    return {"passes": all_passes, "real_passes": all_real, "answers_seed10": zero3[0]}


def megatron_answers(root: Path, hf_dir: str, items, tokenizer, options, vocab: int) -> list[dict]:
    """answers_per_seed of the HF student converted to Megatron (TP = PP = 1, DP = the world)."""
    from mgsr_megatron import parallel
    from mgsr_megatron.conversion.convert import import_hf
    from mgsr_megatron.evaluation.evaluate import answers_per_seed
    from mgsr_megatron.models import build_model
    from mgsr_megatron.models.checkpoint import load_model
    from tests.dist.check_conversion import on_rank0

    target = root / "student_megatron_eval"
    parallel.init_distributed()  # the process group exists: this installs Megatron's CPU adapter
    parallel.initialize_model_parallel(1, 1, seed=5)
    try:
        model_cfg = on_rank0(lambda: import_hf(hf_dir, target, make_vocab_size_divisible_by=64, overwrite=True,
                                               progress=False))
        model = build_model(model_cfg)
        load_model(model, target)
        return answers_per_seed(model.eval(), items, tokenizer, options, vocab_size=vocab, batch_size=2)
    finally:
        parallel.destroy_model_parallel()


OFF_POLICY_STEPS = 4


def off_policy_config(root: Path, run: str):
    """ZeRO-2, off_policy with threshold 0.5 and a buffer of one step's samples (4 per rank): with seed 5 the
    decisions of the 4 steps are ground_truth, generate, replay, replay. Clipping off (the Megatron parity)."""
    cfg = base_config(root, run, zero_stage=2)
    m = cfg.mgsr
    m.data_schedule, m.init_threshold, m.replay_capacity, m.max_new_tokens = "off_policy", 0.5, 4, 8
    cfg.schedule.train_iters, cfg.optimizer.clip_grad = OFF_POLICY_STEPS, 0.0
    cfg.data.valid_path, cfg.schedule.eval_iters = str(root / "heldout.train"), 1  # validation_loss below
    return cfg


def steps_of(trainer, steps: int) -> list[tuple[str, float]]:
    return [(metrics["source"], metrics["loss"]) for metrics in (trainer.train_step() for _ in range(steps))]


def check_off_policy_resume(root: Path, runs: dict) -> dict:
    """N steps straight = N/2 steps, a checkpoint, a fresh trainer loading it, N/2 steps (sources and losses
    identical: the second half replays the restored buffer); the checkpoint without its schedule files is
    one line naming the file; the validation loss reaches the schedule."""
    import shutil

    import torch.distributed as dist

    from mgsr_megatron.deepspeed_engine.checkpoint import load_checkpoint, save_checkpoint
    from mgsr_megatron.deepspeed_engine.run import build_trainer
    from mgsr_megatron.errors import UserError
    from mgsr_megatron.models.trust import write_manifest

    half = OFF_POLICY_STEPS // 2
    trainer, _ = build_trainer(off_policy_config(root, "off_policy_straight"))
    straight = runs["deepspeed"] = steps_of(trainer, OFF_POLICY_STEPS)
    trainer, _ = build_trainer(off_policy_config(root, "off_policy_resume"))
    first = steps_of(trainer, half)
    saved = save_checkpoint(trainer, root / "runs" / "off_policy_resume" / "checkpoints")
    buffer = list(trainer.schedule.buffer.samples)
    fresh, _ = build_trainer(off_policy_config(root, "off_policy_resume"))
    stripped = root / "runs" / "off_policy_stripped" / saved.name
    if dist.get_rank() == 0:  # the checkpoint as an older version (or another schedule) left it
        shutil.rmtree(stripped, ignore_errors=True)
        shutil.copytree(saved, stripped)
        for path in stripped.glob("schedule_dp*.pt"):
            path.unlink()
        write_manifest(stripped)
    dist.barrier()
    try:
        load_checkpoint(fresh, stripped)
        raise AssertionError("a checkpoint without schedule_dp*.pt was resumed by an off_policy run")
    except UserError as exc:
        message = str(exc)
    assert "schedule_dp0.pt" in message and "\n" not in message, message
    load_checkpoint(fresh, saved)
    assert list(fresh.schedule.buffer.samples) == buffer and len(buffer) == 4, (buffer, fresh.schedule.buffer)
    second = steps_of(fresh, OFF_POLICY_STEPS - half)
    sources = [source for source, _ in straight]
    assert sources == ["ground_truth", "generate", "replay", "replay"], sources
    assert all(math.isfinite(loss) for _, loss in straight), straight
    assert first + second == straight, f"resumed {first} + {second} vs straight {straight}"
    valid = fresh.validation_loss()
    assert valid["replay_threshold"] == 0.5 and fresh.schedule.prev_loss == valid["loss"], valid
    return {"straight": straight, "missing_file_error": message}


def check_off_policy_megatron_parity(root: Path, runs: dict) -> dict:
    """The Megatron engine (TP=1, DP=2) on the converted models takes the same off_policy decisions and gives
    the DeepSpeed engine's losses (the parity harness of tests/dist/deepspeed_checks.py)."""
    from mgsr_megatron import parallel
    from mgsr_megatron.training.run import train as megatron_train
    from tests.dist.check_conversion import on_rank0
    from tests.dist.deepspeed_checks import PARITY_RTOL, convert_for_megatron, megatron_config

    assert "deepspeed" in runs, "the DeepSpeed run (off_policy_resume_zero2) did not finish"
    parallel.init_distributed()  # the process group exists: this installs Megatron's CPU adapter
    parallel.initialize_model_parallel(1, 1)  # collectively: rank 0's import_hf would start it alone
    try:
        on_rank0(lambda: convert_for_megatron(root))
        cfg = megatron_config(root, "off_policy_megatron")
        edited = off_policy_config(root, "off_policy_megatron")
        cfg.mgsr, cfg.schedule, cfg.optimizer = edited.mgsr, edited.schedule, edited.optimizer
        code, _ = megatron_train(cfg)
    finally:
        parallel.destroy_model_parallel()
    assert code == 0, code
    megatron = [(row["source"], row["loss"]) for _, row in sorted(metrics_of(cfg.logging.output_dir).items())]
    deepspeed = runs["deepspeed"]
    assert [s for s, _ in megatron] == [s for s, _ in deepspeed], (megatron, deepspeed)
    worst = max(abs(m - d) / abs(d) for (_, m), (_, d) in zip(megatron, deepspeed))
    assert worst <= PARITY_RTOL, f"Megatron vs DeepSpeed engine, off_policy: {megatron} vs {deepspeed}"
    return {"megatron": megatron, "max_relative_difference": worst}


def main(root: Path, out: Path) -> None:
    import torch.distributed as dist

    from mgsr_megatron.deepspeed_engine import runtime

    started = time.time()
    runtime.init_distributed(timeout_minutes=2)
    rank = dist.get_rank()
    if rank == 0:
        build_setup(root)
        build_heldout(root)
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
    record("seqkd_zero3_training", lambda: check_training(root, counter, "seqkd", 1, eval_prompts=12))
    runs = {}
    record("off_policy_resume_zero2", lambda: check_off_policy_resume(root, runs))
    record("evaluation_zero3", lambda: check_evaluation(root, counter))  # it sets up Megatron's groups
    record("off_policy_megatron_parity", lambda: check_off_policy_megatron_parity(root, runs))
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
