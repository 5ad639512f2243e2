"""The DeepSpeed engine's multi-process checks, one torchrun launch of 2 ranks (tests/test_deepspeed_engine.py):

    torchrun --nproc-per-node 2 tests/dist/deepspeed_checks.py --root DIR --out results.json

Rank 0 builds the tiny setup under DIR (training/smoke.py's SentencePiece tokenizer and indexed data, a
random HF llama student 2x32 and teacher 2x64 whose embedding is wider than the tokenizer), then the ranks
train with `deepspeed_engine.run.train` in several settings (6 steps, global batch 8 = micro-batch 2 x
DP 2 x 2 accumulation steps, SFT + DAC-KL + span on ground truth, fp32) and record per check ok/error and
the losses; a teacher cache is written in a process of its own (write_teacher_cache) and read by a run.
Last, in a new process group (Megatron's CPU adapter must not be active during the DeepSpeed runs),
the same HF weights converted by conversion.import_hf are trained by the Megatron engine and compared with a
DeepSpeed run (parity_with_megatron_engine). Not named check_*.py: the Megatron harness (tests/dist/harness.py)
imports those.

    deepspeed_checks.py --hold-in-save STEP train --config X.yaml   (`mgsr train`, held half-way through the
                                                                    checkpoint of STEP: the SIGKILL test)
    deepspeed_checks.py --write-teacher-cache DIR                 (the teacher cache of the setup in DIR)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEPS = 6
RTOL = 1e-5
PARITY_KEYS = ("loss", "sft", "dac_kl", "span", "grad_norm")  # per step, DeepSpeed vs Megatron engine
PARITY_RTOL = 1e-4
FP16_RTOL = 1e-2  # fp16 vs fp32 ZeRO-2, the loss of every step and the first step's gradient norm


def build_setup(root: Path) -> None:
    """Tokenizer + data (smoke.build_files) and the HF student / teacher directories (rank 0)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mgsr_megatron.training.smoke import build_files

    if not (root / "tok.model").is_file():
        build_files(root)
    for name, hidden, vocab in (("student_hf", 32, 256), ("teacher_hf", 64, 320)):
        if (root / name / "config.json").is_file():
            continue
        torch.manual_seed(7 if name == "student_hf" else 8)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        if name == "teacher_hf":  # a sharper teacher than a fresh init: DAC-KL's band has something to cut
            with torch.no_grad():
                model.lm_head.weight.mul_(8.0)
        model.save_pretrained(root / name)


def base_config(root: Path, run: str, **deepspeed):
    from mgsr_megatron.config import Config

    cfg = Config()
    cfg.deepspeed.enabled = True
    for key, value in deepspeed.items():
        setattr(cfg.deepspeed, key, value)
    cfg.student.load, cfg.teacher.load = str(root / "student_hf"), str(root / "teacher_hf")
    cfg.data.tokenizer, cfg.data.train_path = str(root / "tok.model"), str(root / "data.train")
    cfg.data.max_prompt_length = 24
    cfg.parallel.seed = 5
    sched = cfg.schedule
    sched.seq_length, sched.micro_batch_size, sched.global_batch_size = 40, 2, 8
    sched.train_iters, sched.lr_warmup_iters, sched.eval_interval = STEPS, 2, 0
    cfg.optimizer.lr = 1e-2
    cfg.mgsr.data_schedule = "ground_truth"
    cfg.mgsr.k_band, cfg.mgsr.k_feat, cfg.mgsr.loss_chunk_tokens = 32, 16, 64
    cfg.logging.output_dir = str(root / "runs" / run)
    cfg.logging.log_interval, cfg.logging.progress_bar, cfg.logging.tensorboard = 1, False, False
    return cfg


def losses_of(output_dir: str | Path) -> dict[int, float]:
    out = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]
    return out


def metrics_of(output_dir: str | Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (Path(output_dir) / "metrics.jsonl").read_text().splitlines())
            if row["kind"] == "train"}


