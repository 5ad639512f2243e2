"""End-to-end `mgsr generate` and `mgsr eval`: the real command line in a subprocess (`python -m
mgsr_megatron ...`) on a tiny checkpoint and a tiny SentencePiece tokenizer built here; one process per
test. The expected tokens come from `generation.generate` on the same weights in this process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
NEW_TOKENS = 6
TEXT_PROMPTS = ["what is the capital of france", "sort the numbers 3 1 2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{root, tokenizer, checkpoint, model, model_cfg, tok}: a 2-layer llama saved as a checkpoint."""
    import torch

    from mgsr_megatron import parallel
    from mgsr_megatron.config import ModelConfig
    from mgsr_megatron.data.demo_corpus import build_demo_corpus
    from mgsr_megatron.data.tokenizer import load_tokenizer, train_sentencepiece
    from mgsr_megatron.models import build_model
    from mgsr_megatron.models.checkpoint import save_model

    root = tmp_path_factory.mktemp("cli")
    corpus = build_demo_corpus(n_train=120, n_eval=4)
    texts = [row["prompt"] for row in corpus.train] + [row["response"] for row in corpus.train] + TEXT_PROMPTS
    train_sentencepiece(texts, root / "tok.model", vocab_size=128)
    tok = load_tokenizer(root / "tok.model")
    model_cfg = ModelConfig(arch="llama", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, vocab_size=tok.vocab_size, make_vocab_size_divisible_by=64,
                            max_position_embeddings=64)
    parallel.init_distributed()
    parallel.initialize_model_parallel(1, 1, seed=7)
    model = build_model(model_cfg)
    with torch.no_grad():  # sharper than the random init: greedy answers then depend on the prompt
        model.output_layer.weight.mul_(8.0)
    save_model(model, root / "ckpt", copy.deepcopy(model_cfg))
    model.eval()
    return {"root": root, "tokenizer": root / "tok.model", "checkpoint": root / "ckpt", "model": model,
            "model_cfg": model_cfg, "tok": tok}


def _greedy(tiny, prompts: list[list[int]]) -> list[list[int]]:
    from mgsr_megatron.generation import SamplingOptions, generate

    out = generate(tiny["model"], prompts, SamplingOptions(max_new_tokens=NEW_TOKENS, eos_id=tiny["tok"].eos_id,
                                                           greedy=True), vocab_size=tiny["model_cfg"].vocab_size)
    return out.responses()


def _text(tiny, ids: list[int]) -> str:
    eos = tiny["tok"].eos_id
    return tiny["tok"].decode(ids[:ids.index(eos)] if eos in ids else ids)


