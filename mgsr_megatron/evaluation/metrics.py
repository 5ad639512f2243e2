"""Text metrics. ROUGE-L follows MiniLLM/DistiLLM: `rouge_score`'s RougeScorer(["rougeL"], use_stemmer=True)
on the raw strings (its tokenizer lower-cases and drops punctuation), max over references, x100."""

from __future__ import annotations

import re
import string
from functools import lru_cache


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    """Max ROUGE-L F-measure over the references, x100 (0 when there is no reference)."""
    if not references:
        return 0.0
    return 100.0 * max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def normalize_answer(text: str) -> str:
    """Lower-case, ASCII punctuation removed, whitespace collapsed (articles kept)."""
    return " ".join(_PUNCT.sub("", text.lower()).split())


def exact_match(prediction: str, references: list[str]) -> float:
    pred = normalize_answer(prediction)
    return 100.0 * any(pred == normalize_answer(ref) for ref in references)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over a set of generations (whitespace tokens), x100."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0
