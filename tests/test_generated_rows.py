"""Generated responses are trained exactly as the same rows would be as ground truth.

The trainer builds micro-batches two ways (mgsr_megatron/training/data.py):
  ground truth   JSONL -> preprocessing (tokenize, append EOS, spans from the response TEXT) -> indexed
                 files -> `TrainingData.next_micro_batches` (collate + SFT and KD masks)
  generated      (prompt ids, response ids) from the generator (on-policy, SCRG, SeqKD, replay) ->
                 `TrainingData.collate_generated` (spans extracted ONLINE from the ids, KD mask; SFT mask
                 only with mgsr.sft_on_generated)
Here the same (prompt, response) pairs go both ways and every field of the micro-batch is compared;
one row is also built by hand, and the EOS / truncation cases are spelled out.
"""

from __future__ import annotations

import json

import pytest
import torch

from mgsr_megatron.config import Config, DataConfig

TEMPLATE = "{instruction}\n"
SEQ = 40  # schedule.seq_length = data.max_length, as in the demo
# the corpus these rows were written against (the truncation below depends on its tokenizer)
WAVE1_FAMILIES = ("arithmetic", "sorting", "strings", "units", "lookup", "compare")
HAND_PROMPT, HAND_RESPONSE = "name three animals", "the quick brown fox ran to the big red barn"
CRAFTED = [  # responses whose text does not survive encode -> decode, and one that preprocessing truncates
    ("repeat with spaces", "green  apple   pie and  red plum"),
    ("say it in french", "caf\u00e9 au lait"),
    ("unknown symbols", "the \u03a9 omega sign"),
    ("write a long list", " ".join(["quick brown fox ran far away"] * 6)),
]
FIELDS = ("tokens", "labels", "loss_mask", "kd_mask", "position_ids", "prompt_lengths", "response_lengths")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mgsr_megatron.data.demo_corpus import build_demo_corpus
    from mgsr_megatron.data.preprocess import PreprocessOptions, preprocess
    from mgsr_megatron.data.tokenizer import load_tokenizer, train_sentencepiece
    from mgsr_megatron.training.data import TrainingData

    root = tmp_path_factory.mktemp("generated_rows")
    corpus = build_demo_corpus(n_train=240, n_eval=4, families=WAVE1_FAMILIES)
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in corpus.train]
    rows += [{"prompt": p, "response": r} for p, r in CRAFTED] + [{"prompt": HAND_PROMPT, "response": HAND_RESPONSE}]
    # the tokenizer knows the demo rows of the span check below too (the demo trains it on its corpus), and
    # the hand row's words are frequent enough to be single pieces; the unknown-symbols row stays unknown
    known = rows[:-len(CRAFTED) - 1] + [{"prompt": p, "response": r} for p, r in CRAFTED if "\u03a9" not in r]
    known += build_demo_corpus(n_train=600, n_eval=0, seed=3, families=WAVE1_FAMILIES).train
    texts = [r["prompt"] for r in known] + [r["response"] for r in known] + [HAND_RESPONSE] * 200
    train_sentencepiece(texts, root / "tok.model", vocab_size=256)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess([root / "rows.jsonl"], str(root / "data"), str(root / "tok.model"),
               DataConfig(format="prompt_response", prompt_template=TEMPLATE, max_prompt_length=24, max_length=SEQ,
                          valid_fraction=0.0, overlong_policy="truncate"),
               options=PreprocessOptions(workers=1, progress=False))
    cfg = Config()
    cfg.data.tokenizer, cfg.data.train_path = str(root / "tok.model"), str(root / "data.train")
    cfg.student.vocab_size = load_tokenizer(cfg.data.tokenizer).vocab_size
    cfg.schedule.seq_length, cfg.schedule.micro_batch_size = SEQ, 5  # 245 rows: 49 micro-batches
    cfg.schedule.global_batch_size = 5  # one micro-batch per step (the sampler wraps epochs at steps)
    return TrainingData(cfg, dp_rank=0, dp_size=1)


