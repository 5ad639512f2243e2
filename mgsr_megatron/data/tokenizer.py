"""Tokenizers: SentencePiece `.model` files and Hugging Face tokenizer directories, one interface.

    tok = load_tokenizer("runs/demo/tokenizer.model")     # or a Hugging Face tokenizer directory
    ids, offsets = tok.encode_with_offsets("sort 3 1 2")  # offsets[i] = (start, end) CHARACTER offsets
    tok.encode_prompt("sort 3 1 2")                       # a prompt as the model was trained: BOS if it adds one
    tok.decode(ids); tok.eos_id; tok.pad_id; tok.vocab_size; tok.vocab_hash(); tok.chat_template

A directory is read by `transformers.AutoTokenizer.from_pretrained(dir, trust_remote_code=False)`, so
every format it reads works (`tokenizer.json`; GPT-2/OPT `vocab.json` + `merges.txt`; a SentencePiece
`tokenizer.model` with `tokenizer_config.json`, LLaMA-style) and BOS/EOS are the tokenizer's own: a
prompt gets the special tokens `tok(prompt)["input_ids"]` gets (LLaMA's BOS, OPT's `</s>`), a response
none (the data pipeline appends `eos_id`). A plain SentencePiece `.model` file adds no BOS.

Teacher and student must share one tokenizer: `check_same_tokenizer` compares the vocabulary size and
a hash of the id -> piece table (the hash, not the file path, because the same vocabulary is often
stored twice, e.g. once per model directory).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mgsr_megatron.errors import UserError

# Special tokens that mean "end of sequence" in common Hugging Face vocabularies, most specific first
# (a bare tokenizer.json names none: it has no tokenizer_config.json).
_HF_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
_HF_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")
# Files holding a vocabulary: a directory with none of them is no tokenizer (configs alone are not one).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
               "vocab.txt")


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether `directory` holds a vocabulary file a Hugging Face tokenizer is read from."""
    directory = Path(directory)
    return directory.is_dir() and any((directory / name).is_file() for name in VOCAB_FILES)


