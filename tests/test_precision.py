"""Production precision (issue 14): a bf16 student trained through Megatron's optimizer (fp32 main
weights and gradients) moves like the fp32 student, where plain AdamW on bf16 weights barely moved.

Run in a subprocess (its own process group): `python -m tests.test_precision OUT.json` trains a tiny
llama student (2 x 128, SFT only, lr 1e-5 constant, 40 steps, same data and seed) in float32, in
bfloat16 from the same (bf16-representable) initial weights, and in float16 with dynamic loss scaling
(its own fp16-rounded init), and writes the movement statistics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
STEPS = 40


def _config(root: Path, dtype: str):
    from mgsr_megatron.training.smoke import base_config

    cfg = base_config(root)
    cfg.student.num_layers, cfg.student.hidden_size, cfg.student.ffn_hidden_size = 2, 128, None
    cfg.student.params_dtype = dtype
    if dtype == "float16":
        cfg.optimizer.initial_loss_scale = 2.0 ** 16  # dynamic loss scaling
    cfg.mgsr.w_dac = cfg.mgsr.w_span = 0.0
    cfg.mgsr.data_schedule = "ground_truth"
    cfg.teacher.load = None
    cfg.optimizer.lr = cfg.optimizer.min_lr = 1e-5
    cfg.schedule.lr_warmup_iters = 0
    cfg.schedule.lr_decay_style = "constant"
    cfg.schedule.train_iters = STEPS
    return cfg


def _weights(model):
    import torch

    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def _train(root: Path, dtype: str):
    """Initial and final weights (as exported: the model's own parameters, in float)."""
    import torch

    from mgsr_megatron.training.run import build_trainer

    trainer = build_trainer(_config(root, dtype))
    if dtype == "float32":  # start from the bf16-rounded init, exactly what the bf16 student starts from
        with torch.no_grad():
            for p in trainer.student.parameters():
                p.copy_(p.bfloat16().float())
    before = _weights(trainer.student)
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    return before, _weights(trainer.student), losses


def main(out: str) -> None:
    import torch

    from mgsr_megatron import parallel
    from mgsr_megatron.training.smoke import build_files

    root = Path(tempfile.mkdtemp(prefix="mgsr_precision_"))
    build_files(root)
    parallel.init_distributed()
    init32, end32, losses32 = _train(root, "float32")
    init16, end16, losses16 = _train(root, "bfloat16")
    init_h, end_h, _ = _train(root, "float16")
    d32, d16, dh = end32 - init32, end16 - init16, end_h - init_h
    result = {
        "fp16_norm_ratio": float(dh.norm() / d32.norm()),
        "fp16_cosine": float(torch.nn.functional.cosine_similarity(dh, d32, dim=0)),
        "same_init": bool(torch.equal(init32, init16)),
        "norm_ratio": float(d16.norm() / d32.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(d16, d32, dim=0)),
        "changed_fraction_bf16": float((d16 != 0).float().mean()),
        "changed_fraction_fp32": float((d32 != 0).float().mean()),
        "loss_fp32": [losses32[0], losses32[-1]], "loss_bf16": [losses16[0], losses16[-1]],
    }
    Path(out).write_text(json.dumps(result))
    parallel.destroy()


def test_bf16_student_moves_like_fp32_student(tmp_path):
    out = tmp_path / "precision.json"
    proc = subprocess.run([sys.executable, "-m", "tests.test_precision", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["same_init"], result
    assert 0.7 <= result["norm_ratio"] <= 1.5, result
    assert result["cosine"] >= 0.8, result
    assert result["changed_fraction_bf16"] > 0.5, result  # plain AdamW on bf16 weights: 16.6 %
    assert 0.7 <= result["fp16_norm_ratio"] <= 1.5 and result["fp16_cosine"] >= 0.8, result  # loss-scaled fp16


def test_cpu_adapter_serves_megatron_optimizer_and_recomputation():
    """What Megatron's optimizer and recomputation need from the CPU adapter (platform/cpu.py)."""
    import pytest
    import torch

    from mgsr_megatron import platform

    if torch.cuda.is_available():
        pytest.skip("the CPU adapter is only active without CUDA")
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.tensor_parallel import random as mp_random

    from mgsr_megatron.platform import cpu

    platform.activate()
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1, dtype=torch.float16).type() == "torch.cuda.HalfTensor"
    assert torch.zeros(1, dtype=torch.int64).type() == "torch.LongTensor"
    assert torch.zeros(1).type(torch.float16).dtype == torch.float16  # conversions untouched
    assert param_and_grad_buffer.dist_reduce_scatter_func is cpu.reduce_scatter_via_all_reduce
    assert mp_random.CheckpointFunction.mgsr_cpu_mode


def test_sigkill_then_resume_is_exact_with_bf16_distributed_optimizer(tmp_path):
    """A whole `mgsr train` job at DP=2 (bf16 student, fp32 main weights sharded by Megatron's distributed
    optimizer) killed with SIGKILL and resumed with --resume auto gives the uninterrupted run's losses."""

    from mgsr_megatron.training.smoke import build_files
    from tests.test_training_process import kill_then_resume, losses, write_config

    data_root = tmp_path / "data"
    data_root.mkdir()
    build_files(data_root)
    extra = ["--optimizer.use_distributed_optimizer=true", "--student.params_dtype=bfloat16"]

    def cmd(config, *more):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=0",
                "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "mgsr_megatron", "train",
                "--config", str(config), *extra, *more]

    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(cmd(write_config(data_root, reference_dir, train_iters=12)), env=ENV, check=True, cwd=ROOT,
                   capture_output=True, timeout=900)
    config = write_config(data_root, killed_dir, train_iters=12)
    resumed_from = kill_then_resume(cmd, config, killed_dir, 600, 900)
    expected, actual = losses(reference_dir), losses(killed_dir)
    assert sorted(actual) == sorted(expected) == list(range(1, 13))
    assert actual == expected, f"resumed from {resumed_from}: losses differ"


@pytest.mark.parametrize("dtype,extra", [("bfloat16", []), ("float16", ["--optimizer.initial_loss_scale=65536"])])
def test_plain_optimizer_16bit_checkpoint_resume_auto_is_exact(tmp_path, dtype, extra):
    """`mgsr train` with a bf16 student (fp16 with dynamic loss scaling) and the plain Megatron optimizer:
    saving used to fail ("Param id 10 does not match any model sharded param": the fp32 norm weights and
    qkv biases next to the 16-bit weights); now `--resume auto` from the step-4 checkpoint repeats the
    uninterrupted run's steps 5-8 exactly (fp32 main weights, Adam moments, step, loss scaler restored)."""
    import json

    from mgsr_megatron.training.smoke import build_files
    from tests.test_training_process import write_config

    data_root = tmp_path / "data"
    data_root.mkdir()
    build_files(data_root)
    run_dir = tmp_path / "run"
    config = write_config(data_root, run_dir, train_iters=8)
    cmd = [sys.executable, "-m", "mgsr_megatron", "train", "--config", str(config),
           f"--student.params_dtype={dtype}", "--student.add_qkv_bias=true", *extra]
    subprocess.run(cmd, env=ENV, check=True, cwd=ROOT, capture_output=True, timeout=600)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000008"
    (checkpoints / "latest").write_text("iter_0000004\n")  # as if the run had died after step 4's save
    subprocess.run(cmd + ["--resume", "auto"], env=ENV, check=True, cwd=ROOT, capture_output=True, timeout=600)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [(row["step"], row["loss"]) for row in rows if row["kind"] == "train"]
    assert [step for step, _ in steps] == [*range(1, 9), *range(5, 9)], steps
    assert steps[8:] == steps[4:8], f"resumed losses {steps[8:]} != uninterrupted {steps[4:8]}"


def _bad(cfg, match: str, tp: int = 1, pp: int = 1):
    import pytest

    from mgsr_megatron.errors import UserError
    from mgsr_megatron.training.optimizer import validate_settings

    with pytest.raises(UserError, match=match) as info:
        validate_settings(cfg, tp, pp)
    assert "\n" not in str(info.value)


def test_bad_precision_optimizer_and_recompute_settings_are_one_line_errors():
    from mgsr_megatron.config import Config
    from mgsr_megatron.training.optimizer import validate_settings

    cfg = Config()
    validate_settings(cfg, 1, 1)  # defaults are fine
    cfg.student.params_dtype = "float16"
    _bad(cfg, "float16 needs loss scaling")
    cfg.optimizer.initial_loss_scale = 65536.0
    validate_settings(cfg, 1, 1)
    cfg.optimizer.loss_scale = -1.0
    _bad(cfg, "loss_scale=-1.0 must be positive")

    cfg = Config()
    cfg.optimizer.overlap_param_gather = True
    _bad(cfg, "needs optimizer.use_distributed_optimizer")

    for options, match in (({"recompute_granularity": "full"}, "recompute_method must be"),
                           ({"recompute_granularity": "everything"}, "rejected by Megatron"),
                           ({"recompute_granularity": "selective", "recompute_num_layers": 1}, "must be None"),
                           ({"recompute_granularity": "full", "recompute_method": "sideways",
                             "recompute_num_layers": 1}, "rejected by Megatron")):
        cfg = Config()
        for key, value in options.items():
            setattr(cfg.student, key, value)
        _bad(cfg, match)
    cfg = Config()
    cfg.student.recompute_granularity, cfg.student.recompute_method = "full", "block"
    cfg.student.recompute_num_layers = 1
    validate_settings(cfg, 1, 2)  # what Megatron accepts passes


def test_resume_with_another_optimizer_kind_or_precision_is_refused(tmp_path):
    import pytest
    import torch

    from mgsr_megatron.config import Config
    from mgsr_megatron.errors import UserError
    from mgsr_megatron.training.checkpoint import check_resume_optimizer

    ckpt = tmp_path / "iter_0000003"
    ckpt.mkdir()
    (ckpt / "model_config.yaml").write_text("arch: llama\n")
    torch.save({"step": 3, "optimizer_kind": {"distributed": True, "params_dtype": "bfloat16"}}, ckpt / "common.pt")
    cfg = Config()
    cfg.checkpoint.resume = str(ckpt)
    with pytest.raises(UserError, match="use_distributed_optimizer=True, this run has False"):
        check_resume_optimizer(cfg)
    cfg.optimizer.use_distributed_optimizer = True
    with pytest.raises(UserError, match="params_dtype=bfloat16, this run has float32"):
        check_resume_optimizer(cfg)
    cfg.student.params_dtype = "bfloat16"
    check_resume_optimizer(cfg)  # same kind and precision: accepted


if __name__ == "__main__":
    main(sys.argv[1])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_16bit_model_is_16bit_throughout_and_matches_fp32(arch):
    """Megatron's Float16Module convention: a bf16 model holds no fp32 norm (a GPT-2/OPT LayerNorm's
    fp32 output entering a bf16 linear layer failed the first forward); its logits equal those of the
    same weights in fp32 up to bf16 rounding."""
    import torch

    from mgsr_megatron import parallel
    from mgsr_megatron.config import ModelConfig
    from mgsr_megatron.models import build_model
    from mgsr_megatron.models.pipeline import forward_logits

    parallel.init_distributed()
    parallel.initialize_model_parallel(1, 1, seed=7)
    settings = dict(arch=arch, num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256,
                    max_position_embeddings=32)
    bf16 = build_model(ModelConfig(**settings, params_dtype="bfloat16")).eval()
    fp32 = build_model(ModelConfig(**settings)).eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        for target, source in zip(fp32.parameters(), bf16.parameters(), strict=True):
            target.copy_(source.float())
    tokens = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    low, high = forward_logits(bf16, [tokens])[0].float(), forward_logits(fp32, [tokens])[0]
    assert torch.isfinite(low).all()
    assert (low - high).abs().max() <= 0.05 * high.abs().max(), (low - high).abs().max()
