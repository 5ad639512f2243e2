"""Tokenizers as the model was trained (issue 15): every Hugging Face tokenizer directory format is read
through `transformers.AutoTokenizer`, prompts get the tokenizer's BOS exactly where `tok(prompt)` puts
it, responses none, and `messages` rows are rendered with the tokenizer's chat template. The reference
is `transformers` itself, loaded independently in each test (single process, no Megatron models)."""

from __future__ import annotations

import json
import shutil

import pytest

from mgsr_megatron.config import DataConfig
from mgsr_megatron.data.formats import chat_renderer, read_jsonl
from mgsr_megatron.data.tokenizer import load_tokenizer, train_sentencepiece
from mgsr_megatron.errors import UserError

CORPUS = ["the quick brown fox jumps over the lazy dog", "convert 3 km to m", "sort ascending: 7 42 9 15",
          "a café serves naïve bread", "reverse the words: red fox jumps", "user assistant system"] * 40
TEXTS = ["the quick brown fox", "sort ascending: 7 42 9", "a café serves naïve bread", " lazy  dog "]
# A small Jinja chat template in the LLaMA-2 manner: BOS written by the template itself, a raised error
# for a conversation that starts with the assistant.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                 "{% if loop.first and m['role'] == 'assistant' %}"
                 "{{ raise_exception('conversation must not start with the assistant') }}{% endif %}"
                 "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


