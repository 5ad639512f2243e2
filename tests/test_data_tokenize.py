"""Tokenizers, instruction JSONL formats and span priors (single process, no Megatron)."""

import json
import re

import pytest

from mgsr_megatron.data.formats import ReadStats, read_jsonl
from mgsr_megatron.data.spans import (
    char_spans_to_token_ranges,
    get_span_extractor,
    nltk_char_spans,
    phrase_char_spans,
    spans_for_ids,
)
from mgsr_megatron.data.tokenizer import check_same_tokenizer, load_tokenizer, train_sentencepiece
from mgsr_megatron.errors import UserError

CORPUS = ["the quick brown fox jumps over the lazy dog", "convert 3 km to m", "sort ascending: 7 42 9 15",
          "a café serves naïve bread", "reverse the words: red fox jumps"] * 40
TEMPLATE = "{instruction}\n\n{input}\n\n### Response:\n"


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    train_sentencepiece(CORPUS, path, vocab_size=100)
    return load_tokenizer(path)


def hf_tokenizer_dir(directory, merges=(("q", "u"), ("qu", "i"), ("qui", "c"), ("quic", "k"), ("t", "h"),
                                        ("th", "e"), ("b", "r"), ("o", "w"), ("ow", "n"), ("br", "own"))):
    """A tiny hand-built Hugging Face BPE: its tokenization is known, so expected ranges are hand-written."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"</s>": 0, "<pad>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz.,:0123456789":
        vocab[char] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab, list(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return load_tokenizer(hf_tokenizer_dir(tmp_path_factory.mktemp("hf")))


# ---- tokenizers --------------------------------------------------------------------------------------

def test_sentencepiece_offsets_are_characters(sp_tok):
    text = "a café serves naïve bread"
    ids, offsets = sp_tok.encode_with_offsets(text)
    assert ids == sp_tok.encode(text) and sp_tok.decode(ids) == text
    for token_id, (start, end) in zip(ids, offsets):
        # the piece without its word-start marker is exactly the text under its character offsets
        assert sp_tok.sp.id_to_piece(token_id).replace("▁", " ").strip() == text[start:end].strip()
    assert sp_tok.eos_id == 3 and sp_tok.pad_id == 0 and sp_tok.vocab_size == 100


def test_hf_tokenizer(hf_tok):
    ids, offsets = hf_tok.encode_with_offsets("the quick fox")
    assert [hf_tok.pieces()[i] for i in ids] == ["the", "quick", "f", "o", "x"]
    assert offsets == [(0, 3), (4, 9), (10, 11), (11, 12), (12, 13)]
    assert hf_tok.eos_id == 0 and hf_tok.pad_id == 1


def test_vocab_hash_and_shared_tokenizer_check(tmp_path, sp_tok, hf_tok):
    again = load_tokenizer(sp_tok.name)
    assert again.vocab_hash() == sp_tok.vocab_hash()
    check_same_tokenizer(sp_tok, again)
    with pytest.raises(UserError, match="vocab_size 100 but student tokenizer .* has 51"):
        check_same_tokenizer(sp_tok, hf_tok)
    other = load_tokenizer(hf_tokenizer_dir(tmp_path / "other", merges=(("q", "u"), ("qu", "i"), ("qui", "c"),
                                                                         ("quic", "k"), ("t", "h"), ("th", "e"),
                                                                         ("b", "r"), ("o", "w"), ("ow", "n"),
                                                                         ("f", "o"))))
    assert other.vocab_size == hf_tok.vocab_size
    with pytest.raises(UserError, match="same size \\(51\\) but different vocabularies"):
        check_same_tokenizer(hf_tok, other)


def test_bad_tokenizer_paths(tmp_path):
    not_model = tmp_path / "notes.txt"
    not_model.write_text("hello")
    with pytest.raises(UserError, match=r"notes.txt: not a SentencePiece model"):
        load_tokenizer(not_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: not a tokenizer directory \(no tokenizer.json, .*; found nothing\)"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"broken/tokenizer.json: not a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path / "broken")
    with pytest.raises(UserError, match="tokenizer not found: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")


# ---- JSONL formats -----------------------------------------------------------------------------------

def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return path


def test_each_format_parses(tmp_path):
    rows = [
        {"instruction": "Name a fruit", "context": "It is red", "response": "apple"},          # dolly
        {"instruction": "Add", "input": "2 and 3", "output": "5"},                           # alpaca
        {"instruction": "Say hi", "input": "", "output": "hi"},                              # alpaca, empty input
        {"prompt": "Capital of France?", "response": "Paris", "family": "facts"},          # prompt/response
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]},
    ]
    examples = list(read_jsonl(write_lines(tmp_path / "mixed.jsonl", rows), template=TEMPLATE))
    assert [e.prompt for e in examples] == [
        "Name a fruit\n\nIt is red\n\n### Response:\n", "Add\n\n2 and 3\n\n### Response:\n",
        "Say hi\n\n### Response:\n",  # the empty {input} block is dropped, not left as a blank paragraph
        "Capital of France?\n\n### Response:\n", "user: hello\nassistant:\n\n### Response:\n"]
    assert [e.response for e in examples] == ["apple", "5", "hi", "Paris", "hi there"]
    assert examples[3].family == "facts" and examples[3].source.endswith("mixed.jsonl:4")
    forced = list(read_jsonl(write_lines(tmp_path / "a.jsonl", [rows[1]]), fmt="alpaca",
                             template="{instruction}: {input}"))
    assert forced[0].prompt == "Add: 2 and 3"


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "x", "response": "y"', r"bad.jsonl:2: malformed JSON \(Expecting ',' delimiter at column 32\)"),
    (b'{"input": "x", "output": "y"}', r"bad.jsonl:2: missing field 'instruction'"),
    (b'{"instruction": "x", "context": "c"}', r"bad.jsonl:2: missing field 'response'"),
    (b'{"prompt": "x", "response": "  "}', r"bad.jsonl:2: empty response in field 'response'"),
    (b'{"prompt": "caf\xe9", "response": "y"}', r"bad.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"),
    (b'{"messages": [{"role": "user", "content": "x"}]}',
     r"bad.jsonl:2: field 'messages': the last message must have role 'assistant'"),
    (b'[1, 2]', r"bad.jsonl:2: expected a JSON object, got list"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = {"prompt": "ok", "response": "fine"}
    path = write_lines(tmp_path / "bad.jsonl", [good, line, good])
    with pytest.raises(UserError, match=message):
        list(read_jsonl(path))
    stats = ReadStats()
    kept = list(read_jsonl(path, skip_bad_lines=True, stats=stats))
    assert len(kept) == 2 and stats.bad_lines == 1 and stats.rows == 2
    assert "bad.jsonl:2" in stats.first_bad


def test_prompts_only_rows(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "what is 2 + 2"}])
    with pytest.raises(UserError, match="p.jsonl:1: missing field 'response'"):
        list(read_jsonl(path))
    (example,) = read_jsonl(path, template="{instruction}\n", prompts_only=True)
    assert example.response is None and example.prompt == "what is 2 + 2\n"


# ---- span priors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, phrases", [
    ("the quick brown fox jumps over the lazy dog.", ["quick brown fox jumps", "lazy dog"]),
    ("Paris is the capital of France, and it is large", ["Paris", "capital", "France", "large"]),
    ("3 km is 3000 m", ["3 km", "3000 m"]),
    ("sort: 7, 42 and 9", ["sort", "7", "42", "9"]),
    ("", []),
])
def test_phrase_chunker(text, phrases):
    assert [text[a:b] for a, b in phrase_char_spans(text)] == phrases


def test_phrase_spans_to_hf_token_ranges(hf_tok):
    text = "the quick brown fox jumps over the lazy dog."
    ids, offsets = hf_tok.encode_with_offsets(text)
    # tokens: the quick brown f o x j u m p s o v e r the l a z y d o g .
    #          0    1     2   3 4 5 6 7 8 9 10 ...
    ranges = get_span_extractor("phrase")(text, offsets)
    assert ranges == [(1, 11), (16, 23)]  # "quick .. jumps", "lazy dog"
    assert [text[offsets[a][0]:offsets[b - 1][1]] for a, b in ranges] == ["quick brown fox jumps", "lazy dog"]
    # one-token phrases are not spans: "the", "over" are function words; "fox" alone would still be 3 tokens
    assert get_span_extractor("word")(text, offsets) == [(3, 6), (6, 11), (11, 15), (16, 20), (20, 23)]
    assert get_span_extractor("window:4")(text, offsets) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24)]
    assert get_span_extractor("window:5")(text, offsets)[-1] == (20, 24)  # 24 tokens: last window of 4 kept


def test_phrase_spans_to_sentencepiece_token_ranges(sp_tok):
    for text, phrases in [("the quick brown fox jumps over the lazy dog", ["quick brown fox jumps", "lazy dog"]),
                          ("convert 3 km to m", ["convert 3 km"])]:
        ids, offsets = sp_tok.encode_with_offsets(text)
        ranges = get_span_extractor("phrase")(text, offsets)
        # independent check: decoding the token range gives back exactly the phrase
        assert [sp_tok.decode(ids[a:b]).strip() for a, b in ranges] == phrases
        for a, _end in ranges:  # the tokens right outside a range do not overlap its phrase
            assert a == 0 or offsets[a - 1][1] <= offsets[a][0] + 1
    # the same spans are found online from generated ids (no text available)
    text = "the quick brown fox jumps over the lazy dog"
    ids, offsets = sp_tok.encode_with_offsets(text)
    extractor = get_span_extractor("phrase")
    assert spans_for_ids(extractor, sp_tok, ids + [sp_tok.eos_id, 5, 6]) == extractor(text, offsets)


def test_char_spans_to_token_ranges_overlap_rule():
    offsets = [(0, 2), (2, 5), (5, 6), (6, 9)]
    assert char_spans_to_token_ranges([(1, 6)], offsets) == [(0, 3)]
    assert char_spans_to_token_ranges([(2, 5)], offsets) == []  # one token: no adjacent pair
    assert char_spans_to_token_ranges([(0, 5), (4, 9)], offsets) == [(0, 2), (2, 4)]  # overlap clipped


def test_nltk_extractor(monkeypatch):
    # nltk is installed but its tagger data is not (and cannot be downloaded here): a clear message
    import nltk

    try:
        nltk.data.find("taggers/averaged_perceptron_tagger_eng/")
        has_data = True
    except LookupError:
        has_data = False
    if not has_data:
        with pytest.raises(UserError, match="needs NLTK's tagger data 'averaged_perceptron_tagger_eng', which is "
                                            "not installed .* or use data.span_extractor=phrase"):
            get_span_extractor("nltk")
    # the chunk grammar itself, with a hand-written tagger standing in for NLTK's
    tags = {"the": "DT", "quick": "JJ", "brown": "JJ", "fox": "NN", "jumps": "VBZ", "over": "IN",
            "lazy": "JJ", "dog": "NN"}
    text = "the quick brown fox jumps over the lazy dog"
    spans = nltk_char_spans(text, tagger=lambda words: [(w, tags[w]) for w in words])
    assert [text[a:b] for a, b in spans] == ["the quick brown fox", "jumps over the lazy dog"]


def test_bad_extractor_specs():
    with pytest.raises(UserError, match="unknown extractor 'chunky'"):
        get_span_extractor("chunky")
    with pytest.raises(UserError, match="'window:1' needs a window of at least 2"):
        get_span_extractor("window:1")


def test_train_tokenizer_tool(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_tokenizer_tool",
                                                  Path(__file__).parent.parent / "tools" / "train_tokenizer.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    corpus = write_lines(tmp_path / "c.jsonl", [{"prompt": s, "response": s.upper()} for s in CORPUS] +
                         [{"messages": [{"role": "user", "content": "zebra quartz"}]}])
    assert tool.main(["--input", str(corpus), "--output", str(tmp_path / "t.model"), "--vocab-size", "120"]) == 0
    assert re.search(r"vocab_size 120, hash \w{16}, 401 sentences", capsys.readouterr().out)
    tok = load_tokenizer(tmp_path / "t.model")
    assert tok.decode(tok.encode("zebra quartz")) == "zebra quartz"
    assert len(tok.encode("42")) == 3  # split digits: "▁", "4", "2"
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "x"}, b"{oops"])
    assert tool.main(["--input", str(bad), "--output", str(tmp_path / "u.model")]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "u.model").exists()


def test_phrase_spans_with_a_byte_level_hf_tokenizer(tmp_path):
    """GPT-2 style byte-level BPE: pieces carry their leading space ("Ġfox") in their offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "bl").mkdir()
    tokenizer.save(str(tmp_path / "bl" / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "bl")
    assert tok.eos_id == 0
    extractor = get_span_extractor("phrase")
    for text, phrases in [("the quick brown fox jumps over the lazy dog", ["quick brown fox jumps", "lazy dog"]),
                          ("a café serves naïve bread", ["café serves naïve bread"])]:
        ids, offsets = tok.encode_with_offsets(text)
        ranges = extractor(text, offsets)
        assert [tok.decode(ids[a:b]).strip() for a, b in ranges] == phrases
        assert spans_for_ids(extractor, tok, ids + [tok.eos_id]) == ranges
