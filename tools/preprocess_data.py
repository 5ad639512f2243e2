"""Tokenize instruction JSONL into Megatron-Core indexed files with prompt/response boundaries and span priors.

    python tools/preprocess_data.py --input train.jsonl --output-prefix data/demo --tokenizer tok.model \
        [--config config.yaml] [--format auto] [--span-extractor phrase] [--valid-fraction 0.05] \
        [--workers 2] [--skip-bad-lines] [--prompts-only]

Writes <prefix>.train.* and <prefix>.valid.* (layout: mgsr_megatron/data/indexed.py) and prints the
counts and the throughput in tokens/s. Settings default to the `data` section of --config (if given),
then to the built-in defaults; flags override both. Restartable: re-running after an interruption
re-uses the chunks that were finished.
"""

from __future__ import annotations

import argparse
import sys

from mgsr_megatron.errors import UserError

# flag -> DataConfig field
FLAGS = {"format": str, "prompt_template": str, "max_prompt_length": int, "max_length": int,
         "overlong_policy": str, "span_extractor": str, "valid_fraction": float, "split_seed": int}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer", help="SentencePiece .model or HF tokenizer directory (default: data.tokenizer)")
    parser.add_argument("--config", help="YAML config whose `data` section gives the defaults")
    for name, kind in FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    parser.add_argument("--skip-bad-lines", action="store_true", help="count and skip bad lines (default: stop)")
    parser.add_argument("--prompts-only", action="store_true", help="rows may lack a response (prompt datasets)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=1000)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from mgsr_megatron.config import load_config
    from mgsr_megatron.data.preprocess import PreprocessOptions, preprocess

    try:
        cfg = load_config(args.config).data
        for name in FLAGS:
            value = getattr(args, name)
            if value is not None:
                setattr(cfg, name, value)
        if args.skip_bad_lines:
            cfg.skip_bad_lines = True
        tokenizer = args.tokenizer or cfg.tokenizer
        stats = preprocess(args.input, args.output_prefix, tokenizer, cfg, prompts_only=args.prompts_only,
                           options=PreprocessOptions(workers=args.workers, chunk_rows=args.chunk_rows,
                                                     progress=not args.no_progress))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(stats.summary())
    print(f"throughput: {stats.tokens_per_second:,.0f} tokens/s with {args.workers} workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
