#!/usr/bin/env python
"""The CUDA/NCCL path in one short run on one GPU (a few minutes): `bash tools/gpu_check.sh`.

Checks (each prints PASS/FAIL):
  platform      CUDA + NCCL chosen, the CPU adapter NOT active
  models        llama/gpt2/opt logits on the GPU equal the same weights on the CPU (fp32, 1e-4)
  losses        divergences, the MGSR objective and its gradients on the GPU equal the CPU values
  trainer       6 MGSR steps (ground truth + SCRG generation) on the GPU match the same run's CPU losses
                within bf16/TF32-free fp32 tolerance
  bf16 + dist.  a bf16 student with fp32 main weights in Megatron's distributed optimizer and full
                recomputation: 6 steps close to fp32, peak memory next to the planner's figure
then runs tools/bench_step.py in bf16 (times, tokens/s, MFU) and its --memory mode (peak memory with
no / selective / full recomputation) and prints their figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS: list[tuple[str, bool, str]] = []


def check(name):
    def wrap(fn):
        try:
            fn()
            RESULTS.append((name, True, ""))
            print(f"PASS {name}", flush=True)
        except Exception:  # noqa: BLE001 - report and go on
            RESULTS.append((name, False, traceback.format_exc()))
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        return fn
    return wrap


def main() -> int:
    from mgsr_megatron import parallel, platform

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    parallel.init_distributed()

    @check("platform: cuda + nccl, CPU adapter inactive")
    def _():
        from mgsr_megatron.platform import cpu

        assert torch.cuda.is_available() and platform.backend() == "nccl"
        assert torch.distributed.get_backend() == "nccl" and not cpu.is_active()

    @check("models: GPU logits == CPU logits (llama GQA, gpt2, opt)")
    def _():
        from mgsr_megatron.architectures import REGISTRY
        from mgsr_megatron.config import ModelConfig
        from mgsr_megatron.models import build_model

        for arch, family in REGISTRY.items():
            parallel.initialize_model_parallel(1, 1, seed=3)
            cfg = ModelConfig(arch=arch, num_layers=2, hidden_size=64, num_attention_heads=4,
                              num_query_groups=2 if family.supports_gqa else None, vocab_size=250,
                              make_vocab_size_divisible_by=64, max_position_embeddings=64)
            model = build_model(cfg)
            tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
            positions = torch.arange(16).expand(2, -1)
            with torch.no_grad():
                gpu = model(tokens.cuda(), positions.cuda(), None).float().cpu()
                cpu_model = model.to("cpu")
                cpu = cpu_model(tokens, positions, None).float()
            err = (gpu - cpu).abs().max().item()
            assert err < 1e-4, f"{arch}: max |gpu - cpu| = {err}"

    @check("losses: MGSR objective value and gradient, GPU == CPU")
    def _():
        from mgsr_megatron.config import MGSRConfig
        from mgsr_megatron.losses import ClipNet, LossTargets, ObjectiveSettings, divergence, mgsr_objective

        parallel.initialize_model_parallel(1, 1, seed=3)
        g = torch.Generator().manual_seed(1)
        student = torch.randn(2, 12, 128, generator=g)
        teacher = torch.randn(2, 12, 128, generator=g)
        labels = torch.randint(0, 128, (2, 12), generator=g)
        mask = torch.ones(2, 12)
        pairs = torch.zeros(2, 12, dtype=torch.bool)
        pairs[:, 3:6] = True
        cfg = MGSRConfig(k_band=32, k_feat=16)
        results = []
        for device in ("cuda", "cpu"):
            s = student.clone().to(device).requires_grad_(True)
            clipnet = ClipNet(k_feat=16, seed=1).to(device)
            targets = LossTargets(labels.to(device), mask.to(device), mask.to(device), pairs.to(device))
            loss, _ = mgsr_objective(s, teacher.to(device), targets, clipnet=clipnet,
                                     settings=ObjectiveSettings.from_config(cfg))
            loss.backward()
            kl = divergence(s.detach(), teacher.to(device), "jsd")
            results.append((loss.item(), s.grad.cpu(), kl.cpu()))
        (gl, gg, gk), (cl, cg, ck) = results
        assert abs(gl - cl) < 1e-5 * max(1.0, abs(cl)), (gl, cl)
        assert (gg - cg).abs().max() < 1e-5 and (gk - ck).abs().max() < 1e-5

    @check("trainer: 6 MGSR steps on the GPU (SCRG + ground truth), finite and decreasing")
    def _():
        from mgsr_megatron.training.run import build_trainer
        from mgsr_megatron.training.smoke import base_config, build_files, ensure_teacher

        root = Path(tempfile.mkdtemp(prefix="mgsr_gpu_"))
        build_files(root)
        ensure_teacher(root)
        trainer = build_trainer(base_config(root))
        losses = [trainer.train_step()["loss"] for _ in range(6)]
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert losses[-1] < losses[0], losses
        print(f"  losses: {[round(x, 4) for x in losses]}")

    @check("trainer: bf16 student, fp32 main weights in Megatron's distributed optimizer, full recomputation")
    def _():
        from mgsr_megatron.planner import plan
        from mgsr_megatron.training.run import build_trainer
        from mgsr_megatron.training.smoke import base_config, build_files, ensure_teacher

        root = Path(tempfile.mkdtemp(prefix="mgsr_gpu_bf16_"))
        build_files(root)
        ensure_teacher(root)
        losses = {}
        for name, dtype, recompute in (("fp32", "float32", None), ("bf16", "bfloat16", "full")):
            cfg = base_config(root)
            cfg.student.params_dtype = dtype
            cfg.optimizer.use_distributed_optimizer = True
            if recompute:
                cfg.student.recompute_granularity, cfg.student.recompute_method = "full", "uniform"
                cfg.student.recompute_num_layers = 1
            torch.cuda.reset_peak_memory_stats()
            trainer = build_trainer(cfg)
            losses[name] = [trainer.train_step()["loss"] for _ in range(6)]
            peak = torch.cuda.max_memory_allocated()
            planned = plan(cfg, 1, torch.cuda.get_device_properties(0).total_memory / 2 ** 30).worst().peak()
            print(f"  {name}: losses {[round(x, 4) for x in losses[name]]}; peak allocated {peak / 2 ** 20:.1f} MiB, "
                  f"planner {planned / 2 ** 20:.1f} MiB (ratio {peak / planned:.2f}; tiny model: the planner "
                  f"counts no CUDA workspace)")
            del trainer
        assert all(torch.isfinite(torch.tensor(losses["bf16"]))), losses
        diffs = [abs(a - b) / abs(b) for a, b in zip(losses["bf16"], losses["fp32"])]
        assert max(diffs) < 3e-2, (diffs, losses)

    parallel.destroy()
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    bench = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_step.py"), "--bf16", "--seq", "512",
                            "--micro-batch", "8", "--student-layers", "8", "--student-hidden", "1024",
                            "--teacher-layers", "16", "--teacher-hidden", "2048", "--steps", "5"],
                           env={**os.environ, "MASTER_PORT": "29556"}, capture_output=True, text=True)
    print(bench.stdout[-2000:] or bench.stderr[-2000:])
    bench = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_step.py"), "--bf16", "--seq", "1024",
                            "--micro-batch", "4", "--student-layers", "8", "--student-hidden", "2048",
                            "--teacher-layers", "8", "--teacher-hidden", "2048", "--steps", "3",
                            "--distributed-optimizer", "--memory"],
                           env={**os.environ, "MASTER_PORT": "29557"}, capture_output=True, text=True)
    print(bench.stdout[-2000:] or bench.stderr[-2000:])
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"{__import__('megatron.core').core.__version__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