class Tokenizer:
    """Common interface. `encode` never adds BOS/EOS; `encode_prompt` adds what the tokenizer adds."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int
    chat_template: str | None = None  # a Jinja chat template (Hugging Face tokenizers that define one)
    prompt_prefix: tuple[int, ...] = ()  # the special tokens `encode_prompt` puts first (BOS)

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A prompt as the model saw prompts in training. `add_special_tokens=False` for text that already
        holds them (a chat template's rendering, as `apply_chat_template(tokenize=True)` does)."""
        return self.encode(text)

    def truncate_prompt(self, ids: list[int], limit: int) -> list[int]:
        """The last `limit` tokens (the response cue sits at the end), keeping `prompt_prefix` (BOS) first."""
        if len(ids) <= limit:
            return list(ids)
        prefix = list(self.prompt_prefix)
        if not prefix or list(ids[:len(prefix)]) != prefix or limit <= len(prefix):
            return list(ids[len(ids) - limit:])
        return prefix + list(ids[len(ids) - (limit - len(prefix)):])

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text of a conversation: the chat template with the generation prompt appended."""
        raise UserError(f"tokenizer {self.name} has no chat template")

    def decode(self, ids) -> str:
        raise NotImplementedError

    def pieces(self) -> list[str]:
        """The vocabulary as a list indexed by id."""
        raise NotImplementedError

    def vocab_hash(self) -> str:
        """sha256 (first 16 hex digits) of the id -> piece table; equal hashes mean equal vocabularies."""
        if getattr(self, "_vocab_hash", None) is None:  # every checkpoint save records it: compute once
            digest = hashlib.sha256()
            for piece in self.pieces():
                digest.update(piece.encode("utf-8", "surrogatepass"))
                digest.update(b"\0")
            self._vocab_hash = digest.hexdigest()[:16]
        return self._vocab_hash


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | Path):
        import sentencepiece

        self.name = str(path)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{path}: not a SentencePiece model ({str(exc).splitlines()[0][:120]})") from None
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() < 0:
            raise UserError(f"{path}: SentencePiece model has no EOS token (train it with eos_id >= 0)")
        self.eos_id = self.sp.eos_id()
        # A model trained without a pad piece pads with EOS: padded positions are masked out anyway.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode_with_offsets(self, text):
        proto = self.sp.encode(text, return_type="proto")
        # SentencePiece reports UTF-8 BYTE offsets into the original text; map them to characters.
        byte_to_char = _byte_to_char_map(text)
        ids = [piece.id for piece in proto.pieces]
        offsets = [(byte_to_char[piece.begin], byte_to_char[piece.end]) for piece in proto.pieces]
        return ids, offsets

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def pieces(self):
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]


class HFTokenizer(Tokenizer):
    """A `transformers` tokenizer read from a directory (or a tokenizer.json file), as the model was trained."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.name = str(path)
        self.tk = _read_pretrained(path)
        self.vocab_size = len(self.tk)
        vocab = self.tk.get_vocab()
        eos = _special_id(self.tk.eos_token_id, vocab, _HF_EOS_CANDIDATES)
        if eos is None:
            raise UserError(f"{path}: no end-of-sequence token found (looked for the tokenizer's eos_token "
                            f"and {', '.join(_HF_EOS_CANDIDATES)})")
        self.eos_id = eos
        pad = _special_id(self.tk.pad_token_id, vocab, _HF_PAD_CANDIDATES)
        self.pad_id = eos if pad is None else pad
        self.chat_template = self.tk.chat_template or None
        self.prompt_prefix = self._added_prefix()

    def _added_prefix(self) -> tuple[int, ...]:
        """The special tokens `tok(text)` puts before the text's own tokens (LLaMA's BOS; none for most)."""
        probe = "a"
        plain = self.tk(probe, add_special_tokens=False)["input_ids"]
        full = self.tk(probe)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return tuple(full[:start])
        return ()

    def encode(self, text):
        return list(self.tk(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, text, add_special_tokens=True):
        return list(self.tk(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_with_offsets(self, text):
        if not self.tk.is_fast:
            raise UserError(f"tokenizer {self.name} is a slow (Python) {type(self.tk).__name__}, which gives no "
                            f"character offsets; span priors need them (use a directory with tokenizer.json)")
        encoding = self.tk(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]

    def render_chat(self, messages):
        from jinja2 import TemplateError

        if not self.chat_template:
            return super().render_chat(messages)
        try:
            return self.tk.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (TemplateError, ValueError, TypeError) as exc:  # the template's own raise_exception included
            raise UserError(f"chat template of {self.name} failed: {_first_line(exc)}") from None

    def decode(self, ids):
        # no clean-up of spaces: decoding growing prefixes must give monotonic offsets (data/spans.py)
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def pieces(self):
        table = [""] * self.vocab_size
        for piece, token_id in self.tk.get_vocab().items():
            if token_id < self.vocab_size:
                table[token_id] = piece
        return table


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _special_id(configured: int | None, vocab: dict, candidates) -> int | None:
    """The tokenizer's own special token, else the first known candidate piece."""
    if configured is not None:
        return int(configured)
    for token in candidates:
        if token in vocab:
            return vocab[token]
    return None


def _check_json(file: Path, what: str) -> None:
    if not file.is_file():
        return
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not a Hugging Face {what} (invalid JSON: {_first_line(exc)})") from None


def _read_pretrained(path: Path):
    """`AutoTokenizer.from_pretrained` on a directory (no remote code, no downloads); a tokenizer.json
    file outside a tokenizer directory is read on its own. Failures are one line naming the path."""
    import transformers

    if path.is_file() and path.name != "tokenizer.json":
        _check_json(path, "tokenizer.json")
        try:
            return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as exc:  # noqa: BLE001 - the Rust side raises a bare Exception with a serde message
            raise UserError(f"{path}: not a Hugging Face tokenizer.json ({_first_line(exc)})") from None
    directory = path.parent if path.is_file() else path
    _check_json(directory / "tokenizer.json", "tokenizer.json")
    _check_json(directory / "tokenizer_config.json", "tokenizer_config.json")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False,
                                                          local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for unreadable directories
        raise UserError(f"{directory}: not a readable Hugging Face tokenizer ({_first_line(exc)})") from None


def _byte_to_char_map(text: str) -> list[int]:
    """byte offset -> character offset for the UTF-8 encoding of `text` (length len(bytes) + 1)."""
    mapping = []
    for char_index, char in enumerate(text):
        mapping.extend([char_index] * len(char.encode("utf-8", "surrogatepass")))
    mapping.append(len(text))
    return mapping


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """A SentencePiece `.model` file, or a Hugging Face tokenizer directory (or tokenizer.json file)."""
    if path is None:
        raise UserError("no tokenizer given (set data.tokenizer to a SentencePiece .model file or a "
                        "Hugging Face tokenizer directory)")
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer not found: {path}")
    if path.is_dir():
        if not has_tokenizer_files(path):
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise UserError(f"{path}: not a tokenizer directory (no {', '.join(VOCAB_FILES)}; found {found})")
        return HFTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, what_a: str = "teacher", what_b: str = "student") -> None:
    """Distillation compares distributions token by token: both models must use one vocabulary."""
    if a.vocab_size != b.vocab_size:
        raise UserError(f"{what_a} tokenizer {a.name} has vocab_size {a.vocab_size} but {what_b} tokenizer "
                        f"{b.name} has {b.vocab_size}: teacher and student must share one tokenizer")
    if a.vocab_hash() != b.vocab_hash():
        raise UserError(f"{what_a} tokenizer {a.name} and {what_b} tokenizer {b.name} have the same size "
                        f"({a.vocab_size}) but different vocabularies (hash {a.vocab_hash()} vs "
                        f"{b.vocab_hash()}): teacher and student must share one tokenizer")


def train_sentencepiece(texts, output_path: str | Path, vocab_size: int = 512, model_type: str = "bpe",
                        split_digits: bool = True, seed_sentencepiece_size: int = 100000) -> Path:
    """Train a SentencePiece model on an iterable of strings; writes `output_path` atomically.

    Ids 0..3 are pad, unk, bos, eos. `split_digits` makes every digit its own piece (numbers then have
    one spelling, which arithmetic-like data needs)."""
    import io

    import sentencepiece

    output_path = Path(output_path)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, split_digits=split_digits,
            byte_fallback=False, hard_vocab_limit=True, seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=2, minloglevel=2)
    except RuntimeError as exc:
        raise UserError(f"SentencePiece training failed: {str(exc).splitlines()[0][:200]}") from None
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".partial")
    tmp.write_bytes(model.getvalue())
    tmp.replace(output_path)
    return output_path