def assert_close(actual: dict, expected: dict, what: str, rtol: float = RTOL) -> None:
    assert sorted(actual) == sorted(expected), f"{what}: steps {sorted(actual)} vs {sorted(expected)}"
    for step in expected:
        a, e = actual[step], expected[step]
        assert math.isfinite(a) and abs(a - e) <= rtol * abs(e), f"{what}: step {step} loss {a!r} vs {e!r}"


@contextlib.contextmanager
def fp16_on_cpu():
    """DeepSpeed's CPU accelerator reports fp16 only where oneDNN has it (not on this machine), and DeepSpeed then
    refuses it, while torch computes fp16 on CPU: the fp16 checks tell DeepSpeed it has fp16 to run the engine's
    fp16 path (loss scaling, overflow skips, checkpoints). GPU runs of it are still to be made."""
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: True
    accelerator.supported_dtypes = lambda: [torch.float32, torch.bfloat16, torch.float16]
    try:
        yield
    finally:
        del accelerator.is_fp16_supported, accelerator.supported_dtypes


# ------------------------------------------------------------------------------------------ reference
def reference_losses(cfg, steps: int) -> dict[int, float]:
    """An independent single-process loop on the same HF models: both DP ranks' micro-batches in one process,
    each micro-batch's loss from losses.mgsr_objective, gradients averaged over micro-batches and ranks,
    the student clipped on its norm and stepped by torch AdamW (decay on matrices only), the ClipNet
    likewise with its own AdamW, the LR from training/optimizer.py."""
    import torch
    from transformers import AutoModelForCausalLM

    from mgsr_megatron.deepspeed_engine.settings import resolve_models
    from mgsr_megatron.losses import ClipNet, LossTargets, ObjectiveSettings, mgsr_objective
    from mgsr_megatron.training.data import TrainingData
    from mgsr_megatron.training.optimizer import build_optimizer, learning_rate

    cfg = copy.deepcopy(cfg)
    tokenizer, _ = resolve_models(cfg)
    vocab = tokenizer.vocab_size
    student = AutoModelForCausalLM.from_pretrained(cfg.student.load, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.load, dtype=torch.float32).eval()
    m, opt = cfg.mgsr, cfg.optimizer
    clipnet = ClipNet(k_feat=m.k_feat, hidden=m.clipnet_hidden, seed=cfg.parallel.seed, rho=m.rho)
    settings = ObjectiveSettings.from_config(m)
    matrices = [p for p in student.parameters() if p.ndim > 1]
    vectors = [p for p in student.parameters() if p.ndim == 1]
    student_opt = torch.optim.AdamW([{"params": matrices, "weight_decay": opt.weight_decay},
                                     {"params": vectors, "weight_decay": 0.0}], lr=opt.lr,
                                    betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps)
    clipnet_opt = build_optimizer(clipnet, opt)
    dp = 2
    ranks = [TrainingData(cfg, r, dp) for r in range(dp)]
    num_micro = cfg.schedule.global_batch_size // (cfg.schedule.micro_batch_size * dp)
    out = {}
    for step in range(steps):
        lr = learning_rate(step, opt, cfg.schedule)
        for group in student_opt.param_groups + clipnet_opt.param_groups:
            group["lr"] = lr
        student_opt.zero_grad(set_to_none=True)
        clipnet_opt.zero_grad(set_to_none=True)
        batches = [data.next_micro_batches(num_micro) for data in ranks]
        total = 0.0
        for rank_batches in batches:
            for mb in rank_batches:
                with torch.no_grad():
                    t = teacher(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits[..., :vocab]
                s = student(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits[..., :vocab]
                loss, _ = mgsr_objective(s, t, LossTargets.from_batch(mb), clipnet=clipnet, settings=settings)
                (loss / (num_micro * dp)).backward()
                total += float(loss)
        out[step + 1] = total / (num_micro * dp)
        for params in (list(student.parameters()), list(clipnet.parameters())):
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], opt.clip_grad)
        student_opt.step()
        clipnet_opt.step()
    return out


