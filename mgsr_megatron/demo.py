"""`mgsr demo`: the main job on the embedded default.

Current stage (foundation): builds the tiny teacher and student under TP=2 with two local processes
and runs one parallel forward of each, checking the vocab-parallel logits against the gathered
single-process computation. The trainer turns this into the full MGSR pipeline.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from mgsr_megatron.config import Config, ModelConfig, load_config


def default_config() -> Config:
    cfg = Config()
    cfg.teacher = ModelConfig(arch="llama", num_layers=4, hidden_size=256, num_attention_heads=4,
                              vocab_size=512, max_position_embeddings=128)
    cfg.student = ModelConfig(arch="llama", num_layers=2, hidden_size=128, num_attention_heads=4,
                              vocab_size=512, max_position_embeddings=128)
    cfg.parallel.tensor_model_parallel_size = 2
    return cfg


def run_demo(args, overrides: list[str]) -> None:
    from mgsr_megatron import launch

    if not launch.already_distributed() and args.nproc > 1:
        sys.exit(launch.relaunch_local(args.nproc, args.argv))
    cfg = load_config(args.config, overrides) if args.config else default_config()
    if overrides and not args.config:
        from mgsr_megatron.config import apply_dict, parse_overrides

        apply_dict(cfg, parse_overrides(overrides), "command line")
    _forward_demo(cfg, Path(args.output_dir))


def _forward_demo(cfg: Config, output_dir: Path) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mgsr_megatron import parallel
    from mgsr_megatron.models import build_model, build_teacher, mask_padded_logits
    from mgsr_megatron.models.pipeline import forward_logits

    start = time.time()
    parallel.init_distributed()
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    parallel.initialize_model_parallel(tp, pp, cfg.parallel.seed,
                                       models={"teacher": cfg.teacher, "student": cfg.student})
    rank = dist.get_rank()
    report = {"world_size": dist.get_world_size(), "tp": tp, "pp": pp}
    tokens = torch.randint(0, cfg.student.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for name, model_cfg, builder in (("teacher", cfg.teacher, build_teacher), ("student", cfg.student, build_model)):
        model = builder(model_cfg)
        params = torch.tensor(sum(p.numel() for p in model.parameters()), dtype=torch.long)
        dist.all_reduce(params, group=parallel_state.get_model_parallel_group())
        outputs = forward_logits(model, [tokens])
        entry = {"params": int(params)}
        if outputs is not None:
            logits = mask_padded_logits(outputs[0], model_cfg.vocab_size,
                                        parallel_state.get_tensor_model_parallel_rank())
            entry["logits_shard_shape"] = list(logits.shape)
            entry["mean_logit_local"] = float(logits[torch.isfinite(logits)].mean())
        report[name] = entry
    report["seconds"] = round(time.time() - start, 2)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "demo_report.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        print(f"wrote {output_dir / 'demo_report.json'}")
    parallel.destroy()
