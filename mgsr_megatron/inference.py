"""`mgsr generate` and `mgsr eval`: a checkpoint at any TP/PP, prompts from JSONL, results to JSONL.

    mgsr generate --load CKPT --prompts IN.jsonl --output OUT.jsonl [--greedy | --temperature T --top-p P
                  --seed S] --max-new-tokens N [--tensor-model-parallel-size 2]
    mgsr eval --load CKPT --data EVAL.jsonl [--seeds 10 20 30 40 50 | --greedy] [--output RESULTS.jsonl]

Input lines hold `prompt` (text; the data.prompt_template is NOT applied: the text is the prompt,
encoded as the tokenizer encodes prompts, with its BOS if it adds one) or `prompt_ids` (token ids, which
need no tokenizer). Output lines are the input lines plus `output_ids` and `output` (text, when
a tokenizer is known). Rows are split over data-parallel replicas and written by rank 0 in input order.
`mgsr eval` needs a reference (a response or `references`) on every row and prints one JSON line
(ROUGE-L / exact match: mean and spread over the seeds, per task family, distinct-2, `seeds`, `greedy`,
`examples`) and appends it to --output; `--greedy` decodes greedily, once (the seeds are not used).
Bad input (the input file, a prompt that does not fit the model's context or vocabulary, a tokenizer
other than the checkpoint's) is reported before the model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.distributed as dist

from mgsr_megatron import parallel
from mgsr_megatron.config import load_config, validate
from mgsr_megatron.errors import UserError


def prepare_inference(args, overrides):
    """(cfg, checkpoint directory, model_cfg, tokenizer or None): everything but the model, so that
    bad input (config, checkpoint metadata, tokenizer, the input file) is reported before it loads.
    The tokenizer is --tokenizer, else the checkpoint's tokenizer/ (when it holds one), else
    data.tokenizer; one whose hash differs from the checkpoint's recorded one is refused."""
    from mgsr_megatron.data.tokenizer import has_tokenizer_files, load_tokenizer
    from mgsr_megatron.models.checkpoint import (
        TOKENIZER_DIR,
        check_tokenizer_hash,
        read_model_config,
        resolve_checkpoint,
    )

    cfg = validate(load_config(args.config, overrides))
    directory = resolve_checkpoint(args.load)
    model_cfg = read_model_config(directory)
    own = directory / TOKENIZER_DIR
    tokenizer_path = args.tokenizer or (own if has_tokenizer_files(own) else cfg.data.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    check_tokenizer_hash(directory, tokenizer, "--load")
    return cfg, directory, model_cfg, tokenizer


def load_inference_model(cfg, directory, model_cfg):
    """The checkpoint's model at the configured layout (collective: starts the process group)."""
    from mgsr_megatron.models import build_model
    from mgsr_megatron.models.checkpoint import load_model

    parallel.init_distributed()
    parallel.initialize_model_parallel(cfg.parallel.tensor_model_parallel_size,
                                       cfg.parallel.pipeline_model_parallel_size, cfg.parallel.seed,
                                       {"model": model_cfg})
    model = build_model(model_cfg)
    load_model(model, directory, verify=cfg.checkpoint.verify)
    model.eval()
    return model


def load_for_inference(args, overrides):
    """(cfg, model, model_cfg, tokenizer or None) with the model loaded at the configured layout."""
    cfg, directory, model_cfg, tokenizer = prepare_inference(args, overrides)
    return cfg, load_inference_model(cfg, directory, model_cfg), model_cfg, tokenizer


def check_prompts(prompts: list[list[int]], model_cfg, max_new_tokens: int, where) -> None:
    """The generator's own limits (generation.generator.check_request), checked on every prompt before
    the model is loaded: ids in the vocabulary, prompt + max_new_tokens within the context.
    `where(i)` names prompt i (file:line)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    limit, vocab = model_cfg.max_position_embeddings, model_cfg.vocab_size
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UserError(f"{where(i)}: token id {bad[0]} outside the model's vocabulary [0, {vocab})")
        if len(ids) + max_new_tokens > limit:
            raise UserError(f"{where(i)}: prompt of {len(ids)} tokens + --max-new-tokens {max_new_tokens} = "
                            f"{len(ids) + max_new_tokens} overflows the model's {limit} positions "
                            f"(max_position_embeddings); lower --max-new-tokens to {limit - len(ids)} or less")


def read_prompt_file(path: str | Path, tokenizer) -> tuple[list[dict], list[list[int]], list[int]]:
    """(input rows, prompt ids, line number of each row)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    from mgsr_megatron.data.formats import iter_json_objects

    rows, prompts, numbers = [], [], []
    for number, row in iter_json_objects(path):
        if "prompt_ids" in row:
            ids = row["prompt_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise UserError(f"{path}:{number}: 'prompt_ids' must be a list of integers")
        elif "prompt" in row:
            if tokenizer is None:
                raise UserError(f"{path}:{number}: text 'prompt' needs a tokenizer (--tokenizer)")
            if not isinstance(row["prompt"], str):
                raise UserError(f"{path}:{number}: 'prompt' must be a string")
            ids = tokenizer.encode_prompt(row["prompt"])
        else:
            raise UserError(f"{path}:{number}: missing field 'prompt' (text) or 'prompt_ids'")
        if not ids:
            raise UserError(f"{path}:{number}: empty prompt")
        rows.append(row)
        prompts.append(ids)
        numbers.append(number)
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows, prompts, numbers


def generate_file(args, overrides) -> None:
    from mgsr_megatron.generation import SamplingOptions, generate

    cfg, directory, model_cfg, tokenizer = prepare_inference(args, overrides)
    rows, prompts, numbers = read_prompt_file(args.prompts, tokenizer)
    check_prompts(prompts, model_cfg, args.max_new_tokens, lambda i: f"{args.prompts}:{numbers[i]}")
    model = load_inference_model(cfg, directory, model_cfg)
    eos_id = tokenizer.eos_id if tokenizer is not None else model_cfg.vocab_size - 1
    options = SamplingOptions(max_new_tokens=args.max_new_tokens, eos_id=eos_id, greedy=args.greedy,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    results = []
    for block in parallel.replica_blocks(len(rows), args.batch_size):  # answers independent of the DP size
        out = generate(model, [prompts[i] for i in block],
                       dataclasses.replace(options, seed=args.seed * 1_000_003 + block.start),
                       vocab_size=model_cfg.vocab_size)
        results += zip(block, out.responses())
    results = dict(parallel.gather_over_replicas(results))
    if dist.get_rank() == 0:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".partial")
        with open(tmp, "w", encoding="utf-8") as stream:
            for i, row in enumerate(rows):
                ids = results[i]
                record = {**row, "output_ids": ids}
                if tokenizer is not None:
                    record["output"] = tokenizer.decode([t for t in ids if t != eos_id])
                stream.write(json.dumps(record) + "\n")
        tmp.replace(output)
        print(f"wrote {len(rows)} generations to {output}")
    parallel.destroy()


def evaluate_file(args, overrides) -> None:
    from mgsr_megatron.data.indexed import PromptDataset
    from mgsr_megatron.evaluation.evaluate import evaluate

    cfg, directory, model_cfg, tokenizer = prepare_inference(args, overrides)
    if tokenizer is None:
        raise UserError("evaluation needs a tokenizer (--tokenizer, data.tokenizer or CKPT/tokenizer/)")
    items = PromptDataset.from_jsonl(args.data, tokenizer, cfg.data)
    if len(items) == 0:
        raise UserError(f"{args.data}: no evaluation rows")
    unscored = next((item for item in items if not item.references), None)
    if unscored is not None:  # it would score 0 and pull the mean down without a word
        raise UserError(f"{unscored.source}: no reference answer to score against (give the row a response "
                        f"or 'references')")
    check_prompts([item.prompt_ids.tolist() for item in items], model_cfg, args.max_new_tokens,
                  lambda i: f"{args.data}: row {i + 1} ({items[i].prompt[:40]!r})")
    model = load_inference_model(cfg, directory, model_cfg)
    # greedy decoding is deterministic: one run (the first seed) instead of one per seed
    result = evaluate(model, items, tokenizer, vocab_size=model_cfg.vocab_size, max_new_tokens=args.max_new_tokens,
                      seeds=tuple(args.seeds), batch_size=args.batch_size, greedy=args.greedy)
    result["greedy"] = bool(args.greedy)
    result["checkpoint"] = str(args.load)
    if dist.get_rank() == 0:
        line = json.dumps(result)
        print(line)
        if args.output:
            with open(args.output, "a", encoding="utf-8") as stream:
                stream.write(line + "\n")
    parallel.destroy()