# ------------------------------------------------------------------------------------------ Megatron engine
VOCAB = 256  # the tokenizer's (smoke.build_files); the teacher's HF embedding has 320 rows


def no_clipping(cfg) -> None:
    """Clipping off in both engines (optimizer.clip_grad=0: the DeepSpeed engine passes gradient_clipping=0,
    which DeepSpeed's ZeRO optimizers skip, and clips the ClipNet only if clip > 0; the Megatron engine clips
    only if max_norm > 0). The engines clip differently (student and ClipNet on their own norms vs one joint
    norm) and these runs' norms (~3) exceed the default 1.0, so with clipping on they would differ."""
    cfg.optimizer.clip_grad = 0.0


def convert_for_megatron(root: Path) -> None:
    """Rank 0: the HF student, and the HF teacher cut to the tokenizer's 256 ids, converted into Megatron
    checkpoints by the project's converter. The cut keeps exactly what the DeepSpeed engine uses (it cuts the
    teacher's wider logits to the tokenizer's vocabulary; the Megatron engine needs one vocabulary for both)."""
    from safetensors.torch import load_file, save_file

    from mgsr_megatron.conversion import import_hf

    cut = root / "teacher_hf_cut"
    cut.mkdir(exist_ok=True)
    config = json.loads((root / "teacher_hf" / "config.json").read_text())
    (cut / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB}))
    state = load_file(root / "teacher_hf" / "model.safetensors")
    save_file({k: v[:VOCAB].contiguous() if k in ("model.embed_tokens.weight", "lm_head.weight") else v
               for k, v in state.items()}, cut / "model.safetensors", metadata={"format": "pt"})
    for source, target in (("student_hf", "student_megatron"), ("teacher_hf_cut", "teacher_megatron")):
        if not (root / target / "model_config.yaml").is_file():  # the teacher cache's process may have done it
            import_hf(root / source, root / target, overwrite=True, progress=False)


def megatron_config(root: Path, run: str):
    """base_config for the Megatron engine: the converted models (TP=PP=1, DP=2), everything else equal."""
    import dataclasses

    from mgsr_megatron.models.checkpoint import read_model_config

    cfg = base_config(root, run)
    cfg.deepspeed.enabled = False
    for name in ("student", "teacher"):
        path = str(root / f"{name}_megatron")
        setattr(cfg, name, dataclasses.replace(read_model_config(path), load=path))
    return cfg


TEACHER_CACHE = "teacher_cache"


def write_teacher_cache(root: Path) -> None:
    """`deepspeed_checks.py --write-teacher-cache ROOT`, one process of its own (conversion and write_cache install
    Megatron's CPU adapter, which the DeepSpeed runs must not see): the teacher cut to the tokenizer's ids, converted
    (convert_for_megatron) and cached by `mgsr cache-teacher`'s write_cache (top-32 at temperature 1)."""
    from mgsr_megatron.training.teacher_cache import write_cache

    convert_for_megatron(root)
    write_cache(megatron_config(root, "cache"), root / TEACHER_CACHE)


def check_converted_logits(cfg, root: Path) -> dict[str, float]:
    """Student and teacher logits of the converted models on the first training micro-batch equal the HF
    models' (the check_conversion helpers; fp32, 1e-4 as there). Returns the max abs errors."""
    from transformers import AutoModelForCausalLM

    from mgsr_megatron.models import build_model
    from mgsr_megatron.models.checkpoint import load_model
    from mgsr_megatron.training.data import TrainingData
    from tests.dist.check_conversion import _megatron_logits, hf_logits

    tokens = TrainingData(cfg, 0, 1).next_micro_batches(1)[0]["tokens"]
    errors = {}
    for name in ("student", "teacher"):
        model = build_model(getattr(cfg, name))
        load_model(model, getattr(cfg, name).load)
        hf = AutoModelForCausalLM.from_pretrained(root / f"{name}_hf").eval()
        diff = _megatron_logits(model.eval(), [tokens], VOCAB) - hf_logits(hf, [tokens])[..., :VOCAB]
        errors[name] = diff.abs().max().item()
    assert all(err <= 1e-4 for err in errors.values()), f"converted models vs Hugging Face, max abs logits: {errors}"
    return errors