def _reference(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{llama: SentencePiece tokenizer.model + tokenizer_config.json (add_bos_token, chat template),
    llama_plain: the same without a chat template, opt: GPT-2 style vocab.json + merges.txt with OPT's
    `</s>` BOS, json: a bare tokenizer.json, slow: a SentencePiece-backed (Python) tokenizer}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("hf_tokenizers")
    llama = root / "llama"
    llama.mkdir()
    train_sentencepiece(CORPUS, llama / "tokenizer.model", vocab_size=100)  # pad 0, unk 1, <s> 2, </s> 3
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (llama / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    plain = root / "llama_plain"
    plain.mkdir()
    shutil.copy(llama / "tokenizer.model", plain / "tokenizer.model")
    (plain / "tokenizer_config.json").write_text(json.dumps(config))

    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    byte_level.train_from_iterator(CORPUS, trainer)
    opt = root / "opt"
    opt.mkdir()
    byte_level.model.save(str(opt))  # vocab.json + merges.txt, no tokenizer.json
    (opt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "</s>"}))
    bare = root / "json"
    bare.mkdir()
    byte_level.save(str(bare / "tokenizer.json"))

    slow = root / "slow"
    slow.mkdir()
    shutil.copy(llama / "tokenizer.model", slow / "spiece.model")
    (slow / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertGenerationTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>"}))
    return {"llama": llama, "llama_plain": plain, "opt": opt, "json": bare, "slow": slow}


# ---- 1. every format, BOS / EOS as transformers ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "opt", "json"])
def test_every_hf_directory_format_encodes_as_transformers(dirs, kind):
    assert not (dirs[kind] / "tokenizer.json").exists() or kind == "json"
    tok, ref = load_tokenizer(dirs[kind]), _reference(dirs[kind])
    assert tok.vocab_size == len(ref)
    assert tok.eos_id == (ref.eos_token_id if ref.eos_token_id is not None else ref.convert_tokens_to_ids("</s>"))
    for text in TEXTS:
        assert tok.encode_prompt(text) == ref(text)["input_ids"], (kind, text)
        plain = ref(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(text) == plain["input_ids"]
        assert offsets == [tuple(o) for o in plain["offset_mapping"]]
        assert tok.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False)
    assert tok.pieces() == [ref.convert_ids_to_tokens(i) for i in range(len(ref))]


@pytest.mark.parametrize("kind,bos", [("llama", 2), ("opt", 1)])
def test_prompts_get_the_tokenizers_bos_and_responses_do_not(dirs, kind, bos):
    """LLaMA adds <s> (id 2 here); OPT adds </s>, which is also its EOS (id 1)."""
    tok, ref = load_tokenizer(dirs[kind]), _reference(dirs[kind])
    assert ref.bos_token_id == bos
    assert tok.prompt_prefix == (bos,)
    prompt = tok.encode_prompt("the quick brown fox")
    assert prompt[0] == bos and prompt[1:] == tok.encode("the quick brown fox")
    assert tok.encode("the quick brown fox")[0] != bos
    assert tok.encode_prompt("[user] hi", add_special_tokens=False) == ref("[user] hi", add_special_tokens=False)[
        "input_ids"]


def test_a_sentencepiece_model_file_adds_no_bos(dirs):
    """A plain `.model` file path keeps today's behaviour: the SentencePiece reader, no BOS."""
    tok = load_tokenizer(dirs["llama"] / "tokenizer.model")
    assert type(tok).__name__ == "SentencePieceTokenizer" and tok.prompt_prefix == ()
    assert tok.encode_prompt("the quick brown fox") == tok.encode("the quick brown fox")
    assert tok.vocab_hash() == load_tokenizer(dirs["llama"]).vocab_hash()  # one vocabulary, one hash


def _prepare(tmp_path, tokenizer_dir, rows, **data):
    from mgsr_megatron.data.indexed import InstructionDataset
    from mgsr_megatron.data.preprocess import PreprocessOptions, preprocess

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = DataConfig(prompt_template="{instruction}\n", valid_fraction=0.0, **data)
    preprocess([source], str(tmp_path / "data"), str(tokenizer_dir), cfg,
               options=PreprocessOptions(workers=1, progress=False))
    return source, cfg, InstructionDataset(str(tmp_path / "data.train"), load_tokenizer(tokenizer_dir))


def test_preprocessing_and_prompt_views_put_bos_where_transformers_does(dirs, tmp_path):
    from mgsr_megatron.data.indexed import PromptDataset
    from mgsr_megatron.inference import read_prompt_file

    rows = [{"prompt": "sort ascending: 7 42 9", "response": "7 9 42"},
            {"prompt": "convert 3 km to m", "response": "3000 m"}]
    source, cfg, dataset = _prepare(tmp_path, dirs["llama"], rows)
    ref, tok = _reference(dirs["llama"]), load_tokenizer(dirs["llama"])
    for i, row in enumerate(rows):
        prompt_text = row["prompt"] + "\n"
        assert dataset.row(i)["prompt"] == prompt_text
        assert dataset[i].prompt_ids.tolist() == ref(prompt_text)["input_ids"]
        assert dataset[i].response_ids.tolist() == ref(row["response"], add_special_tokens=False)["input_ids"] + [
            ref.eos_token_id]
    items = PromptDataset.from_jsonl(source, tok, cfg)
    assert [item.prompt_ids.tolist() for item in items] == [dataset[i].prompt_ids.tolist() for i in range(2)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the quick brown fox"}) + "\n")
    _, ids, _ = read_prompt_file(prompts, tok)
    assert ids == [ref("the quick brown fox")["input_ids"]]


def test_truncated_prompts_keep_their_bos(dirs, tmp_path):
    rows = [{"prompt": "the quick brown fox jumps over the lazy dog", "response": "dog"}]
    _, _, dataset = _prepare(tmp_path, dirs["llama"], rows, max_prompt_length=5, overlong_policy="truncate")
    full = _reference(dirs["llama"])(rows[0]["prompt"] + "\n")["input_ids"]
    assert len(full) > 5
    assert dataset[0].prompt_ids.tolist() == [full[0]] + full[-4:]


def test_a_slow_tokenizer_without_offsets_fails_only_where_offsets_are_needed(dirs, tmp_path):
    tok, ref = load_tokenizer(dirs["slow"]), _reference(dirs["slow"])
    assert not ref.is_fast
    assert tok.encode_prompt("the quick fox") == ref("the quick fox")["input_ids"]
    assert tok.decode(tok.encode("the quick fox")).strip() == "the quick fox"
    with pytest.raises(UserError, match="slow .*character offsets") as info:
        tok.encode_with_offsets("the quick fox")
    assert str(dirs["slow"]) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="slow .*character offsets"):  # span priors need them
        _prepare(tmp_path, dirs["slow"], [{"prompt": "x y", "response": "the quick fox"}])


def test_unreadable_tokenizer_directories_are_one_line(dirs, tmp_path):
    broken = tmp_path / "broken_config"
    shutil.copytree(dirs["llama"], broken)
    (broken / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(UserError, match="tokenizer_config.json: not a Hugging Face tokenizer_config.json"):
        load_tokenizer(broken)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    (only_config / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="only_config: not a tokenizer directory"):
        load_tokenizer(only_config)


# ---- 2. messages rows through the chat template ---------------------------------------------------------

MESSAGES = [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "sort 7 42 9"},
            {"role": "assistant", "content": "7 9 42"}]


def test_messages_are_rendered_with_the_chat_template(dirs, tmp_path):
    from mgsr_megatron.data.indexed import PromptDataset

    ref, tok = _reference(dirs["llama"]), load_tokenizer(dirs["llama"])
    assert tok.chat_template == CHAT_TEMPLATE
    history = MESSAGES[:-1]
    expected_text = ref.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    expected_ids = ref.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert expected_text.startswith("<s>[system]")
    source, cfg, dataset = _prepare(tmp_path, dirs["llama"], [{"messages": MESSAGES}])
    (example,) = read_jsonl(source, template=cfg.prompt_template, chat=chat_renderer(tok))
    assert example.prompt == expected_text and example.response == "7 9 42" and example.chat_templated
    assert dataset[0].prompt_ids.tolist() == expected_ids
    assert dataset[0].prompt_ids.tolist().count(ref.bos_token_id) == 1  # the template's BOS, not a second one
    assert dataset[0].response_ids.tolist() == ref("7 9 42", add_special_tokens=False)["input_ids"] + [
        ref.eos_token_id]
    (item,) = PromptDataset.from_jsonl(source, tok, cfg)
    assert item.prompt_ids.tolist() == expected_ids


def test_messages_without_a_template_keep_role_lines(dirs, tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    tok = load_tokenizer(dirs["llama_plain"])
    assert tok.chat_template is None and chat_renderer(tok) is None
    (example,) = read_jsonl(source, template="{instruction}\n", chat=chat_renderer(tok))
    assert example.prompt == "system: answer briefly\nuser: sort 7 42 9\nassistant:\n"
    assert not example.chat_templated


def test_prompt_only_messages_and_template_errors(dirs, tmp_path):
    tok, ref = load_tokenizer(dirs["llama"]), _reference(dirs["llama"])
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": MESSAGES[:2]}) + "\n")
    (example,) = read_jsonl(source, prompts_only=True, chat=chat_renderer(tok))
    assert example.response is None
    assert example.prompt == ref.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, tokenize=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": MESSAGES}) + "\n"
                   + json.dumps({"messages": [MESSAGES[2], MESSAGES[1], MESSAGES[2]]}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:2: chat template of .* failed: conversation must not start") as info:
        list(read_jsonl(bad, chat=chat_renderer(tok)))
    assert "\n" not in str(info.value)


# ---- 4. `mgsr generate` on an imported model: the prompt as transformers encodes it ------------------------

def test_generate_on_an_imported_llama_prepends_bos_where_transformers_does(dirs, tmp_path):
    """Import a tiny LLaMA whose directory holds a LLaMA-2 style tokenizer (add_bos_token), run `mgsr
    generate --greedy` on a text prompt, and compare with greedy decoding in transformers from
    `tok(prompt)["input_ids"]` (BOS first)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch
    import transformers as tf

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64)).eval()
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(dirs["llama_plain"] / name, hf / name)
    meg = tmp_path / "meg"
    result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "import", "--hf-path", str(hf),
                             "--megatron-path", str(meg), "--no-progress"],
                            env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    prompt = "convert 3 km to m"
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    output = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "mgsr_megatron", "generate", "--load", str(meg), "--prompts",
                             str(tmp_path / "prompts.jsonl"), "--output", str(output), "--greedy",
                             "--max-new-tokens", "6"], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in output.read_text().splitlines()]

    reference = tf.AutoTokenizer.from_pretrained(hf)

    def greedy(ids: list[int]) -> list[int]:
        out = []
        with torch.no_grad():
            for _ in range(6):
                out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
                if out[-1] == reference.eos_token_id:
                    break
        return out

    with_bos = reference(prompt)["input_ids"]
    assert with_bos[0] == reference.bos_token_id == 2
    expected = greedy(with_bos)
    assert expected != greedy(with_bos[1:])  # the check can tell a prompt with BOS from one without
    assert row["output_ids"] == expected
