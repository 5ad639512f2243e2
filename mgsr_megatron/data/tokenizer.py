"""Tokenizers: SentencePiece `.model` files and Hugging Face `tokenizer.json` directories, one interface.

    tok = load_tokenizer("runs/demo/tokenizer.model")     # or a directory holding tokenizer.json
    ids, offsets = tok.encode_with_offsets("sort 3 1 2")  # offsets[i] = (start, end) CHARACTER offsets
    tok.decode(ids); tok.eos_id; tok.pad_id; tok.vocab_size; tok.vocab_hash()

Teacher and student must share one tokenizer: `check_same_tokenizer` compares the vocabulary size and
a hash of the id -> piece table (the hash, not the file path, because the same vocabulary is often
stored twice, e.g. once per model directory).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mgsr_megatron.errors import UserError

# Special tokens that mean "end of sequence" in common Hugging Face vocabularies, most specific first.
_HF_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
_HF_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer:
    """Common interface. `encode` never adds BOS/EOS; the data pipeline appends `eos_id` to responses."""

    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def pieces(self) -> list[str]:
        """The vocabulary as a list indexed by id."""
        raise NotImplementedError

    def vocab_hash(self) -> str:
        """sha256 (first 16 hex digits) of the id -> piece table; equal hashes mean equal vocabularies."""
        digest = hashlib.sha256()
        for piece in self.pieces():
            digest.update(piece.encode("utf-8", "surrogatepass"))
            digest.update(b"\0")
        return digest.hexdigest()[:16]


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
    """A `tokenizers` tokenizer from `<dir>/tokenizer.json` (+ optional `tokenizer_config.json` for EOS/pad)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        self.name = str(path)
        try:
            self.tk = RustTokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception with a serde message
            raise UserError(f"{file}: not a Hugging Face tokenizer.json ({str(exc).splitlines()[0][:120]})") from None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        config = {}
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{config_file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        eos = self._special(config.get("eos_token"), _HF_EOS_CANDIDATES)
        if eos is None:
            raise UserError(f"{file}: no end-of-sequence token found (looked for tokenizer_config.json "
                            f"'eos_token' and {', '.join(_HF_EOS_CANDIDATES)})")
        self.eos_id = eos
        pad = self._special(config.get("pad_token"), _HF_PAD_CANDIDATES)
        self.pad_id = eos if pad is None else pad

    def _special(self, configured, candidates) -> int | None:
        if isinstance(configured, dict):  # {"content": "</s>", ...} in older configs
            configured = configured.get("content")
        for token in ([configured] if configured else []) + list(candidates):
            token_id = self.tk.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def encode_with_offsets(self, text):
        encoding = self.tk.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def decode(self, ids):
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def pieces(self):
        table = [""] * self.vocab_size
        for piece, token_id in self.tk.get_vocab(with_added_tokens=True).items():
            if token_id < self.vocab_size:
                table[token_id] = piece
        return table


def _byte_to_char_map(text: str) -> list[int]:
    """byte offset -> character offset for the UTF-8 encoding of `text` (length len(bytes) + 1)."""
    mapping = []
    for char_index, char in enumerate(text):
        mapping.extend([char_index] * len(char.encode("utf-8", "surrogatepass")))
    mapping.append(len(text))
    return mapping


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """A SentencePiece `.model` file, or a directory (or file) holding a Hugging Face `tokenizer.json`."""
    if path is None:
        raise UserError("no tokenizer given (set data.tokenizer to a SentencePiece .model file or a "
                        "directory holding tokenizer.json)")
    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer not found: {path}")
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise UserError(f"{path}: not a tokenizer directory (no tokenizer.json; found {found})")
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