# ------------------------------------------------------------------------------------------ checks
class Checks:
    def __init__(self, root: Path, out: Path):
        import torch.distributed as dist

        self.root, self.out, self.dist = root, out, dist
        self.results: dict = {"checks": {}, "losses": {}, "seconds": {}}

    def record(self, name: str, fn) -> None:
        dist = self.dist
        start = time.time()
        try:
            fn()
            error = None
        except BaseException as exc:  # noqa: BLE001 - reported per check (SystemExit of the CLI included)
            error = "".join(traceback.format_exception(exc))[-4000:]
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        failed = {r: e for r, e in enumerate(errors) if e}
        self.results["checks"][name] = {"ok": not failed, "seconds": round(time.time() - start, 2),
                                        "error": "\n".join(f"[rank {r}] {e}" for r, e in failed.items())}
        if dist.get_rank() == 0:
            print(f"{'PASS' if not failed else 'FAIL'} {name} ({time.time() - start:.1f} s)", flush=True)
            self.out.write_text(json.dumps(self.results, indent=1))

    def train(self, run: str, on_step=None, edit=None, **deepspeed):
        """`on_step(trainer)` runs after every training step (the test wraps the trainer's train_step: the
        library has no hook for it)."""
        from mgsr_megatron.deepspeed_engine.engine import DeepSpeedTrainer
        from mgsr_megatron.deepspeed_engine.run import train

        cfg = base_config(self.root, run, **deepspeed)
        if edit is not None:
            edit(cfg)
        original = DeepSpeedTrainer.train_step

        def train_step(trainer):
            metrics = original(trainer)
            if on_step is not None:
                on_step(trainer)
            return metrics

        DeepSpeedTrainer.train_step = train_step
        try:
            code, trainer = train(cfg)
        finally:
            DeepSpeedTrainer.train_step = original
        self.results["losses"][run] = losses_of(cfg.logging.output_dir)
        return code, trainer, cfg


