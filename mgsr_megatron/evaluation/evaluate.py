"""Generate with a model over held-out prompts and score the answers, over several seeds.

Prompts are split over data-parallel replicas (row i on replica i % DP) and generated in batches; every
rank of a replica holds the same tokens, so scores are gathered over the DP group only.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import TYPE_CHECKING

import torch.distributed as dist

from mgsr_megatron.evaluation.metrics import distinct_n, exact_match, rouge_l

if TYPE_CHECKING:
    from mgsr_megatron.generation import SamplingOptions

PAPER_SEEDS = (10, 20, 30, 40, 50)


def _strip_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def generate_answers(model, prompt_ids: list[list[int]], tokenizer, options: SamplingOptions, *, vocab_size: int,
                     batch_size: int) -> list[str]:
    """Decoded answers, generated `batch_size` prompts at a time with `options` (a SamplingOptions whose
    seed is the evaluation seed; batch k starting at prompt `start` samples with seed*100003 + start)."""
    from mgsr_megatron.generation import generate

    answers = []
    for start in range(0, len(prompt_ids), batch_size):
        out = generate(model, prompt_ids[start:start + batch_size],
                       dataclasses.replace(options, seed=options.seed * 100_003 + start), vocab_size=vocab_size)
        answers += [tokenizer.decode(_strip_eos(ids, tokenizer.eos_id)) for ids in out.responses()]
    return answers


def evaluate(model, items, tokenizer, *, vocab_size: int, max_new_tokens: int, seeds=PAPER_SEEDS,
             batch_size: int = 32, greedy: bool = False) -> dict:
    """ROUGE-L and exact match (mean over seeds, with the spread), per task family too; distinct-2.

    `items`: a sequence of data.indexed.PromptItem (prompt_ids, references, family). Collective over
    the whole job; the result is identical on every rank.
    """
    from megatron.core import parallel_state

    from mgsr_megatron.generation import SamplingOptions

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = [i for i in range(len(items)) if i % dp_size == dp_rank]
    was_training = model.training
    per_seed = []
    for seed in (seeds if not greedy else seeds[:1]):
        options = SamplingOptions(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, greedy=greedy, seed=seed)
        answers = generate_answers(model, [items[i].prompt_ids.tolist() for i in mine], tokenizer, options,
                                   vocab_size=vocab_size, batch_size=batch_size)
        local = [(i, answer) for i, answer in zip(mine, answers)]
        gathered = [None] * dp_size
        dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group())
        per_seed.append(dict(pair for part in gathered for pair in part))
    model.train(was_training)
    return score(items, per_seed)


def score(items, per_seed: list[dict[int, str]]) -> dict:
    families = sorted({item.family for item in items})
    runs = []
    for answers in per_seed:
        rows = [(items[i].family, rouge_l(a, items[i].references), exact_match(a, items[i].references))
                for i, a in answers.items()]
        run = {"rouge_l": statistics.fmean(r[1] for r in rows), "exact_match": statistics.fmean(r[2] for r in rows),
               "distinct_2": distinct_n(list(answers.values()), 2)}
        for family in families:
            fam = [r for r in rows if r[0] == family]
            run[f"rouge_l/{family}"] = statistics.fmean(r[1] for r in fam)
            run[f"exact_match/{family}"] = statistics.fmean(r[2] for r in fam)
        runs.append(run)
    result = {key: statistics.fmean(run[key] for run in runs) for key in runs[0]}
    for key in ("rouge_l", "exact_match"):
        result[f"{key}_std"] = statistics.pstdev(run[key] for run in runs) if len(runs) > 1 else 0.0
    result["seeds"] = len(runs)
    result["examples"] = {}
    for i in sorted(per_seed[0]):
        result["examples"].setdefault(items[i].family, {"answer": per_seed[0][i], "reference": items[i].references[0]
                                                         if items[i].references else ""})
    return result