def _mgsr(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgsr_megatron", *map(str, args)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _assert_one_line_error(result, *fragments) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("mgsr: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_generate_cli_greedy_writes_every_row(tiny):
    """Text and id prompts, greedy: the output JSONL keeps each input line's fields in input order and
    adds output_ids (the response, EOS included when produced) and output (its text without EOS)."""
    root, tok = tiny["root"], tiny["tok"]
    id_prompt = tok.encode("compare 5 and 7")
    rows = [{"prompt": TEXT_PROMPTS[0], "id": "a"}, {"prompt_ids": id_prompt, "id": "b"},
            {"prompt": TEXT_PROMPTS[1], "id": "c", "extra": [1, 2]}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a blank line too
    output = root / "out" / "generated.jsonl"
    result = _mgsr("generate", "--load", tiny["checkpoint"], "--tokenizer", tiny["tokenizer"],
                   "--prompts", root / "prompts.jsonl", "--output", output, "--greedy",
                   "--max-new-tokens", NEW_TOKENS, "--batch-size", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote 3 generations to {output}" in result.stdout
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k not in ("output_ids", "output")} for w in written] == rows
    # batches of 2 in the CLI, one batch here: greedy tokens do not depend on the batch
    expected = _greedy(tiny, [tok.encode(TEXT_PROMPTS[0]), id_prompt, tok.encode(TEXT_PROMPTS[1])])
    assert [w["output_ids"] for w in written] == expected
    assert all(1 <= len(ids) <= NEW_TOKENS for ids in expected)
    assert [w["output"] for w in written] == [_text(tiny, ids) for ids in expected]
    assert not output.with_name(output.name + ".partial").exists()


def test_eval_cli_greedy_scores_one_deterministic_run(tiny):
    """`mgsr eval --greedy`: one run whatever --seeds says; the references are the greedy answer for
    row 1 (ROUGE-L 100, exact match) and a phrase the model does not produce for row 2, so the means
    are fixed by hand: exact match 50, ROUGE-L (100 + ROUGE-L of row 2) / 2."""
    from mgsr_megatron.config import DataConfig
    from mgsr_megatron.data.indexed import PromptDataset
    from mgsr_megatron.evaluation.metrics import rouge_l

    root, tok = tiny["root"], tiny["tok"]
    prompts_only = root / "eval_prompts.jsonl"
    prompts_only.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TEXT_PROMPTS))
    # the CLI applies data.prompt_template (default config) to eval prompts: build the ids the same way
    items = PromptDataset.from_jsonl(prompts_only, tok, DataConfig())
    answers = [_text(tiny, ids) for ids in _greedy(tiny, [item.prompt_ids.tolist() for item in items])]
    wrong = "zebra quartz jolt"
    assert answers[0].strip() and answers[1].strip() != wrong, answers
    data = root / "eval.jsonl"
    data.write_text(json.dumps({"prompt": TEXT_PROMPTS[0], "response": answers[0]}) + "\n"
                    + json.dumps({"prompt": TEXT_PROMPTS[1], "response": wrong}) + "\n")
    results = root / "results.jsonl"
    result = _mgsr("eval", "--load", tiny["checkpoint"], "--tokenizer", tiny["tokenizer"], "--data", data,
                   "--greedy", "--seeds", 10, 20, 30, "--max-new-tokens", NEW_TOKENS, "--output", results)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, result.stdout[-3000:]
    metrics = json.loads(printed[0])
    assert metrics["greedy"] is True and metrics["seeds"] == 1
    assert metrics["exact_match"] == pytest.approx(50.0) and metrics["exact_match_std"] == 0.0
    assert metrics["rouge_l"] == pytest.approx((100.0 + rouge_l(answers[1], [wrong])) / 2)
    assert metrics["checkpoint"] == str(tiny["checkpoint"])
    assert results.read_text().splitlines() == printed  # --output appends the same line


@pytest.mark.parametrize("case", ["generate_bad_line", "generate_overlong", "eval_missing_data", "eval_overlong"])
def test_cli_bad_input_is_one_error_line(tiny, case):
    """Bad input: exit code 2, one `mgsr: error:` line naming it, no traceback (all before the model loads)."""
    root = tiny["root"]
    common = ["--load", tiny["checkpoint"], "--tokenizer", tiny["tokenizer"]]
    if case == "generate_bad_line":
        bad = root / "bad_prompts.jsonl"
        bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
        result = _mgsr("generate", *common, "--prompts", bad, "--output", root / "never.jsonl")
        _assert_one_line_error(result, f"{bad}:2", "missing field 'prompt'")
        assert not (root / "never.jsonl").exists()
    elif case == "generate_overlong":
        ok = root / "ok_prompts.jsonl"
        ok.write_text(json.dumps({"prompt_ids": [5] * 10}) + "\n")
        result = _mgsr("generate", *common, "--prompts", ok, "--output", root / "never.jsonl",
                       "--max-new-tokens", 60)
        _assert_one_line_error(result, f"{ok}:1", "10 tokens + --max-new-tokens 60 = 70 overflows", "54 or less")
    elif case == "eval_missing_data":
        result = _mgsr("eval", *common, "--data", root / "missing.jsonl", "--greedy")
        _assert_one_line_error(result, "data file not found", "missing.jsonl")
    else:
        result = _mgsr("eval", *common, "--data", root / "eval.jsonl", "--max-new-tokens", 100)
        _assert_one_line_error(result, "eval.jsonl: row 1", "--max-new-tokens 100", "overflows the model's 64")