def main(root: Path, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from mgsr_megatron.deepspeed_engine import runtime

    started = time.time()
    runtime.init_distributed(timeout_minutes=2)
    rank = dist.get_rank()
    if rank == 0:
        build_setup(root)
    dist.barrier()
    checks = Checks(root, out)
    losses = checks.results["losses"]
    trainers = {}

    def zero_stages():
        for stage in (1, 2, 3):
            export = str(root / "export_zero3") if stage == 3 else None
            _, trainers[stage], _ = checks.train(f"zero{stage}", zero_stage=stage, export_dir=export)
        for stage in (2, 3):
            assert_close(losses[f"zero{stage}"], losses["zero1"], f"ZeRO-{stage} vs ZeRO-1")
        assert len(losses["zero1"]) == STEPS and losses["zero1"][STEPS] < losses["zero1"][1], losses["zero1"]

    def teacher_zero3():
        checks.train("teacher_zero3", zero_stage=2, teacher_zero3=True)
        assert_close(losses["teacher_zero3"], losses["zero2"], "ZeRO-3 teacher vs replicated teacher")

    def offload_optimizer():
        checks.train("offload", zero_stage=2, offload_optimizer=True)
        assert_close(losses["offload"], losses["zero2"], "ZeRO-2 + optimizer offload (torch AdamW) vs ZeRO-2")

    def offload_params():
        checks.train("offload_zero3", zero_stage=3, offload_optimizer=True, offload_params=True)
        assert_close(losses["offload_zero3"], losses["zero3"], "ZeRO-3 + parameter and optimizer offload vs ZeRO-3")

    def reference():
        try:
            if rank == 0:
                losses["reference"] = reference_losses(base_config(root, "reference"), STEPS)
                assert_close(losses["zero1"], losses["reference"], "ZeRO-1 vs the plain PyTorch loop")
        finally:
            dist.barrier()

    def export():
        from transformers import AutoModelForCausalLM

        trainer = trainers[3]
        tokens = torch.arange(30).reshape(2, 15) % 250
        positions = torch.arange(15).expand(2, -1)
        trainer.engine.eval()
        with torch.no_grad():
            expected = trainer.logits(trainer.engine, tokens, positions)
        try:
            if rank == 0:
                model = AutoModelForCausalLM.from_pretrained(root / "export_zero3", trust_remote_code=False).eval()
                initial = AutoModelForCausalLM.from_pretrained(root / "student_hf").eval()
                with torch.no_grad():
                    got = model(input_ids=tokens, position_ids=positions).logits[..., :256]
                    before = initial(input_ids=tokens, position_ids=positions).logits[..., :256]
                err = (got - expected).abs().max().item()
                assert err < 1e-5, f"exported model's logits differ from the engine's by {err}"
                assert (before - expected).abs().max().item() > 1e-2, "the exported student is still the initial one"
        finally:
            dist.barrier()

    def preempt_and_resume():
        def usr1_at_3(trainer):
            if trainer.step == 3 and rank == 0:
                os.kill(os.getpid(), signal.SIGUSR1)

        save = root / "runs" / "resume" / "checkpoints"

        def with_save(cfg):
            cfg.checkpoint.save, cfg.checkpoint.save_interval = str(save), 2

        code, _, _ = checks.train("resume", on_step=usr1_at_3, edit=with_save, zero_stage=3)
        assert code == 115, f"preempted run exited with {code}, expected 115"
        assert (save / "latest").read_text().strip() == "iter_0000003"
        first = dict(losses["resume"])
        from mgsr_megatron.deepspeed_engine.run import train

        cfg = base_config(root, "resume", zero_stage=3)
        with_save(cfg)
        cfg.checkpoint.resume = "auto"
        code, trainer = train(cfg)
        assert code == 0 and trainer.step == STEPS, (code, trainer.step)
        resumed = losses_of(cfg.logging.output_dir)
        losses["resume"] = resumed
        assert_close({s: first[s] for s in (1, 2, 3)}, {s: losses["zero3"][s] for s in (1, 2, 3)}, "before the stop")
        assert_close(resumed, losses["zero3"], "resumed run vs uninterrupted", rtol=1e-6)
        assert (save / "latest").read_text().strip() == f"iter_{STEPS:07d}"

    def bf16_master_weights():
        from mgsr_megatron.deepspeed_engine.run import train

        cfg = base_config(root, "bf16", zero_stage=2)
        cfg.student.params_dtype = cfg.teacher.params_dtype = "bfloat16"
        cfg.schedule.train_iters = 3
        _, trainer = train(cfg)
        losses["bf16"] = losses_of(cfg.logging.output_dir)
        assert all(math.isfinite(v) for v in losses["bf16"].values()), losses["bf16"]
        assert abs(losses["bf16"][1] - losses["zero1"][1]) < 0.05 * abs(losses["zero1"][1]), losses["bf16"]
        assert next(trainer.student.parameters()).dtype == torch.bfloat16
        masters = trainer.optimizer.single_partition_of_fp32_groups
        assert all(m.dtype == torch.float32 for m in masters), [m.dtype for m in masters]

    def fp16_matches_fp32():
        """fp16 (dynamic loss scale from 2**12, fp32 masters) under ZeRO-2 follows the fp32 ZeRO-2 run within
        FP16_RTOL: every step's loss, and the first step's joint gradient norm (the ClipNet's gradients unscaled;
        later norms drift further apart: 5% at step 4 in a 4-step trial)."""
        from mgsr_megatron.deepspeed_engine.run import train

        cfg = base_config(root, "fp16", zero_stage=2)
        cfg.student.params_dtype = cfg.teacher.params_dtype = "float16"
        cfg.optimizer.initial_loss_scale = 2.0 ** 12
        with fp16_on_cpu():
            _, trainer = train(cfg)
        fp16, fp32 = metrics_of(cfg.logging.output_dir), metrics_of(root / "runs" / "zero2")
        assert next(trainer.student.parameters()).dtype == torch.float16
        assert all(m.dtype == torch.float32 for m in trainer.optimizer.single_partition_of_fp32_groups)
        assert_close({s: r["loss"] for s, r in fp16.items()}, {s: r["loss"] for s, r in fp32.items()},
                     "fp16 vs fp32 loss", rtol=FP16_RTOL)
        assert_close({1: fp16[1]["grad_norm"]}, {1: fp32[1]["grad_norm"]}, "fp16 vs fp32 grad norm", rtol=FP16_RTOL)
        checks.results["fp16_vs_fp32_max_relative_loss"] = max(abs(fp16[s]["loss"] - fp32[s]["loss"]) / fp32[s]["loss"]
                                                               for s in fp32)
        assert all(r["loss_scale"] == 2.0 ** 12 and r["skipped_steps"] == 0 for r in fp16.values()), fp16

    def fp16_overflow_skipped():
        """A loss scale of 2**60 overflows fp16 at every step: DeepSpeed skips the student's step and the engine the
        ClipNet's (both stay the initial ones), the scale halves per step (hysteresis 1), the steps are counted as
        skipped but not as NaN steps (max_nan_steps=1 is not hit), and a resume restores the lowered scale."""
        from mgsr_megatron.deepspeed_engine.checkpoint import load_checkpoint
        from mgsr_megatron.deepspeed_engine.models import load_model
        from mgsr_megatron.deepspeed_engine.run import build_trainer, train
        from mgsr_megatron.losses import ClipNet

        def config(run):
            cfg = base_config(root, run, zero_stage=2)
            cfg.student.params_dtype = cfg.teacher.params_dtype = "float16"
            cfg.optimizer.initial_loss_scale, cfg.optimizer.hysteresis = 2.0 ** 60, 1
            cfg.schedule.train_iters, cfg.schedule.max_nan_steps = 3, 1
            cfg.checkpoint.save, cfg.checkpoint.save_interval = str(root / "runs" / "fp16_overflow" / "ckpt"), 3
            return cfg

        cfg = config("fp16_overflow")
        with fp16_on_cpu():
            code, trainer = train(cfg)
            assert code == 0, code
            rows = metrics_of(cfg.logging.output_dir)
            assert [(r["loss_scale"], r["skipped_steps"]) for r in rows.values()] == \
                [(2.0 ** 59, 1), (2.0 ** 58, 2), (2.0 ** 57, 3)], rows
            assert all(math.isfinite(r["loss"]) and math.isnan(r["grad_norm"]) for r in rows.values()), rows
            initial = load_model(cfg.student.load, "float16", None, "cpu")
            assert all(torch.equal(a, b) for a, b in zip(trainer.student.parameters(), initial.parameters()))
            m = cfg.mgsr
            clipnet = ClipNet(k_feat=m.k_feat, hidden=m.clipnet_hidden, seed=cfg.parallel.seed, rho=m.rho)
            assert all(torch.equal(a, b) for a, b in zip(trainer.clipnet.parameters(), clipnet.parameters()))
            cfg = config("fp16_overflow_resumed")
            cfg.checkpoint.resume = "auto"
            resumed, directory = build_trainer(cfg)
            assert resumed.loss_scale() == 2.0 ** 60
            load_checkpoint(resumed, directory)
            assert resumed.loss_scale() == 2.0 ** 57 and resumed.skipped_steps == 3, resumed.loss_scale()

    def cli_with_config_json():
        """`mgsr train --config X.yaml --deepspeed ds.json` end to end (last: it ends the process group)."""
        import yaml

        from mgsr_megatron.cli import main as cli_main

        run_dir = root / "runs" / "cli"
        cfg = base_config(root, "cli", zero_stage=2)
        data = cfg.to_dict()
        data.pop("deepspeed")
        data["schedule"]["train_iters"] = 2
        ds_json = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": 8, "gradient_clipping": "auto",
                   "zero_optimization": {"stage": 2, "reduce_bucket_size": 500000}}
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(data))
            (run_dir / "ds.json").write_text(json.dumps(ds_json))
        dist.barrier()
        try:
            cli_main(["train", "--config", str(run_dir / "config.yaml"), "--deepspeed", str(run_dir / "ds.json")])
        except SystemExit as exc:
            assert exc.code == 0, f"mgsr train exited with {exc.code}"
        losses["cli"] = losses_of(run_dir)
        assert_close(losses["cli"], {s: losses["zero2"][s] for s in (1, 2)}, "CLI + ds.json vs ZeRO-2")

    def teacher_cache():
        """6 ZeRO-2 ground-truth steps of SFT + learned DAC-KL (w_span 0) from the teacher's top-32 cache give the
        online teacher's losses (relative 1e-4); the cached run has no teacher.load and loads no teacher."""
        try:
            if rank == 0 and not (root / TEACHER_CACHE / "manifest.json").is_file():
                # a single process: none of torchrun's variables (TORCHELASTIC_USE_AGENT_STORE would make its
                # rendezvous wait for the agent's store)
                env = {k: v for k, v in os.environ.items() if not k.startswith(
                    ("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_", "GROUP_", "ROLE_", "TORCHELASTIC_"))}
                proc = subprocess.run([sys.executable, __file__, "--write-teacher-cache", str(root)], env=env,
                                      capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        finally:
            dist.barrier()
        assert (root / TEACHER_CACHE / "manifest.json").is_file(), "rank 0 wrote no teacher cache"

        def no_span(cfg):
            cfg.mgsr.w_span, cfg.mgsr.dac_mode = 0.0, "learned"

        def from_cache(cfg):
            no_span(cfg)
            cfg.teacher.cache, cfg.teacher.load = str(root / TEACHER_CACHE), None

        checks.train("cache_online", edit=no_span, zero_stage=2)
        _, trainer, _ = checks.train("cache_read", edit=from_cache, zero_stage=2)
        assert trainer.teacher is None and trainer.cache is not None
        cached, online = losses["cache_read"], losses["cache_online"]
        checks.results["cache_vs_online_max_relative_loss"] = max(abs(cached[s] - online[s]) / abs(online[s])
                                                                  for s in online)
        assert_close(losses["cache_read"], losses["cache_online"], "teacher cache vs online teacher", rtol=1e-4)

    def megatron_parity_deepspeed_side():
        """The DeepSpeed half of parity_with_megatron_engine (before the CLI check; the Megatron half after it)."""
        checks.train("parity_deepspeed", edit=no_clipping, zero_stage=2)

    def megatron_parity():
        """The Megatron engine (Trainer, TP=1, DP=2) on the converted models gives the DeepSpeed engine's loss,
        sft, dac_kl and span (and the joint gradient norm) at every step: same data, LR schedule, ClipNet seed
        and AdamW settings, clipping off in both (no_clipping)."""
        earlier = checks.results["checks"]["parity_with_megatron_engine"]
        assert earlier["ok"], f"the DeepSpeed run failed:\n{earlier['error']}"
        from mgsr_megatron import parallel
        from mgsr_megatron.training.run import train as megatron_train
        from tests.dist.check_conversion import on_rank0

        parallel.init_distributed()  # the process group exists: this installs Megatron's CPU adapter
        parallel.initialize_model_parallel(1, 1)
        on_rank0(lambda: convert_for_megatron(root))
        cfg = megatron_config(root, "parity_megatron")
        checks.results["converted_logits_max_abs_error"] = check_converted_logits(cfg, root)
        no_clipping(cfg)
        code, _ = megatron_train(cfg)
        assert code == 0, code
        ds, mg = metrics_of(root / "runs" / "parity_deepspeed"), metrics_of(cfg.logging.output_dir)
        assert sorted(ds) == sorted(mg) == list(range(1, STEPS + 1)), (sorted(ds), sorted(mg))
        worst = {key: max(abs(mg[s][key] - ds[s][key]) / abs(ds[s][key]) for s in ds) for key in PARITY_KEYS}
        checks.results["parity_max_relative_difference"] = worst
        rows = {name: [[run[s][k] for k in PARITY_KEYS] for s in run] for name, run in (("DeepSpeed", ds),
                                                                                       ("Megatron", mg))}
        assert all(value <= PARITY_RTOL for value in worst.values()), \
            f"Megatron vs DeepSpeed engine, max relative differences over {STEPS} steps: {worst}; {rows}"

    checks.record("zero_stages_agree", zero_stages)
    checks.record("teacher_zero3_matches_replicated", teacher_zero3)
    checks.record("offload_optimizer_cpu", offload_optimizer)
    checks.record("offload_params_zero3_cpu", offload_params)
    checks.record("parity_with_plain_pytorch_loop", reference)
    checks.record("export_loads_in_transformers", export)
    checks.record("preempt_resume_exact", preempt_and_resume)
    checks.record("bf16_fp32_master_weights", bf16_master_weights)
    checks.record("fp16_zero2_matches_fp32", fp16_matches_fp32)
    checks.record("fp16_overflow_step_skipped", fp16_overflow_skipped)
    checks.record("teacher_cache_matches_online", teacher_cache)
    checks.record("parity_with_megatron_engine", megatron_parity_deepspeed_side)
    checks.results["seconds"]["before_cli"] = round(time.time() - started, 1)
    cli_results = checks.results
    # the CLI run destroys the process group at its end: record its outcome on each rank's own
    error = None
    start = time.time()
    try:
        cli_with_config_json()
    except BaseException as exc:  # noqa: BLE001
        error = "".join(traceback.format_exception(exc))[-4000:]
    if rank == 0:
        cli_results["checks"]["cli_deepspeed_json"] = {"ok": error is None, "seconds": round(time.time() - start, 2),
                                                       "error": error or ""}
        out.write_text(json.dumps(cli_results, indent=1))
        print(f"{'PASS' if error is None else 'FAIL'} cli_deepspeed_json", flush=True)
    # the Megatron engine last, in a new process group: its CPU adapter (platform.activate) patches torch.cuda
    # and torch.distributed for Megatron, which the DeepSpeed runs above must not see
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{root}/megatron_world_{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    checks.record("parity_with_megatron_engine", megatron_parity)
    checks.results["seconds"]["total"] = round(time.time() - started, 1)
    if rank == 0:
        out.write_text(json.dumps(checks.results, indent=1))
    dist.destroy_process_group()


HOLDING = "HOLDING"


def mgsr_train_holding_in_save(step: int, args: list[str]) -> None:
    """`mgsr ARGS` (the real CLI) with one test-only patch, so that tests/test_deepspeed_engine.py can SIGKILL
    the job in the middle of a checkpoint write at a known point: rank 0 stops for good while writing the
    checkpoint of `step`, after DeepSpeed's files, common.pt and the RNG states are in the temporary directory
    and before its manifest, the rename and `latest`; it first creates HOLDING in that directory."""
    from mgsr_megatron import cli
    from mgsr_megatron.models import trust

    write_manifest = trust.write_manifest  # deepspeed_engine/checkpoint.py imports it at each save

    def holding(directory, *rest, **kwargs):
        if Path(directory).name == f".iter_{step:07d}.tmp":
            (Path(directory) / HOLDING).write_text(str(os.getpid()))
            time.sleep(3600)
        return write_manifest(directory, *rest, **kwargs)

    trust.write_manifest = holding
    cli.main(args)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hold-in-save"]:  # deepspeed_checks.py --hold-in-save STEP MGSR_ARGS...
        mgsr_train_holding_in_save(int(sys.argv[2]), sys.argv[3:])
        sys.exit(0)
    if sys.argv[1:2] == ["--write-teacher-cache"]:  # deepspeed_checks.py --write-teacher-cache ROOT
        write_teacher_cache(Path(sys.argv[2]))
        sys.exit(0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    main(args.root, args.out)
