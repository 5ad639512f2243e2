"""Command line: `mgsr {demo,train,eval,generate,plan} ...`; identical under torchrun, srun, mpirun.

Config overrides are `--section.field=value` (or Megatron's `--tensor-model-parallel-size N`).
Bad input ends the program with one line `mgsr: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from mgsr_megatron.errors import UserError

EXIT_USER_ERROR = 2


def _demo(args, overrides):
    from mgsr_megatron.demo import run_demo

    run_demo(args, overrides)


COMMANDS = {
    "demo": (_demo, "run the embedded end-to-end demo (the main job)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgsr", description="MGSR LLM distillation on Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=COMMANDS["demo"][1])
    demo.add_argument("--config", help="YAML config (default: the embedded tiny config)")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--nproc", type=int, default=2, help="local processes (tensor parallel size)")
    demo.add_argument("--ablation", action="store_true", help="also train the component ablation")
    demo.add_argument("--quick", action="store_true", help="a 1-minute smoke version (tiny corpus, few steps)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parser.parse_known_args(argv)
    args.argv = argv  # for commands that re-launch themselves under torchrun
    try:
        COMMANDS[args.command][0](args, overrides)
    except UserError as exc:
        print(f"mgsr: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
