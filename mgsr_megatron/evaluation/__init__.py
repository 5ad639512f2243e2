"""Evaluation by the paper's protocol (method.md §5): ROUGE-L, exact match, distinct-n over seeds."""

from mgsr_megatron.evaluation.metrics import distinct_n, exact_match, normalize_answer, rouge_l

__all__ = ["distinct_n", "exact_match", "normalize_answer", "rouge_l"]
