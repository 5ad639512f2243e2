"""The preprocessed instruction dataset on disk (Megatron-Core indexed files) and its readers.

A split prefix P (e.g. `data/demo.train`) is these files, written by `tools/preprocess_data.py`:

    P.bin / P.idx              megatron.core.datasets IndexedDataset: one DOCUMENT per sample holding
                               two sequences, the prompt ids and the response ids (the response ends with
                               EOS unless it was truncated; it is empty for prompt-only rows)
    P.spans.bin / P.spans.idx  one sequence per sample: span token ranges flattened [s0, e0, s1, e1, ...],
                               half-open [s, e), RELATIVE TO THE FIRST RESPONSE TOKEN, sorted,
                               non-overlapping, e - s >= 2
    P.rows.jsonl               one line per sample: source ("file:line"), family, prompt text and the
                               reference responses (for evaluation and the prompts-only view)
    P.json                     metadata, written LAST: sample/token counts, byte sizes of both .bin files,
                               the tokenizer's vocab_size / vocab_hash / eos_id / pad_id, the settings

Opening checks that the index matches its data file (sizes, document structure, sample counts), so a
stale or truncated .bin/.idx pair is an error at start-up, not garbage in a batch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgsr_megatron.errors import UserError

FORMAT_VERSION = 1


@dataclass
class Sample:
    prompt_ids: np.ndarray  # int64 [P]
    response_ids: np.ndarray  # int64 [R]
    spans: list  # [(start, end)] half-open, relative to the response


def token_dtype(vocab_size: int):
    """The smallest numpy dtype that holds every id (Megatron's own choice rule)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _open_indexed(prefix: str, expected_bytes: int | None):
    """Open a Megatron IndexedDataset, turning its asserts into one-line errors and checking sizes."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, IndexedDataset

    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise UserError(f"preprocessed data file missing: {path}")
    with open(idx_path, "rb") as stream:
        if stream.read(len(_INDEX_HEADER)) != _INDEX_HEADER:
            raise UserError(f"{idx_path}: not a valid Megatron index file (bad header)")
    try:
        # numpy cannot mmap an empty file (a split without any span has an empty spans .bin)
        dataset = IndexedDataset(prefix, mmap=os.path.getsize(bin_path) > 0)
    except (AssertionError, ValueError, struct.error) as exc:
        raise UserError(f"{idx_path}: not a valid Megatron index file ({str(exc) or type(exc).__name__})") from None
    index = dataset.index
    described = int(index.sequence_lengths.astype(np.int64).sum()) * index.dtype_size
    actual = os.path.getsize(bin_path)
    if described != actual or (expected_bytes is not None and actual != expected_bytes):
        raise UserError(f"{idx_path} does not match {bin_path}: the index describes {described} bytes, "
                        f"the data file has {actual}" + (f" (metadata says {expected_bytes})"
                                                         if expected_bytes is not None else "")
                        + "; re-run tools/preprocess_data.py")
    return dataset


class InstructionDataset:
    """Random access to preprocessed samples: `ds[i] -> Sample`; `len(ds)`; `ds.meta`; `ds.rows(i)`.

    Pass the tokenizer that will be used for training to check it is the one the data was made with.
    """

    def __init__(self, prefix: str | Path, tokenizer=None):
        self.prefix = str(prefix)
        meta_path = Path(self.prefix + ".json")
        if not meta_path.is_file():
            raise UserError(f"{meta_path} not found: {self.prefix} is not a preprocessed dataset "
                            f"(or its preprocessing did not finish; re-run tools/preprocess_data.py)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{meta_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{meta_path}: format_version {self.meta.get('format_version')!r}, expected "
                            f"{FORMAT_VERSION}; re-run tools/preprocess_data.py")
        self.num_samples = int(self.meta["samples"])
        self.tokens = _open_indexed(self.prefix, self.meta["bin_bytes"])
        self.span_table = _open_indexed(self.prefix + ".spans", self.meta["spans_bin_bytes"])
        document_indices = self.tokens.document_indices
        if (len(self.tokens) != 2 * self.num_samples or len(document_indices) != self.num_samples + 1
                or np.any(np.diff(document_indices) != 2)):
            raise UserError(f"{self.prefix}.idx does not match {meta_path}: {len(self.tokens)} sequences in "
                            f"{len(document_indices) - 1} documents, expected {self.num_samples} samples of "
                            f"2 sequences (prompt, response)")
        if len(self.span_table) != self.num_samples:
            raise UserError(f"{self.prefix}.spans.idx does not match {meta_path}: {len(self.span_table)} "
                            f"span rows, expected {self.num_samples}")
        if tokenizer is not None:
            recorded = self.meta["tokenizer"]
            if (recorded["vocab_size"], recorded["vocab_hash"]) != (tokenizer.vocab_size, tokenizer.vocab_hash()):
                raise UserError(f"{self.prefix} was tokenized with a different tokenizer (vocab_size "
                                f"{recorded['vocab_size']}, hash {recorded['vocab_hash']}) than {tokenizer.name} "
                                f"(vocab_size {tokenizer.vocab_size}, hash {tokenizer.vocab_hash()}); "
                                f"re-run tools/preprocess_data.py")
        self._rows = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        prompt = np.asarray(self.tokens[2 * i], dtype=np.int64)
        response = np.asarray(self.tokens[2 * i + 1], dtype=np.int64)
        flat = np.asarray(self.span_table[i], dtype=np.int64)
        spans = [(int(flat[k]), int(flat[k + 1])) for k in range(0, len(flat), 2)]
        return Sample(prompt_ids=prompt, response_ids=response, spans=spans)

    def row(self, i: int) -> dict:
        """Text metadata of sample i: source, family, prompt, references."""
        if self._rows is None:
            with open(self.prefix + ".rows.jsonl", encoding="utf-8") as stream:
                self._rows = [json.loads(line) for line in stream]
            if len(self._rows) != self.num_samples:
                raise UserError(f"{self.prefix}.rows.jsonl has {len(self._rows)} rows, expected {self.num_samples}")
        return self._rows[i]


@dataclass
class PromptItem:
    prompt_ids: np.ndarray
    prompt: str
    references: list
    family: str
    source: str = ""  # "file:line" of the row, for messages about it


class PromptDataset:
    """Prompts-only view for on-policy generation and evaluation: `ds[i] -> PromptItem`.

    Built from a preprocessed split (`PromptDataset.from_indexed`) or straight from a JSONL file of
    prompts with optional responses/references (`PromptDataset.from_jsonl`, e.g. the demo's eval set).
    """

    def __init__(self, items: list[PromptItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]

    @classmethod
    def from_indexed(cls, dataset: InstructionDataset) -> PromptDataset:
        items = []
        for i in range(len(dataset)):
            row = dataset.row(i)
            items.append(PromptItem(dataset[i].prompt_ids, row["prompt"], row["references"], row["family"]))
        return cls(items)

    @classmethod
    def from_jsonl(cls, path, tokenizer, data_cfg) -> PromptDataset:
        """Rows in any supported format; the response (if any) and `references` become the references.
        Prompts are encoded as in preprocessing (the tokenizer's BOS, its chat template for `messages`);
        longer than `max_prompt_length`, they keep their last tokens (the response cue sits at the end)."""
        from mgsr_megatron.data.formats import chat_renderer, read_jsonl

        items = []
        for example in read_jsonl(path, data_cfg.format, data_cfg.prompt_template, data_cfg.skip_bad_lines,
                                  prompts_only=True, chat=chat_renderer(tokenizer)):
            ids = tokenizer.encode_prompt(example.prompt, add_special_tokens=not example.chat_templated)
            ids = tokenizer.truncate_prompt(ids, data_cfg.max_prompt_length)
            references = ([example.response] if example.response is not None else []) + example.references
            items.append(PromptItem(np.asarray(ids, dtype=np.int64), example.prompt, references, example.family,
                                    example.source))
        return cls(items)
