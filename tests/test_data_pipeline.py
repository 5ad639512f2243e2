"""Preprocessing to Megatron indexed files, reading back, collate masks, the DP sampler, the demo corpus."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from mgsr_megatron.config import DataConfig
from mgsr_megatron.data import preprocess as preprocess_module
from mgsr_megatron.data.collate import collate, collate_prompts
from mgsr_megatron.data.demo_corpus import (
    DEMO_PROMPT_TEMPLATE,
    FAMILIES,
    GENERATORS,
    build_demo_corpus,
    write_demo_corpus,
)
from mgsr_megatron.data.indexed import InstructionDataset, PromptDataset, Sample
from mgsr_megatron.data.preprocess import PreprocessOptions, preprocess
from mgsr_megatron.data.sampler import DistributedResumableSampler
from mgsr_megatron.data.spans import get_span_extractor
from mgsr_megatron.data.tokenizer import load_tokenizer, train_sentencepiece
from mgsr_megatron.errors import UserError

QUIET = PreprocessOptions(workers=1, progress=False)
ROWS = [{"prompt": f"what is {a} + {b}", "response": f"the sum of {a} and {b} is {a + b}", "family": "add"}
        for a in range(7) for b in range(6)] + \
       [{"instruction": "sort these", "input": " ".join(map(str, v)), "output": " ".join(map(str, sorted(v)))}
        for v in ([3, 1, 2], [9, 4, 7, 5], [8, 6])]


def cfg(**overrides):
    settings = dict(prompt_template="{instruction}\n{input}\n", valid_fraction=0.2, max_length=64)
    return DataConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    texts = [r.get("prompt", "") + " " + r.get("response", r.get("output", "")) for r in ROWS] * 5
    train_sentencepiece(texts, root / "tok.model", vocab_size=60)
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    stats = preprocess([corpus / "rows.jsonl"], out, corpus / "tok.model", cfg(),
                       options=PreprocessOptions(workers=1, chunk_rows=10, progress=False))
    return out, stats


def expected_samples(corpus, split, config):
    """Independent reference: tokenize every row directly, in file order, for the rows of `split`."""
    tok = load_tokenizer(corpus / "tok.model")
    extractor = get_span_extractor("phrase")
    out = []
    for line_number, row in enumerate(ROWS, start=1):
        is_valid = preprocess_module.is_valid_row(config.split_seed, 0, line_number, config.valid_fraction)
        if is_valid != (split == "valid"):
            continue
        if "prompt" in row:
            prompt, response = row["prompt"] + "\n", row["response"]
        else:
            prompt, response = f"{row['instruction']}\n{row['input']}\n", row["output"]
        ids, offsets = tok.encode_with_offsets(response)
        out.append((tok.encode(prompt), ids + [tok.eos_id], extractor(response, offsets)))
    return out


def test_indexed_files_round_trip(corpus, prepared):
    prefix, stats = prepared
    tok = load_tokenizer(corpus / "tok.model")
    assert stats.rows == len(ROWS) and stats.samples["train"] + stats.samples["valid"] == len(ROWS)
    assert stats.samples["valid"] > 0 and stats.tokens > 0
    for split in ("train", "valid"):
        dataset = InstructionDataset(f"{prefix}.{split}", tok)
        expected = expected_samples(corpus, split, cfg())
        assert len(dataset) == len(expected) == stats.samples[split]
        for i, (prompt_ids, response_ids, spans) in enumerate(expected):
            sample = dataset[i]
            assert sample.prompt_ids.tolist() == prompt_ids and sample.response_ids.tolist() == response_ids
            assert sample.spans == spans
        assert any(dataset[i].spans for i in range(len(dataset)))
    # the data are Megatron's own indexed files: its reader sees prompt and response as one document
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    raw = IndexedDataset(f"{prefix}.train")
    assert raw.document_indices.tolist() == list(range(0, 2 * len(expected_samples(corpus, "train", cfg())) + 1, 2))


def test_workers_and_chunking_do_not_change_output(corpus, prepared, tmp_path):
    prefix, _ = prepared
    other = tmp_path / "two_workers"
    preprocess([corpus / "rows.jsonl"], other, corpus / "tok.model", cfg(),
               options=PreprocessOptions(workers=2, chunk_rows=7, progress=False))
    for suffix in (".train.bin", ".train.idx", ".train.spans.bin", ".valid.bin", ".train.rows.jsonl"):
        assert open(f"{prefix}{suffix}", "rb").read() == open(f"{other}{suffix}", "rb").read(), suffix


def test_split_is_fixed_by_the_seed(corpus, tmp_path):
    a = preprocess([corpus / "rows.jsonl"], tmp_path / "a", corpus / "tok.model", cfg(split_seed=7), options=QUIET)
    b = preprocess([corpus / "rows.jsonl"], tmp_path / "b", corpus / "tok.model", cfg(split_seed=8), options=QUIET)
    rows_a = (tmp_path / "a.valid.rows.jsonl").read_text()
    assert rows_a != (tmp_path / "b.valid.rows.jsonl").read_text()
    assert 0 < a.samples["valid"] < len(ROWS) // 2 and 0 < b.samples["valid"] < len(ROWS) // 2


def test_collate_masks_cover_exactly_the_response(corpus, prepared):
    prefix, _ = prepared
    tok = load_tokenizer(corpus / "tok.model")
    dataset = InstructionDataset(f"{prefix}.train", tok)
    samples = [dataset[i] for i in range(4)] + [Sample(np.array([5, 6]), np.array([7, 8, 9, 10, 3]), [(0, 2), (2, 5)])]
    batch = collate(samples, tok.pad_id, pad_to=40)
    assert batch["tokens"].shape == (5, 40)
    for row, sample in enumerate(samples):
        p, r = len(sample.prompt_ids), len(sample.response_ids)
        tokens = batch["tokens"][row]
        assert tokens[:p + r].tolist() == sample.prompt_ids.tolist() + sample.response_ids.tolist()
        assert (tokens[p + r:] == tok.pad_id).all()
        # targets under the loss mask are exactly the response ids, in order
        mask = batch["loss_mask"][row].bool()
        assert batch["labels"][row][mask].tolist() == sample.response_ids.tolist()
        assert batch["prompt_lengths"][row] == p and batch["response_lengths"][row] == r
        # span pairs from the definition: label positions j, j+1 predict response tokens k, k+1 of one span
        expected = torch.zeros(40, dtype=torch.bool)
        for start, end in sample.spans:
            for k in range(start, end - 1):
                expected[p + k - 1] = True  # label position of response token k is p + k - 1
        assert torch.equal(batch["span_pair_mask"][row], expected)
    assert batch["span_pair_mask"][4].nonzero().flatten().tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="does not fit pad_to=3"):
        collate(samples, tok.pad_id, pad_to=3)
    prompts = collate_prompts([s.prompt_ids for s in samples[:2]], tok.pad_id)
    assert prompts["prompt_lengths"].tolist() == [len(samples[0].prompt_ids), len(samples[1].prompt_ids)]


def test_overlong_policies_are_counted(corpus, tmp_path):
    tok = load_tokenizer(corpus / "tok.model")
    rows = [{"prompt": "what is " + " + ".join(map(str, range(k))), "response": f"the sum of {k} and {k} is"}
            for k in range(1, 13)]
    lengths = [(len(tok.encode(r["prompt"] + "\n")), len(tok.encode(r["response"])) + 1) for r in rows]
    max_prompt = sorted(p for p, _ in lengths)[len(lengths) // 2]  # about half the prompts are longer
    max_total = max_prompt + 5  # and some responses do not fit after a truncated prompt
    path = tmp_path / "add.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    long_prompts = sum(p > max_prompt for p, _ in lengths)
    stats = preprocess([path], tmp_path / "drop", corpus / "tok.model",
                       cfg(max_prompt_length=max_prompt, valid_fraction=0.0), options=QUIET)
    assert stats.prompt_dropped == long_prompts > 0 and stats.samples["train"] == len(rows) - long_prompts
    stats = preprocess([path], tmp_path / "trunc", corpus / "tok.model",
                       cfg(max_prompt_length=max_prompt, max_length=max_total, valid_fraction=0.0,
                           overlong_policy="truncate"), options=QUIET)
    assert stats.prompt_truncated == long_prompts and stats.samples["train"] == len(rows)
    assert stats.response_truncated > 0
    dataset = InstructionDataset(tmp_path / "trunc.train")
    for i in range(len(dataset)):
        sample = dataset[i]
        assert len(sample.prompt_ids) <= max_prompt and len(sample.prompt_ids) + len(sample.response_ids) <= max_total
        assert all(0 <= a < b <= len(sample.response_ids) and b - a >= 2 for a, b in sample.spans)
        # a truncated prompt keeps its LAST tokens (the response cue)
        full = tok.encode(rows[i]["prompt"] + "\n")
        assert sample.prompt_ids.tolist() == full[-max_prompt:]
    assert "prompts truncated" in stats.summary() and "responses truncated" in stats.summary()


def test_preprocessing_restarts_from_finished_chunks(corpus, prepared, tmp_path, monkeypatch):
    reference_prefix, _ = prepared
    prefix = tmp_path / "data"
    original = preprocess_module.write_chunk
    calls = []

    def crash_after_two(result, vocab_size):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(1)
        original(result, vocab_size)

    monkeypatch.setattr(preprocess_module, "write_chunk", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        preprocess([corpus / "rows.jsonl"], prefix, corpus / "tok.model", cfg(),
                   options=PreprocessOptions(workers=1, chunk_rows=10, progress=False))
    # nothing was published: a reader refuses the half-done output
    with pytest.raises(UserError, match=r"data.train.json not found: .* is not a preprocessed dataset"):
        InstructionDataset(f"{prefix}.train")
    monkeypatch.setattr(preprocess_module, "write_chunk", original)
    stats = preprocess([corpus / "rows.jsonl"], prefix, corpus / "tok.model", cfg(),
                       options=PreprocessOptions(workers=1, chunk_rows=10, progress=False))
    assert stats.chunks_reused == 2 and stats.samples == prepared[1].samples
    for suffix in (".train.bin", ".train.idx", ".valid.bin", ".train.spans.idx", ".train.rows.jsonl"):
        assert open(f"{prefix}{suffix}", "rb").read() == open(f"{reference_prefix}{suffix}", "rb").read()
    assert not os.path.exists(f"{prefix}.tmp")


def test_index_that_does_not_match_its_data_is_detected(corpus, prepared, tmp_path):
    prefix, _ = prepared
    tok = load_tokenizer(corpus / "tok.model")
    for suffix in (".bin", ".idx", ".spans.bin", ".spans.idx", ".rows.jsonl", ".json"):
        shutil.copy(f"{prefix}.train{suffix}", tmp_path / f"d{suffix}")
    InstructionDataset(tmp_path / "d", tok)
    # a truncated data file
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-4])
    with pytest.raises(UserError, match=r"d.idx does not match .*d.bin: the index describes \d+ bytes, the data "
                                        r"file has \d+ .*re-run tools/preprocess_data.py"):
        InstructionDataset(tmp_path / "d", tok)
    # the index of the other split next to this split's data file
    (tmp_path / "d.bin").write_bytes(data)
    shutil.copy(f"{prefix}.valid.idx", tmp_path / "d.idx")
    with pytest.raises(UserError, match="does not match"):
        InstructionDataset(tmp_path / "d", tok)
    # not an index file at all
    (tmp_path / "d.idx").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match=r"d.idx: not a valid Megatron index file"):
        InstructionDataset(tmp_path / "d", tok)
    # data made with another tokenizer
    shutil.copy(f"{prefix}.train.idx", tmp_path / "d.idx")
    other = tmp_path / "other.model"
    train_sentencepiece(["completely different words here"] * 50 + ["zebra quartz jolt"] * 50, other, vocab_size=40)
    with pytest.raises(UserError, match=r"was tokenized with a different tokenizer \(vocab_size 60, hash \w+\) than "):
        InstructionDataset(tmp_path / "d", load_tokenizer(other))


def test_preprocess_tool_prints_throughput_and_reports_bad_lines(corpus, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_tool", os.path.join(
        os.path.dirname(__file__), "..", "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x"\n' + json.dumps(ROWS[1]) + "\n")
    args = ["--input", str(bad), "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(corpus / "tok.model"),
            "--workers", "1", "--no-progress", "--valid-fraction", "0"]
    assert tool.main(args) == 2
    assert re.search(r"error: .*bad.jsonl:2: malformed JSON", capsys.readouterr().err)
    assert tool.main(args + ["--skip-bad-lines"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad lines; first: " in out and "bad.jsonl:2" in out
    assert re.search(r"throughput: [\d,]+ tokens/s with 1 workers", out)
    assert tool.main(["--input", str(bad), "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(tmp_path)]) == 2
    assert "not a tokenizer directory" in capsys.readouterr().err


def test_prompts_only_data_and_prompt_view(corpus, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "family": r["family"]}) + "\n" for r in ROWS[:10]))
    with pytest.raises(UserError, match="prompts.jsonl:1: missing field 'response'"):
        preprocess([path], tmp_path / "p", corpus / "tok.model", cfg(), options=QUIET)
    preprocess([path], tmp_path / "p", corpus / "tok.model", cfg(valid_fraction=0.0), prompts_only=True,
               options=QUIET)
    tok = load_tokenizer(corpus / "tok.model")
    dataset = InstructionDataset(tmp_path / "p.train", tok)
    assert len(dataset) == 10 and all(len(dataset[i].response_ids) == 0 for i in range(10))
    view = PromptDataset.from_indexed(dataset)
    assert view[3].prompt_ids.tolist() == tok.encode(ROWS[3]["prompt"] + "\n") and view[3].family == "add"
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text(json.dumps(ROWS[0]) + "\n")
    (item,) = PromptDataset.from_jsonl(eval_path, tok, cfg()).items
    assert item.references == [ROWS[0]["response"]] and item.prompt == ROWS[0]["prompt"] + "\n"


# ---- sampler -----------------------------------------------------------------------------------------

def test_sampler_shards_disjointly_and_resumes():
    n, mbs, dp = 50, 3, 4  # window 12: 4 windows per epoch, the tail of 2 is skipped
    ranks = [DistributedResumableSampler(n, mbs, r, dp, seed=5) for r in range(dp)]
    for _ in range(4):  # one epoch
        batches = [next(s) for s in ranks]
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) == mbs * dp
    seen_epoch0 = set(np.random.default_rng([5, 0]).permutation(n)[:48].tolist())
    assert ranks[0].epoch == 0
    assert next(ranks[0]) != [] and ranks[0].epoch == 1
    # resume: 6 micro-batches, save, continue in a fresh sampler == uninterrupted
    full = DistributedResumableSampler(n, mbs, 1, dp, seed=5)
    reference = [next(full) for _ in range(10)]
    first = DistributedResumableSampler(n, mbs, 1, dp, seed=5)
    head = [next(first) for _ in range(6)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    resumed = DistributedResumableSampler(n, mbs, 1, dp, seed=5)
    resumed.load_state_dict(state)
    assert head + [next(resumed) for _ in range(4)] == reference
    assert {i for b in reference[:4] for i in b} <= seen_epoch0
    # resuming with another DP size continues the same global order
    global_order = np.random.default_rng([5, 0]).permutation(n).tolist()
    two = [DistributedResumableSampler(n, mbs, r, 2, seed=5) for r in range(2)]
    for s in two:
        s.load_state_dict({**state, "epoch": 0, "position": 12})
    assert next(two[0]) + next(two[1]) == global_order[12:18]
    with pytest.raises(UserError, match="it saw 50 samples with seed 5, this run has 49 samples"):
        DistributedResumableSampler(49, mbs, 0, dp, seed=5).load_state_dict(state)
    with pytest.raises(UserError, match="fewer than one micro-batch on every data-parallel rank"):
        DistributedResumableSampler(11, mbs, 0, dp)


# ---- demo corpus -------------------------------------------------------------------------------------

def test_demo_corpus(tmp_path):
    corpus = build_demo_corpus(n_train=1200, n_eval=120, labelled_fraction=0.25, seed=3)
    every_family = build_demo_corpus(n_train=300, n_eval=30, seed=3, families=tuple(GENERATORS))
    assert {r["family"] for r in every_family.train} == set(GENERATORS)
    with pytest.raises(ValueError, match="unknown demo task families"):
        build_demo_corpus(n_train=30, n_eval=3, families=("units", "poetry"))
    assert corpus == build_demo_corpus(n_train=1200, n_eval=120, labelled_fraction=0.25, seed=3)
    assert corpus.train != build_demo_corpus(n_train=1200, n_eval=120, seed=4).train
    assert len(corpus.train) == 1200 and len(corpus.train_labelled) == 300 and len(corpus.train_prompts) == 900
    assert [r["prompt"] for r in corpus.train_prompts] == [r["prompt"] for r in corpus.train[300:]]
    assert all("response" not in r for r in corpus.train_prompts)
    assert {r["prompt"] for r in corpus.eval}.isdisjoint(r["prompt"] for r in corpus.train)
    for rows in (corpus.train, corpus.eval):
        counts = {f: sum(r["family"] == f for r in rows) for f in FAMILIES}
        assert max(counts.values()) - min(counts.values()) <= len(rows) // 10, counts
    # responses are right (checked by recomputing a few families independently)
    for row in corpus.train + corpus.eval + every_family.train:
        prompt, response = row["prompt"], row["response"]
        if m := re.fullmatch(r"what is (\d+) ([+-]|times) (\d+)", prompt):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(response) == {"+": a + b, "-": a - b, "times": a * b}[op]
        elif m := re.fullmatch(r"sort (ascending|descending): ([\d ]+)", prompt):
            values = sorted(map(int, m[2].split()), reverse=m[1] == "descending")
            assert response == " ".join(map(str, values))
        elif m := re.fullmatch(r"reverse the words: ([a-z ]+)", prompt):
            assert response == " ".join(reversed(m[1].split()))
        elif m := re.fullmatch(r"is (\w+) in: ([a-z ]+)", prompt):
            assert response == f"{m[1]} is {'' if m[1] in m[2].split() else 'not '}in the list"
        elif m := re.fullmatch(r"table: (.*)\. color of (\w+)\?", prompt):
            table = dict(entry.split() for entry in m[1].split(", "))
            assert response == f"{m[2]} is {table[m[2]]}"
    paths = write_demo_corpus(tmp_path, n_train=1200, n_eval=120, labelled_fraction=0.25, seed=3)
    assert sum(1 for _ in open(paths["train_prompts"])) == 900
    # a 512-piece tokenizer trains in well under a second and keeps every sequence under 40 tokens
    texts = [r["prompt"] for r in corpus.train] + [r["response"] for r in corpus.train]
    train_sentencepiece(texts, tmp_path / "tok.model", vocab_size=512)
    tok = load_tokenizer(tmp_path / "tok.model")
    lengths = [len(tok.encode(DEMO_PROMPT_TEMPLATE.format(instruction=r["prompt"]))) + len(tok.encode(r["response"]))
               + 1 for r in corpus.train + corpus.eval]
    assert max(lengths) < 40
    # and the whole corpus goes through preprocessing, prompts-only part included
    data_cfg = DataConfig(prompt_template=DEMO_PROMPT_TEMPLATE, valid_fraction=0.05, max_length=64)
    stats = preprocess([paths["train_labelled"]], tmp_path / "demo", tok.name, data_cfg, options=QUIET)
    assert stats.samples["train"] + stats.samples["valid"] == 300
    stats = preprocess([paths["train_prompts"]], tmp_path / "demo_prompts", tok.name, data_cfg, prompts_only=True,
                       options=QUIET)
    assert stats.samples["train"] + stats.samples["valid"] == 900


def test_sampler_steps_hold_the_same_samples_at_every_dp_size_across_epochs():
    """122 samples, micro-batch 2, global batch 8: a 2-sample tail per epoch. Wrapping per window skipped
    a different tail at DP=1, 2 and 4 (steps from 16 on differed); wrapping at step boundaries does not."""
    n, mbs, global_batch, steps = 122, 2, 8, 40

    def step_sets(dp):
        ranks = [DistributedResumableSampler(n, mbs, r, dp, seed=9, step_samples=global_batch) for r in range(dp)]
        micro = global_batch // (mbs * dp)
        return [sorted(i for sampler in ranks for _ in range(micro) for i in next(sampler)) for _ in range(steps)]

    reference = step_sets(1)
    assert reference == step_sets(2) == step_sets(4)
    assert len({tuple(s) for s in reference}) == steps  # 40 steps over 2.6 epochs, no step repeated
    with pytest.raises(UserError, match="one training step takes 8"):
        DistributedResumableSampler(6, mbs, 0, 1, step_samples=global_batch)


def test_evaluation_that_would_overflow_the_student_is_refused_before_models(tmp_path):
    """The longest held-out prompt + schedule.eval_max_new_tokens must fit student.max_position_embeddings:
    one line naming the validation file, the row and the flag, when the data is opened (no model built)."""
    from mgsr_megatron.training.data import TrainingData
    from mgsr_megatron.training.smoke import base_config, build_files

    build_files(tmp_path)
    cfg = base_config(tmp_path)
    cfg.data.valid_path = str(tmp_path / "data.train")  # any indexed split serves as held-out rows here
    cfg.schedule.eval_interval, cfg.schedule.eval_prompts, cfg.schedule.eval_max_new_tokens = 10, 8, 1
    data = TrainingData(cfg, 0, 1)
    valid, labelled = data.valid
    longest = max(len(valid[i].prompt_ids) for i in labelled[:8])
    cfg.schedule.eval_max_new_tokens = cfg.student.max_position_embeddings - longest
    TrainingData(cfg, 0, 1)  # fits exactly
    cfg.schedule.eval_max_new_tokens += 1
    with pytest.raises(UserError) as err:
        TrainingData(cfg, 0, 1)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'data.train'} row ") and \
        "schedule.eval_max_new_tokens" in message and f"lower schedule.eval_max_new_tokens to " \
        f"{cfg.student.max_position_embeddings - longest} or less" in message, message
    cfg.schedule.eval_interval = 0  # no evaluation: nothing to fit
    TrainingData(cfg, 0, 1)