def _pairs(batch: dict) -> list[tuple[list[int], list[int]]]:
    """The (prompt ids, response ids) of each row of a micro-batch, as the generator would hand them over."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        p, r = int(batch["prompt_lengths"][row]), int(batch["response_lengths"][row])
        out.append((batch["tokens"][row, :p].tolist(), batch["tokens"][row, p:p + r].tolist()))
    return out


def _generated(data, pairs, sft_on_generated: bool = False) -> dict:
    previous = data.cfg.mgsr.sft_on_generated
    data.cfg.mgsr.sft_on_generated = sft_on_generated
    try:
        return data.collate_generated(pairs, 1)[0]
    finally:
        data.cfg.mgsr.sft_on_generated = previous


def _spans(mask_row: torch.Tensor, prompt_length: int) -> list[tuple[int, int]]:
    """Response-relative spans [a, e) back from a span_pair_mask row (pairs i in [P + a - 1, P + e - 3])."""
    on = mask_row.nonzero().flatten().tolist()
    spans, start = [], None
    for k, i in enumerate(on):
        if start is None:
            start = i
        if k + 1 == len(on) or on[k + 1] != i + 1:
            spans.append((start - prompt_length + 1, i - prompt_length + 3))
            start = None
    return spans


def test_generated_rows_equal_ground_truth_rows(data):
    """Every labelled row, in the micro-batches the trainer's ground-truth path makes: the same pairs
    through collate_generated give identical tokens, labels, loss/KD masks, positions and lengths; the
    SFT mask is the loss mask with mgsr.sft_on_generated, zero without. Spans: identical wherever the
    response text survives encode -> decode (the generated path sees only ids); the rows where it
    does not, and rows that preprocessing truncated mid-word, may differ and are listed."""
    tok = data.tokenizer
    labelled = len(data.ground_truth.indices)
    by_pair = {(tuple(data.dataset[i].prompt_ids.tolist()), tuple(data.dataset[i].response_ids.tolist())): i
               for i in range(len(data.dataset))}
    seen, span_rows, differing = set(), 0, []
    for batch in data.next_micro_batches(labelled // 5):
        pairs = _pairs(batch)
        generated = _generated(data, pairs)
        for field in FIELDS:
            assert torch.equal(batch[field], generated[field]), field
        assert torch.equal(batch["sft_mask"], batch["loss_mask"]) and not generated["sft_mask"].any()
        assert torch.equal(_generated(data, pairs, sft_on_generated=True)["sft_mask"], batch["loss_mask"])
        for row, (prompt, response) in enumerate(pairs):
            index = by_pair[(tuple(prompt), tuple(response))]
            seen.add(index)
            text = data.dataset.row(index)["references"][0]
            gt, online = (_spans(b["span_pair_mask"][row], len(prompt)) for b in (batch, generated))
            assert gt == data.dataset[index].spans  # the mask encodes exactly the stored spans
            span_rows += bool(gt)
            if gt != online:
                ids = response[:-1] if response[-1] == tok.eos_id else response
                differing.append((text, tok.decode(ids), gt, online, response[-1] == tok.eos_id))
    assert labelled == 245 and len(seen) == labelled and span_rows > 40, (labelled, len(seen), span_rows)
    # the only legitimate differences: text that encode -> decode does not reproduce (spaces, unknown
    # characters), and a response cut by preprocessing (no EOS) whose last word lost pieces
    for text, decoded, gt, online, has_eos in differing:
        assert decoded != text or not has_eos, (text, gt, online)
    explained = {text for text, *_ in differing}
    assert explained <= {r for _, r in CRAFTED}, explained  # the demo corpus rows all agree
    print(f"{labelled} rows, {span_rows} with spans, spans differ in {len(differing)}: {differing}")


def test_hand_built_row(data):
    """One row with every field written out by hand, identical from both paths."""
    tok = data.tokenizer
    prompt = tok.encode(HAND_PROMPT + "\n")
    words = HAND_RESPONSE.split()
    response = tok.encode(HAND_RESPONSE)
    assert [tok.sp.id_to_piece(i) for i in response] == ["\u2581" + w for w in words], "precondition: whole words"
    index = next(i for i in range(len(data.dataset)) if data.dataset[i].prompt_ids.tolist() == prompt)
    from mgsr_megatron.data.collate import collate

    ground_truth = data.with_loss_masks(collate([data.dataset[index]], data.pad_id, SEQ), generated=False)
    generated = _generated(data, [(prompt, response + [tok.eos_id])])
    P, R = len(prompt), len(response) + 1  # the response ends with EOS
    tokens = prompt + response + [tok.eos_id] + [data.pad_id] * (SEQ - P - R)
    labels = tokens[1:P + R] + [data.pad_id] * (SEQ - P - R + 1)
    loss_mask = [0.0] * (P - 1) + [1.0] * R + [0.0] * (SEQ - P - R + 1)
    # phrase spans: "the" and "to" are function words; "quick brown fox ran" = response tokens [1, 5),
    # "big red barn" = [7, 10); a pair (i, i + 1) of label positions lies in one span for i in
    # [P + a - 1, P + e - 3]: P..P+2 and P+6..P+7
    span = [False] * SEQ
    for i in [P, P + 1, P + 2, P + 6, P + 7]:
        span[i] = True
    expected = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "kd_mask": loss_mask,
                "span_pair_mask": span, "position_ids": list(range(SEQ)), "prompt_lengths": P, "response_lengths": R}
    for name, batch in (("ground truth", ground_truth), ("generated", generated)):
        for field, value in expected.items():
            got = batch[field][0].tolist() if batch[field].dim() > 1 else int(batch[field][0])
            assert got == value, (name, field, got, value)
    assert ground_truth["sft_mask"][0].tolist() == loss_mask and not generated["sft_mask"].any()
    assert data.dataset[index].spans == [(1, 5), (7, 10)]


def test_response_without_eos_is_a_truncated_row(data):
    """A response that reached max_new_tokens has no EOS: the loss sees its tokens and nothing after
    (no stop target). That is exactly a ground-truth response that preprocessing truncated (no EOS
    either). And collate_generated cuts a response that does not fit seq_length to the room left."""
    tok = data.tokenizer
    prompt = tok.encode(HAND_PROMPT + "\n")
    response = tok.encode(HAND_RESPONSE)[:6]  # "the quick brown fox ran to": budget of 6 reached
    P = len(prompt)
    batch = _generated(data, [(prompt, response)])
    assert batch["response_lengths"].tolist() == [6]
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == list(range(P - 1, P + 5))  # 6 targets, no EOS
    assert batch["labels"][0, P - 1:P + 5].tolist() == response and batch["labels"][0, P + 5] == data.pad_id
    assert _spans(batch["span_pair_mask"][0], P) == [(1, 5)]  # "quick brown fox ran"
    # the long crafted row, truncated by preprocessing (overlong_policy=truncate): same fields both ways
    long_prompt = tok.encode(CRAFTED[-1][0] + "\n")
    index = next(i for i in range(len(data.dataset)) if data.dataset[i].prompt_ids.tolist() == long_prompt)
    sample = data.dataset[index]
    assert len(sample.prompt_ids) + len(sample.response_ids) == SEQ and tok.eos_id not in sample.response_ids
    from mgsr_megatron.data.collate import collate

    ground_truth = data.with_loss_masks(collate([sample], data.pad_id, SEQ), generated=False)
    generated = _generated(data, [(sample.prompt_ids.tolist(), sample.response_ids.tolist())])
    for field in FIELDS:
        assert torch.equal(ground_truth[field], generated[field]), field
    # spans: preprocessing cut the response after the text's spans were found ("... far away" keeps its
    # span, clipped); the ids alone end in "... far a", and the cut word "a" reads as the article, so the
    # online span stops before it. Only the span holding the cut differs, and only at its end.
    gt, online = (_spans(b["span_pair_mask"][0], len(sample.prompt_ids)) for b in (ground_truth, generated))
    assert tok.decode(sample.response_ids.tolist()).endswith("far a"), tok.decode(sample.response_ids.tolist())
    assert gt[:-1] == online[:-1] and gt[-1][0] == online[-1][0] and online[-1][1] < gt[-1][1], (gt, online)
    # a generated response longer than the room left by its prompt keeps its first SEQ - P tokens
    too_long = _generated(data, [(prompt, tok.encode(CRAFTED[-1][1]) + [tok.eos_id])])
    assert too_long["response_lengths"].tolist() == [SEQ - P] and too_long["loss_mask"][0, -1] == 0
    assert int(too_long["loss_mask"].sum()) == SEQ - P and tok.eos_id not in too_long["tokens"][0].tolist()


def test_spans_agree_on_the_demo_corpus_at_scale(data):
    """Online spans (generated path) = preprocessing's spans (ground-truth path) on 600 more demo rows
    (all in the tokenizer's vocabulary, as in the demo: unknown characters are what makes them differ)."""
    from mgsr_megatron.data.demo_corpus import build_demo_corpus
    from mgsr_megatron.data.formats import parse_row
    from mgsr_megatron.data.preprocess import tokenize_example
    from mgsr_megatron.data.spans import spans_for_ids

    tok, extractor = data.tokenizer, data.extractor
    cfg = DataConfig(format="prompt_response", prompt_template=TEMPLATE, max_prompt_length=24, max_length=SEQ,
                     overlong_policy="truncate")
    counts = {"prompt_dropped": 0, "prompt_truncated": 0, "length_dropped": 0, "response_truncated": 0}
    disagree = []
    for k, row in enumerate(build_demo_corpus(n_train=600, n_eval=0, seed=3, families=WAVE1_FAMILIES).train):
        example = parse_row({"prompt": row["prompt"], "response": row["response"]}, "prompt_response", TEMPLATE,
                            f"row {k}")
        _, response_ids, spans = tokenize_example(example, tok, extractor, cfg, counts)
        if spans != spans_for_ids(extractor, tok, response_ids):
            disagree.append((row["response"], spans, spans_for_ids(extractor, tok, response_ids)))
    assert disagree == [], disagree[:5]


def test_generator_output_reaches_the_batch_unchanged(data):
    """What the trainer hands collate_generated after generating: zip(prompts, out.responses()). Each
    batch row is the generator's sequence up to the row's end, EOS included where one was sampled (a
    row that reached max_new_tokens has none), pad after it; the loss covers exactly the response."""
    from mgsr_megatron import parallel
    from mgsr_megatron.config import ModelConfig
    from mgsr_megatron.generation import SamplingOptions, generate
    from mgsr_megatron.models import build_model

    parallel.init_distributed()
    parallel.initialize_model_parallel(1, 1, seed=3)
    vocab, eos = data.tokenizer.vocab_size, data.eos_id
    model = build_model(ModelConfig(arch="llama", num_layers=1, hidden_size=32, num_attention_heads=4,
                                    num_query_groups=2, ffn_hidden_size=64, vocab_size=vocab,
                                    make_vocab_size_divisible_by=64, max_position_embeddings=64))
    model.eval()
    prompts = data.next_prompt_micro_batches(1)[0]
    # aim EOS's output row at the mean final hidden state, so that some rows stop early (a random
    # model is near-uniform and would never sample EOS)
    hidden = []
    hook = model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: hidden.append(o.detach()))
    with torch.no_grad():
        for prompt in prompts:
            model(torch.tensor([prompt]), torch.arange(len(prompt)).unsqueeze(0), None)
        hook.remove()
        mean = torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden]).mean(0)
        model.output_layer.weight[eos] = 2.0 * mean / mean.norm() ** 2
    out = generate(model, prompts, SamplingOptions(max_new_tokens=8, eos_id=eos, seed=0), vocab_size=vocab)
    responses = out.responses()
    assert any(r[-1] == eos for r in responses) and any(len(r) == 8 and eos not in r for r in responses), responses
    batch = data.collate_generated(list(zip(prompts, responses)), 1)[0]
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        P, end = len(prompt), len(prompt) + len(response)
        assert eos not in response[:-1]  # nothing after an EOS is handed over
        assert batch["tokens"][row, :end].tolist() == out.tokens[row, :end].tolist() == prompt + response
        assert (batch["tokens"][row, end:] == data.pad_id).all()
        assert batch["loss_mask"][row].nonzero().flatten().tolist() == list(range(P - 1, end - 1))
        assert batch["labels"][row, P - 1:end - 1].tolist() == response
    assert torch.equal(batch["response_lengths"], out.response_lengths)
    assert torch.equal(batch["kd_mask"], batch["loss_mask"]) and not batch["sft_mask"].any()
