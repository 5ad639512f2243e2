"""Generate with a model over held-out prompts and score the answers, over several seeds.

Prompts are generated in batches of consecutive prompts, batch k on data-parallel replica k % DP
(parallel.replica_blocks) and seeded by its first prompt's index, so the answers do not depend on the DP
size; every rank of a replica holds the same tokens, so answers are gathered over the DP group only.
The DP group is Megatron's, or the world where Megatron's parallel_state is not initialised (the DeepSpeed
engine: every rank a replica). Every replica takes part in the same number of generations: a replica with
one block fewer joins its peers' last generation idle (generator.finish_passes), which lockstep models
(ZeRO-3: generation/hf_stage.py HfCausalLM) need and which is a no-op for every other model.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import TYPE_CHECKING

from mgsr_megatron.evaluation.metrics import distinct_n, exact_match, rouge_l

if TYPE_CHECKING:
    from mgsr_megatron.generation import SamplingOptions

PAPER_SEEDS = (10, 20, 30, 40, 50)


def _strip_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def generate_answers(model, prompt_ids: list[list[int]], tokenizer, options: SamplingOptions, *, vocab_size: int,
                     first_index: int = 0) -> list[str]:
    """Decoded answers to one batch of prompts, the first of which is prompt `first_index` of the
    evaluation set; `options.seed` is the evaluation seed, the batch samples with seed*100003 + first_index."""
    from mgsr_megatron.generation import generate

    out = generate(model, prompt_ids, dataclasses.replace(options, seed=options.seed * 100_003 + first_index),
                   vocab_size=vocab_size)
    return [tokenizer.decode(_strip_eos(ids, tokenizer.eos_id)) for ids in out.responses()]


def evaluate(model, items, tokenizer, *, vocab_size: int, max_new_tokens: int, seeds=PAPER_SEEDS,
             batch_size: int = 32, greedy: bool = False) -> dict:
    """ROUGE-L and exact match (mean over seeds, with the spread), per task family too; distinct-2.

    `items`: a sequence of data.indexed.PromptItem (prompt_ids, references, family). Collective over
    the whole job; the result is identical on every rank.
    """
    from mgsr_megatron.generation import SamplingOptions

    options = [SamplingOptions(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, greedy=greedy, seed=seed)
               for seed in (seeds if not greedy else seeds[:1])]
    return score(items, answers_per_seed(model, items, tokenizer, options, vocab_size=vocab_size,
                                         batch_size=batch_size))


def answers_per_seed(model, items, tokenizer, options_per_seed: list[SamplingOptions], *, vocab_size: int,
                     batch_size: int) -> list[dict[int, str]]:
    """For each SamplingOptions (one per evaluation seed): {item index: decoded answer} over all items,
    the same on every rank and for every data-parallel size. Collective over the whole job; with a lockstep
    model (a GenerationModel, e.g. ZeRO-3 HfCausalLM) every rank runs the same number of forward passes."""
    from mgsr_megatron.generation.generator import finish_passes
    from mgsr_megatron.parallel import gather_over_replicas, replica_blocks

    was_training = model.training
    model.eval()  # also for idle passes (generate sets it for its own)
    per_seed = []
    for options in options_per_seed:
        local = []
        for block in replica_blocks(len(items), batch_size, pad=True):
            if not block:  # this replica's blocks are done: idle through its peers' generation (lockstep)
                finish_passes(model)
                continue
            answers = generate_answers(model, [items[i].prompt_ids.tolist() for i in block], tokenizer, options,
                                       vocab_size=vocab_size, first_index=block.start)
            local += zip(block, answers)
        per_seed.append(dict(gather_over_replicas(local)))
    model.train(was_training)
    return per_seed


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
