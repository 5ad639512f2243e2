"""Command line: `mgsr {demo,train,eval,generate,plan,cache-teacher} ...`; identical under torchrun, srun and mpirun.

Config overrides are `--section.field=value` (or Megatron's `--tensor-model-parallel-size N`).
Bad input ends the program with one line `mgsr: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from mgsr_megatron.errors import UserError

EXIT_USER_ERROR = 2


def _train(args, overrides):
    from mgsr_megatron.config import load_config

    cfg = load_config(args.config, overrides)
    if args.resume is not None:
        cfg.checkpoint.resume = args.resume
    if args.deepspeed is not None:  # HF Trainer's convention: --deepspeed ds.json selects the engine
        cfg.deepspeed.enabled, cfg.deepspeed.config_json = True, args.deepspeed
    if cfg.deepspeed.enabled:
        from mgsr_megatron.deepspeed_engine.run import main
    else:
        from mgsr_megatron.training.run import main
    main(cfg)


def _generate(args, overrides):
    from mgsr_megatron.inference import generate_file

    generate_file(args, overrides)


def _eval(args, overrides):
    from mgsr_megatron.inference import evaluate_file

    evaluate_file(args, overrides)


def _demo(args, overrides):
    from mgsr_megatron.demo import run_demo

    run_demo(args, overrides)


def _plan(args, overrides):
    from mgsr_megatron.planner import run_plan

    run_plan(args, overrides)


def _cache_teacher(args, overrides):
    from mgsr_megatron import parallel
    from mgsr_megatron.config import load_config
    from mgsr_megatron.training.teacher_cache import write_cache

    cfg = load_config(args.config, overrides)
    manifest = write_cache(cfg, args.output, args.top_k, args.rows_per_shard)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"mgsr cache-teacher: {manifest['tokens']} tokens of {manifest['rows']} rows, top-{manifest['k']} "
              f"at temperature {manifest['temperature']} -> {args.output}")
    parallel.destroy()


def _add_model_source(parser):
    parser.add_argument("--load", required=True, help="checkpoint directory (converted, or a run's checkpoints/)")
    parser.add_argument("--tokenizer", help="tokenizer (default: the checkpoint's tokenizer/ or data.tokenizer)")
    parser.add_argument("--config", help="YAML config for parallel layout and data settings")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgsr", description="MGSR LLM distillation on Megatron-Core. Any further "
        "--section.field=value flag overrides the config (e.g. --student.num_layers=4); Megatron's "
        "--tensor-model-parallel-size / --pipeline-model-parallel-size are accepted too.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the embedded end-to-end demo (the main job)")
    demo.add_argument("--config", help="YAML overrides of the embedded demo config")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--nproc", type=int, default=2, help="local processes (data-parallel size)")
    demo.add_argument("--ablation", action="store_true", help="also train the component ablation")
    demo.add_argument("--students", nargs="+", metavar="NAME",
                      help="train only these students (names of the ablation table, e.g. sft_student "
                           "teacher_labels_sft mgsr_student; implies --ablation)")
    demo.add_argument("--quick", action="store_true", help="a short smoke version (tiny corpus, few steps)")
    demo.add_argument("--teacher-iters", type=int, help="teacher training steps")
    demo.add_argument("--student-iters", type=int, help="steps of every student (= --schedule.train_iters)")
    demo.add_argument("--eval-prompts", type=int, help="held-out evaluation prompts")
    demo.add_argument("--seeds", type=int, nargs="+", help="evaluation sampling seeds")
    demo.add_argument("--train-seeds", type=int, nargs="+",
                      help="training seeds of every student (default: 1 2); the report gives mean and spread")

    train = sub.add_parser("train", help="distill a student (MGSR) or train with SFT")
    train.add_argument("--config", required=True, help="YAML config file")
    train.add_argument("--resume", help="none | auto | a checkpoint directory (= --checkpoint.resume)")
    train.add_argument("--deepspeed", metavar="DS_JSON",
                       help="train Hugging Face models with the DeepSpeed engine, this DeepSpeed config "
                            "(= --deepspeed.enabled=true --deepspeed.config_json=DS_JSON)")

    generate = sub.add_parser("generate", help="generate responses for a JSONL file of prompts")
    _add_model_source(generate)
    generate.add_argument("--prompts", required=True, help="JSONL with 'prompt' (text) or 'prompt_ids' per line")
    generate.add_argument("--output", required=True, help="JSONL to write (each input line + output_ids/output)")
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--greedy", action="store_true")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--batch-size", type=int, default=16)

    evaluate = sub.add_parser("eval", help="ROUGE-L / exact match of a checkpoint on a JSONL evaluation set")
    _add_model_source(evaluate)
    evaluate.add_argument("--data", required=True, help="JSONL with prompts and reference responses")
    evaluate.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50])
    evaluate.add_argument("--max-new-tokens", type=int, default=256)
    evaluate.add_argument("--greedy", action="store_true",
                          help="greedy decoding (deterministic: one run, --seeds are not used)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--output", help="JSONL file to append the result to")

    cache = sub.add_parser("cache-teacher", help="write the teacher's top-K distributions of the ground-truth data "
                                                 "(for teacher.cache)")
    cache.add_argument("--config", required=True, help="YAML config (teacher.load, data, parallel layout, mgsr)")
    cache.add_argument("--output", required=True, help="cache directory to write (replaced atomically)")
    cache.add_argument("--top-k", type=int, help="candidates per token (default: max(mgsr.k_band, mgsr.k_feat))")
    cache.add_argument("--rows-per-shard", type=int, default=4096, help="dataset rows per shard file")

    plan = sub.add_parser("plan", help="per-GPU memory plan of a config on a cluster")
    plan.add_argument("--config", required=True)
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, required=True)
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0)
    plan.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                      help="cpu: plan CPU training processes (--gpus-per-node counts processes, "
                           "--gpu-memory-gib is one process's memory); adds the measured process runtime")
    return parser


COMMANDS = {"demo": _demo, "train": _train, "generate": _generate, "eval": _eval, "plan": _plan,
            "cache-teacher": _cache_teacher}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parser.parse_known_args(argv)
    args.argv = argv  # for commands that re-launch themselves under torchrun
    try:
        COMMANDS[args.command](args, overrides)
    except UserError as exc:
        print(f"mgsr: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
