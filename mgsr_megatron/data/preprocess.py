"""Tokenize instruction JSONL once into Megatron indexed files (layout: data/indexed.py).

    stats = preprocess(["train.jsonl"], "data/demo", "tok.model", DataConfig(...), options=PreprocessOptions(workers=2))
    # -> data/demo.train.{bin,idx,spans.bin,spans.idx,rows.jsonl,json}, data/demo.valid.* (if any rows)

- Train/validation split: a row goes to validation when a hash of (split_seed, file number, line number)
  falls below `valid_fraction` — fixed by the seed, independent of worker count, chunking or bad lines.
- Overlong rows (counted, never silent): a prompt longer than `max_prompt_length` tokens is dropped, or
  with `overlong_policy=truncate` keeps its LAST max_prompt_length tokens (the response cue is at the
  end); a prompt+response longer than `max_length` is dropped, or truncated at the end of the response
  (then it has no EOS and spans are clipped).
- Restartable and atomic: rows are processed in chunks by worker processes; each finished chunk is a
  directory renamed into place under `<prefix>.tmp/`, so a restarted run re-uses finished chunks (the
  work directory is discarded when inputs or settings changed). The merged files are renamed into place
  and each split's `.json` metadata is written last; readers refuse a split without it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mgsr_megatron.config import DataConfig
from mgsr_megatron.data.formats import ReadStats, chat_renderer, read_jsonl
from mgsr_megatron.data.indexed import FORMAT_VERSION, token_dtype
from mgsr_megatron.data.spans import clean_spans, get_span_extractor
from mgsr_megatron.data.tokenizer import load_tokenizer
from mgsr_megatron.errors import UserError

SPLITS = ("train", "valid")
OVERLONG_POLICIES = ("drop", "truncate")


@dataclass(frozen=True, kw_only=True)
class PreprocessOptions:
    """How `preprocess` runs, not what it writes: worker processes, rows per restartable chunk (part of
    the work directory's fingerprint), the progress bar, where messages go."""

    workers: int = 2
    chunk_rows: int = 1000
    progress: bool = True
    log: Callable[[str], object] = print


@dataclass
class PreprocessStats:
    rows: int = 0
    bad_lines: int = 0
    samples: dict = field(default_factory=lambda: {"train": 0, "valid": 0})
    tokens: int = 0  # prompt + response tokens written
    prompt_truncated: int = 0
    prompt_dropped: int = 0
    response_truncated: int = 0
    length_dropped: int = 0
    chunks_reused: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def add(self, other: dict) -> None:
        self.chunks_reused += int(other.get("reused", False))
        for key in ("tokens", "prompt_truncated", "prompt_dropped", "response_truncated", "length_dropped"):
            setattr(self, key, getattr(self, key) + other[key])
        for split in SPLITS:
            self.samples[split] += other["samples"][split]

    def summary(self) -> str:
        return (f"{self.rows} rows -> {self.samples['train']} train / {self.samples['valid']} valid samples, "
                f"{self.tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_second:,.0f} tokens/s); "
                f"bad lines skipped {self.bad_lines}, prompts truncated {self.prompt_truncated} / dropped "
                f"{self.prompt_dropped}, responses truncated {self.response_truncated}, too long dropped "
                f"{self.length_dropped}" + (f", {self.chunks_reused} chunks re-used" if self.chunks_reused else ""))


def is_valid_row(split_seed: int, file_number: int, line_number: int, valid_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{split_seed}:{file_number}:{line_number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64 < valid_fraction


def tokenize_example(example, tokenizer, extractor, cfg: DataConfig, counts: dict):
    """(prompt_ids, response_ids, spans) or None when the overlong policy drops the row; updates counts."""
    prompt_ids = tokenizer.encode_prompt(example.prompt, add_special_tokens=not example.chat_templated)
    if len(prompt_ids) > cfg.max_prompt_length:
        if cfg.overlong_policy == "drop":
            counts["prompt_dropped"] += 1
            return None
        prompt_ids = tokenizer.truncate_prompt(prompt_ids, cfg.max_prompt_length)
        counts["prompt_truncated"] += 1
    if example.response is None:  # prompt-only row
        if len(prompt_ids) >= cfg.max_length:
            counts["length_dropped"] += 1
            return None
        return prompt_ids, [], []
    response_ids, offsets = tokenizer.encode_with_offsets(example.response)
    spans = extractor(example.response, offsets)
    response_ids = response_ids + [tokenizer.eos_id]
    room = cfg.max_length - len(prompt_ids)
    if len(response_ids) > room:
        if cfg.overlong_policy == "drop" or room < 1:
            counts["length_dropped"] += 1
            return None
        response_ids = response_ids[:room]
        spans = clean_spans([(start, min(end, room)) for start, end in spans])
        counts["response_truncated"] += 1
    return prompt_ids, response_ids, spans


# ---- worker side -------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, cfg_dict: dict) -> None:
    cfg = DataConfig(**cfg_dict)
    _WORKER.update(tokenizer=load_tokenizer(tokenizer_path), extractor=get_span_extractor(cfg.span_extractor),
                   cfg=cfg)


def _process_chunk(task) -> dict:
    """Worker: tokenize one chunk (only tokenizer libraries are imported here, not Megatron)."""
    chunk_dir, rows = task
    if chunk_dir.is_dir():  # finished by an earlier, interrupted run
        counts = json.loads((chunk_dir / "stats.json").read_text())
        counts.update(rows_in=len(rows), reused=True)
        return counts
    tokenizer, extractor, cfg = _WORKER["tokenizer"], _WORKER["extractor"], _WORKER["cfg"]
    counts = {"tokens": 0, "prompt_truncated": 0, "prompt_dropped": 0, "response_truncated": 0,
              "length_dropped": 0, "samples": {s: 0 for s in SPLITS}}
    samples = []
    for split, example in rows:
        result = tokenize_example(example, tokenizer, extractor, cfg, counts)
        if result is None:
            continue
        prompt_ids, response_ids, spans = result
        references = ([example.response] if example.response is not None else []) + example.references
        row = {"source": example.source, "family": example.family, "prompt": example.prompt, "references": references}
        samples.append((split, prompt_ids, response_ids, spans, row))
        counts["samples"][split] += 1
        counts["tokens"] += len(prompt_ids) + len(response_ids)
    counts.update(rows_in=len(rows), reused=False, chunk_dir=str(chunk_dir), samples_data=samples)
    return counts


def write_chunk(result: dict, vocab_size: int) -> None:
    """Main process: write one tokenized chunk as shard files; its directory appears only when complete."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    chunk_dir = Path(result.pop("chunk_dir"))
    samples = result.pop("samples_data")
    partial = Path(str(chunk_dir) + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    dtype = token_dtype(vocab_size)
    writers = {}
    for split, prompt_ids, response_ids, spans, row in samples:
        if split not in writers:
            writers[split] = (IndexedDatasetBuilder(str(partial / f"{split}.bin"), dtype=dtype),
                              IndexedDatasetBuilder(str(partial / f"{split}.spans.bin"), dtype=np.int32),
                              open(partial / f"{split}.rows.jsonl", "w", encoding="utf-8"))
        tokens, span_table, row_file = writers[split]
        tokens.add_document(np.array(prompt_ids + response_ids, dtype=np.int64), [len(prompt_ids), len(response_ids)])
        span_table.add_document(np.array([x for span in spans for x in span], dtype=np.int64), [2 * len(spans)])
        row_file.write(json.dumps(row, ensure_ascii=False) + "\n")
    for split, (tokens, span_table, row_file) in writers.items():
        tokens.finalize(str(partial / f"{split}.idx"))
        span_table.finalize(str(partial / f"{split}.spans.idx"))
        row_file.close()
    stored = {k: v for k, v in result.items() if k not in ("rows_in", "reused")}
    (partial / "stats.json").write_text(json.dumps(stored))
    os.replace(partial, chunk_dir)


# ---- driver ------------------------------------------------------------------------------------------

def _fingerprint(inputs, tokenizer, cfg: DataConfig, prompts_only: bool, chunk_rows: int) -> str:
    files = [(str(Path(p).resolve()), os.path.getsize(p), os.path.getmtime(p)) for p in inputs]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("train_path", "valid_path", "tokenizer")}
    # how prompts are encoded belongs to the tokenizer too: its BOS and its chat template
    encoding = [tokenizer.vocab_hash(), list(tokenizer.prompt_prefix), str(tokenizer.chat_template)]
    blob = json.dumps([files, encoding, settings, prompts_only, chunk_rows, FORMAT_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _count_lines(paths) -> int:
    total = 0
    for path in paths:
        with open(path, "rb") as stream:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: stream.read(1 << 20), b""))
    return total


def _check_not_empty(path: str) -> None:
    """An input without a single row is a mistake (a failed export, the wrong file), not zero samples."""
    with open(path, "rb") as stream:
        if any(line.strip() for line in stream):
            return
    raise UserError(f"{path}: empty input file (no JSONL rows)")


def _validate(cfg: DataConfig) -> None:
    if cfg.overlong_policy not in OVERLONG_POLICIES:
        raise UserError(f"data.overlong_policy: '{cfg.overlong_policy}' (expected drop | truncate)")
    if not 0.0 <= cfg.valid_fraction < 1.0:
        raise UserError(f"data.valid_fraction: {cfg.valid_fraction} (expected 0 <= fraction < 1)")
    if cfg.max_prompt_length < 1 or cfg.max_length <= 1:
        raise UserError("data.max_prompt_length and data.max_length must be positive (max_length > 1)")


def preprocess(inputs, output_prefix, tokenizer_path, cfg: DataConfig | None = None, *, prompts_only: bool = False,
               options: PreprocessOptions | None = None) -> PreprocessStats:
    """Tokenize JSONL `inputs` into `<output_prefix>.{train,valid}.*`; returns the counts and throughput.
    `prompts_only`: rows without a response are kept (prompts for generation)."""
    options = options or PreprocessOptions()
    workers, chunk_rows, progress, log = options.workers, options.chunk_rows, options.progress, options.log
    cfg = cfg or DataConfig()
    _validate(cfg)
    inputs = [str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    for path in inputs:
        if not os.path.isfile(path):
            raise UserError(f"data file not found: {path}")
        _check_not_empty(path)
    tokenizer = load_tokenizer(tokenizer_path)
    get_span_extractor(cfg.span_extractor)  # a bad extractor spec fails here, not in a worker
    output_prefix = str(output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(output_prefix + ".tmp")
    fingerprint = _fingerprint(inputs, tokenizer, cfg, prompts_only, chunk_rows)
    fingerprint_file = workdir / "fingerprint"
    if workdir.exists() and (not fingerprint_file.is_file() or fingerprint_file.read_text() != fingerprint):
        shutil.rmtree(workdir)  # inputs or settings changed: earlier chunks are stale
    workdir.mkdir(parents=True, exist_ok=True)
    fingerprint_file.write_text(fingerprint)

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (seconds of imports: keep them out of the timing)

    stats = PreprocessStats()
    read_stats = ReadStats()
    start = time.perf_counter()

    def examples():
        for file_number, path in enumerate(inputs):
            for example in read_jsonl(path, cfg.format, cfg.prompt_template, cfg.skip_bad_lines, prompts_only,
                                      read_stats, chat=chat_renderer(tokenizer)):
                line_number = int(example.source.rsplit(":", 1)[1])
                held_out = is_valid_row(cfg.split_seed, file_number, line_number, cfg.valid_fraction)
                split = "valid" if held_out else "train"
                yield split, example

    chunk_dirs = []

    def tasks():
        rows = []
        for item in examples():
            rows.append(item)
            if len(rows) == chunk_rows:
                yield from emit(rows)
                rows = []
        if rows:
            yield from emit(rows)

    def emit(rows):
        chunk_dir = workdir / f"chunk{len(chunk_dirs):06d}"
        chunk_dirs.append(chunk_dir)
        yield chunk_dir, rows

    from tqdm import tqdm

    bar = tqdm(total=_count_lines(inputs), unit="rows", desc="tokenizing", disable=not progress,
               mininterval=0.5)
    init_args = (str(tokenizer_path), asdict(cfg))
    if workers <= 1:
        _init_worker(*init_args)
        for task in tasks():
            result = _process_chunk(task)
            if not result["reused"]:
                write_chunk(result, tokenizer.vocab_size)
            stats.add(result)
            bar.update(result["rows_in"])
    else:
        with multiprocessing.get_context("fork").Pool(workers, _init_worker, init_args) as pool:
            # imap keeps chunk order for the merge; the parse of the next chunks overlaps the workers.
            for result in pool.imap(_process_chunk, tasks()):
                if not result["reused"]:
                    write_chunk(result, tokenizer.vocab_size)
                stats.add(result)
                bar.update(result["rows_in"])
    bar.close()
    stats.rows, stats.bad_lines = read_stats.rows, read_stats.bad_lines
    if read_stats.bad_lines:
        log(f"skipped {read_stats.bad_lines} bad lines; first: {read_stats.first_bad}")
    _merge_and_publish(chunk_dirs, workdir, output_prefix, tokenizer, cfg, stats, prompts_only)
    stats.seconds = time.perf_counter() - start
    shutil.rmtree(workdir)
    return stats


def _append_shard(builder, prefix: str) -> None:
    """`IndexedDatasetBuilder.add_index` without its `gc.collect()` per call, which costs ~1 s each in a
    process holding torch and Megatron (it dominated the run time): append the shard's index entries
    and copy its data bytes."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    index = _IndexReader(prefix + ".idx", multimodal=False)
    if index.dtype != builder.dtype:
        raise UserError(f"{prefix}.idx holds {index.dtype.__name__} tokens, expected {builder.dtype.__name__}")
    offset = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(index.sequence_lengths.tolist())
    builder.document_indices.extend((offset + index.document_indices[1:]).tolist())
    del index
    with open(prefix + ".bin", "rb") as stream:
        shutil.copyfileobj(stream, builder.data_file)


def _merge_and_publish(chunk_dirs, workdir, output_prefix, tokenizer, cfg, stats, prompts_only) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = token_dtype(tokenizer.vocab_size)
    for split in SPLITS:
        final = f"{output_prefix}.{split}"
        meta_path = Path(final + ".json")
        if meta_path.exists():
            meta_path.unlink()  # readers refuse the split until the new metadata is written
        if stats.samples[split] == 0:
            continue
        merged = workdir / f"merged.{split}"
        tokens = IndexedDatasetBuilder(str(merged) + ".bin", dtype=dtype)
        span_table = IndexedDatasetBuilder(str(merged) + ".spans.bin", dtype=np.int32)
        with open(str(merged) + ".rows.jsonl", "wb") as rows_out:
            for chunk_dir in chunk_dirs:
                if not (chunk_dir / f"{split}.idx").is_file():
                    continue
                _append_shard(tokens, str(chunk_dir / split))
                _append_shard(span_table, str(chunk_dir / f"{split}.spans"))
                with open(chunk_dir / f"{split}.rows.jsonl", "rb") as rows_in:
                    shutil.copyfileobj(rows_in, rows_out)
        tokens.finalize(str(merged) + ".idx")
        span_table.finalize(str(merged) + ".spans.idx")
        for suffix in (".bin", ".idx", ".spans.bin", ".spans.idx", ".rows.jsonl"):
            os.replace(str(merged) + suffix, final + suffix)
        meta = {
            "format_version": FORMAT_VERSION,
            "samples": stats.samples[split],
            "bin_bytes": os.path.getsize(final + ".bin"),
            "spans_bin_bytes": os.path.getsize(final + ".spans.bin"),
            "tokenizer": {"path": str(tokenizer.name), "vocab_size": tokenizer.vocab_size,
                          "vocab_hash": tokenizer.vocab_hash(), "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
            "prompts_only": prompts_only,
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("train_path", "valid_path")},
            "counts": {k: getattr(stats, k) for k in ("rows", "bad_lines", "prompt_truncated", "prompt_dropped",
                                                      "response_truncated", "length_dropped")},
        }
        tmp = meta_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)
