"""The trainer's diagnostics of generated responses (metrics.jsonl: gen_no_eos, gen_mean_len, gen_distinct_2)."""

from mgsr_megatron.training.trainer import generation_stats

EOS = 2


def test_generation_stats_by_hand():
    responses = [[5, 6, 5, 6, EOS],  # bigrams (5,6) (6,5) (5,6) (6,EOS): 3 distinct of 4
                 [7, 7, 7],  # cut at max_new_tokens: no EOS; bigrams (7,7) x2: 1 new distinct
                 [EOS]]  # an immediate EOS: no bigram
    stats = generation_stats(responses, EOS)
    assert stats["gen_no_eos"] == 1 / 3
    assert stats["gen_mean_len"] == 3.0
    assert stats["gen_distinct_2"] == 100.0 * 4 / 6


def test_generation_stats_empty_responses():
    stats = generation_stats([[], []], EOS)
    assert stats == {"gen_no_eos": 1.0, "gen_mean_len": 0.0, "gen_distinct_2": 0.0}
