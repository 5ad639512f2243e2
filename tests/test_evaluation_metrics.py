import pytest

from mgsr_megatron.evaluation import distinct_n, exact_match, normalize_answer, rouge_l


def test_rouge_l_against_hand_computation():
    # LCS("the cat sat", "the cat was sitting") = "the cat" (2); with stemming "sat" != "sit":
    # P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    assert rouge_l("the cat sat", ["the cat was sitting"]) == pytest.approx(100 * 4 / 7)
    # max over references; punctuation and case do not matter to rouge-score's tokenizer
    assert rouge_l("The cat sat.", ["dog", "the cat sat"]) == pytest.approx(100.0)
    # stemming: "jumps" and "jumping" share the stem "jump"
    assert rouge_l("fox jumps", ["fox jumping"]) == pytest.approx(100.0)
    assert rouge_l("anything", []) == 0.0


def test_exact_match_normalisation():
    assert normalize_answer("  The  Answer, is 42! ") == "the answer is 42"
    assert exact_match("52 is larger.", ["52 IS LARGER"]) == 100.0
    assert exact_match("a 52", ["52"]) == 0.0  # articles are kept


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(50.0)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(50.0)
    assert distinct_n([""], 2) == 0.0
