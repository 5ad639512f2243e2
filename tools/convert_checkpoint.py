"""Convert checkpoints between Hugging Face and this project's Megatron format (any TP/PP).

    python tools/convert_checkpoint.py import --hf-path HF_DIR --megatron-path OUT_DIR [--tp N --pp M --dtype D]
    python tools/convert_checkpoint.py export --megatron-path CKPT_DIR --hf-path OUT_DIR [--dtype D]

Supported: LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (no sliding window),
GPT2LMHeadModel, OPTForCausalLM (pre-LN). See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

DTYPE_HELP = "fp32 | bf16 | fp16"


def build_parser() -> argparse.ArgumentParser:
    from mgsr_megatron.architectures import hf_architectures  # the family registry (no torch)

    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Supported HF architectures: {', '.join(hf_architectures())}.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{import,export}")

    imp = commands.add_parser("import", help="Hugging Face directory -> Megatron checkpoint directory",
                              description="Read config.json + safetensors (single or sharded; pytorch_model.bin "
                                          "with weights_only=True) and write DIR/model_config.yaml, DIR/model/ "
                                          "(torch_dist, loadable at any TP/PP), DIR/tokenizer/.")
    imp.add_argument("--hf-path", required=True, help="Hugging Face model directory (config.json + weights)")
    imp.add_argument("--megatron-path", required=True, help="output checkpoint directory (created)")
    imp.add_argument("--tp", type=int, default=1, help="target tensor-parallel size, checked against heads, "
                     "query groups, FFN and padded vocabulary (the checkpoint loads at any TP) [1]")
    imp.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size, must divide the layers [1]")
    imp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                     help=f"stored parameter dtype, {DTYPE_HELP} [config.json's torch_dtype, else fp32]")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary to a multiple of this (TP-independent padding) [128]")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")

    exp = commands.add_parser("export", help="Megatron checkpoint directory -> Hugging Face directory",
                              description="Read a converted or training checkpoint (any TP/PP; a run's "
                                          "checkpoints directory follows 'latest') and write config.json, "
                                          "sharded safetensors and the tokenizer files.")
    exp.add_argument("--megatron-path", required=True, help="checkpoint directory, or a run's checkpoints directory")
    exp.add_argument("--hf-path", required=True, help="output Hugging Face directory (created)")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                     help=f"stored dtype, {DTYPE_HELP} [the checkpoint's params_dtype]")
    exp.add_argument("--tokenizer", help="directory whose tokenizer files to copy [CKPT_DIR/tokenizer if present]")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    exp.add_argument("--verify-checkpoint", action="store_true",
                     help="check the SHA-256 of every file read against the checkpoint's manifest.json")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mgsr_megatron.conversion import export_hf, import_hf
    from mgsr_megatron.errors import UserError

    try:
        if args.command == "import":
            cfg = import_hf(args.hf_path, args.megatron_path, tp=args.tp, pp=args.pp, dtype=args.dtype,
                            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                            overwrite=args.overwrite, progress=not args.no_progress)
            print(f"wrote {args.megatron_path} (arch={cfg.arch}, layers={cfg.num_layers}, "
                  f"hidden={cfg.hidden_size}, dtype={cfg.params_dtype})")
        else:
            export_hf(args.megatron_path, args.hf_path, dtype=args.dtype, overwrite=args.overwrite,
                      tokenizer=args.tokenizer, progress=not args.no_progress, verify=args.verify_checkpoint)
            print(f"wrote {args.hf_path}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # the torch_dist writer re-imports __main__: keep all work under this guard
    sys.exit(main())
