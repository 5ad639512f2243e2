"""Train a SentencePiece tokenizer on a text or JSONL corpus.

    python tools/train_tokenizer.py --input train.jsonl [more.txt ...] --output tok.model --vocab-size 512

Text files: one sentence per line. JSONL files: every string value of the known instruction fields
(prompt, response, instruction, input, context, output, messages[].content) is a sentence.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mgsr_megatron.errors import UserError

TEXT_FIELDS = ("prompt", "response", "instruction", "input", "context", "output")


def corpus_sentences(paths):
    from mgsr_megatron.data.formats import iter_json_objects

    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"corpus file not found: {path}")
        if path.suffix != ".jsonl":
            with open(path, encoding="utf-8", errors="strict") as stream:
                yield from (line.rstrip("\n") for line in stream if line.strip())
            continue
        for _, row in iter_json_objects(path):
            for name in TEXT_FIELDS:
                if isinstance(row.get(name), str) and row[name].strip():
                    yield row[name]
            for message in row.get("messages", []) or []:
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    yield message["content"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="text (.txt) or JSONL (.jsonl) files")
    parser.add_argument("--output", required=True, help="the .model file to write")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    parser.add_argument("--no-split-digits", action="store_true", help="let digits merge into multi-digit pieces")
    args = parser.parse_args(argv)
    from mgsr_megatron.data.tokenizer import load_tokenizer, train_sentencepiece

    try:
        start = time.perf_counter()
        sentences = list(corpus_sentences(args.input))
        if not sentences:
            raise UserError(f"no text found in {', '.join(args.input)}")
        train_sentencepiece(sentences, args.output, args.vocab_size, args.model_type,
                            split_digits=not args.no_split_digits)
        tokenizer = load_tokenizer(args.output)
    except (UserError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: vocab_size {tokenizer.vocab_size}, hash {tokenizer.vocab_hash()}, "
          f"{len(sentences)} sentences in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
