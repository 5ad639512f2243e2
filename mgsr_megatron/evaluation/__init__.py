"""Evaluation by the paper's protocol (method.md §5): ROUGE-L, exact match, distinct-n over seeds.

Public:
  rouge_l, exact_match, normalize_answer, distinct_n   metrics.py (re-exported here)
  evaluate.evaluate                                    generate over held-out prompts and score, per seed
"""

from mgsr_megatron.evaluation.metrics import distinct_n, exact_match, normalize_answer, rouge_l

__all__ = ["distinct_n", "exact_match", "normalize_answer", "rouge_l"]
