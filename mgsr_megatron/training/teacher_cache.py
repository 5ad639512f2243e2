"""Offline top-K teacher cache for ground-truth epochs (`mgsr cache-teacher`, config `teacher.cache`).

`write_cache` runs the teacher once over the preprocessed ground-truth split (data.train_path, the rows
TrainingData samples) and stores, for every response token (loss_mask = 1), the teacher's top-K
log-probabilities at mgsr.temperature, their token ids, the log of the remaining mass and the entropy:

    DIR/manifest.json              format_version, k, temperature, vocab_size, rows, tokens, rows_per_shard,
                                   shards [{index, rows [a, b), tokens [t0, t1)}], teacher {path,
                                   manifest_sha256, provenance}, tokenizer_hash, data {path, idx_sha256,
                                   bin_bytes}; written last
    DIR/row_offsets.npy            int64 [rows + 1]: the cache's token range of dataset row i is
                                   [row_offsets[i], row_offsets[i + 1]) (prompt-only rows: empty)
    DIR/shard_NNNNN.logp.npy       uint16 [T_s, K]: float16 BITS of log p (sorted descending)
    DIR/shard_NNNNN.ids.npy        int32 [T_s, K]: the token ids of those log-probs
    DIR/shard_NNNNN.rest.npy       uint16 [T_s]: float16 bits of log(1 - sum_k p_k) (VALUE_FLOOR when K = V)
    DIR/shard_NNNNN.entropy.npy    float32 [T_s]: H(P) of the full distribution at mgsr.temperature

Shard s holds dataset rows [s * rows_per_shard, (s + 1) * rows_per_shard) and tokens in row order, then
position order; every .npy opens with np.load(mmap_mode="r"). The uint16 arrays are the raw bits of
16-bit floats (torch.from_numpy(a.view(np.int16)).view(torch.float16)): float16, not bfloat16, because
log-probabilities lie in [VALUE_FLOOR, 0], inside float16's range, where its 3 more mantissa bits cut the
rounding of p 8x (with bfloat16 values, 6 learned-mode training steps from the cache drifted from the
online teacher by 1.1e-4 relative, with float16 by 4e-6; same bytes). Format 1 caches (bfloat16 values)
are still read. The files do not depend on
the teacher's layout (TP/PP/DP): top-K comes from losses/vocab_parallel.global_topk (local top-K, one
all-gather, merge), the log-sum-exps from its max/sum all-reduces, and shards are split by rows.
Written atomically: a temporary sibling directory renamed into place at the end.

Training (`teacher.cache: DIR`): ground-truth micro-batches carry their dataset row ids and
`dense_teacher_logits` turns the cached rows into a dense vocab-parallel tensor the losses accept: the
top-K ids hold T * log p_k, every other id T * log(rest / (V - K)) (the tail spread uniformly), so
softmax(tensor / T) is the cached distribution; with it comes the stored H(P) per position, which DAC-KL's
learned mode gives ClipNet (the rebuild's own entropy is larger: its tail is uniform). docs/losses.md
("Teacher cache") states what is exact. The DeepSpeed engine reads it too: one shard (tp_rank 0) over the
tokenizer's vocabulary, which must be the cache's vocab_size.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from mgsr_megatron.errors import UserError

FORMAT_VERSION = 2
VALUE_DTYPES = {1: torch.bfloat16, 2: torch.float16}  # format version -> the dtype of the stored values
VALUE_FLOOR = -65504.0  # float16's lowest finite value: log p below it (p = 0 in float32 anyway) is clamped
MANIFEST = "manifest.json"
ROW_OFFSETS = "row_offsets.npy"
FIELD = "teacher.cache"


# --------------------------------------------------------------------------------------------------
# Fingerprints and the manifest.

def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(train_path: str) -> dict:
    """The ground-truth split the cache was made from: its index file's SHA-256 and the data file's size
    (the .bin is not hashed: checking it at every launch would read the whole dataset)."""
    idx, binary = Path(train_path + ".idx"), Path(train_path + ".bin")
    if not idx.is_file() or not binary.is_file():
        raise UserError(f"preprocessed data file missing: {idx if not idx.is_file() else binary}")
    return {"path": str(train_path), "idx_sha256": sha256_file(idx), "bin_bytes": binary.stat().st_size}


def teacher_fingerprint(load: str) -> dict:
    from mgsr_megatron.models.checkpoint import read_provenance, resolve_checkpoint

    directory = resolve_checkpoint(load)
    manifest = directory / "manifest.json"
    return {"path": str(directory.resolve()),
            "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
            "provenance": read_provenance(directory)}


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{FIELD}={directory}: no {MANIFEST} (not a teacher cache, or `mgsr cache-teacher` "
                        f"did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{FIELD}: {path} is not valid JSON (damaged cache)") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in VALUE_DTYPES:
        raise UserError(f"{FIELD}: {path} has format_version "
                        f"{manifest.get('format_version') if isinstance(manifest, dict) else None!r}, "
                        f"expected one of {sorted(VALUE_DTYPES)}; re-run mgsr cache-teacher")
    return manifest


def needed_k(mgsr) -> int:
    """The teacher candidates DAC-KL reads: the band's, and ClipNet's features when learned."""
    return max(mgsr.k_band, mgsr.k_feat if mgsr.dac_mode == "learned" else 0)


def check_cache_config(cfg) -> dict:
    """Config.validate's checks of `teacher.cache` (the deepspeed engine's: settings.resolve_models), before any
    process group or model: the manifest exists, it holds enough candidates for DAC-KL, at the same temperature,
    for this tokenizer, data and vocabulary. Returns the manifest."""
    from mgsr_megatron.data.tokenizer import load_tokenizer

    directory = cfg.teacher.cache
    if cfg.student.cache is not None:
        raise UserError("student.cache is not a setting: the teacher cache is teacher.cache")
    manifest = read_manifest(directory)
    k = int(manifest["k"])
    if cfg.mgsr.w_dac and cfg.mgsr.dac_mode == "off":
        raise UserError(f"{FIELD}: mgsr.dac_mode=off (a full-vocabulary divergence) cannot use a top-K cache; "
                        f"use dac_mode learned or fixed, or unset {FIELD}")
    if cfg.mgsr.w_dac and k < needed_k(cfg.mgsr):
        raise UserError(f"{FIELD}: the cache holds top-{k} but DAC-KL needs "
                        f"max(mgsr.k_band, mgsr.k_feat) = {needed_k(cfg.mgsr)} candidates; re-run mgsr "
                        f"cache-teacher with --top-k {needed_k(cfg.mgsr)}")
    if float(manifest["temperature"]) != float(cfg.mgsr.temperature):
        raise UserError(f"{FIELD}: the cache was written at temperature {manifest['temperature']} but "
                        f"mgsr.temperature={cfg.mgsr.temperature}")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.deepspeed.enabled:  # its logits are cut to the tokenizer's vocabulary (deepspeed_engine/engine.py)
        if int(manifest["vocab_size"]) != tokenizer.vocab_size:
            raise UserError(f"{FIELD}: the cache has vocab_size {manifest['vocab_size']} but the deepspeed engine's "
                            f"logits have the {tokenizer.vocab_size} ids of data.tokenizer={cfg.data.tokenizer}")
    elif int(manifest["vocab_size"]) != cfg.teacher.vocab_size:
        raise UserError(f"{FIELD}: the cache has vocab_size {manifest['vocab_size']} but "
                        f"teacher.vocab_size={cfg.teacher.vocab_size}")
    if manifest["tokenizer_hash"] != tokenizer.vocab_hash():
        raise UserError(f"{FIELD}: the cache was written with tokenizer hash {manifest['tokenizer_hash']} but "
                        f"data.tokenizer {cfg.data.tokenizer} has hash {tokenizer.vocab_hash()}")
    if not cfg.data.train_path:
        raise UserError(f"{FIELD} is set but data.train_path is not")
    data = data_fingerprint(cfg.data.train_path)
    if (manifest["data"]["idx_sha256"], manifest["data"]["bin_bytes"]) != (data["idx_sha256"], data["bin_bytes"]):
        raise UserError(f"{FIELD}: the cache was written for other data (index sha256 "
                        f"{manifest['data']['idx_sha256'][:16]}..., {manifest['data']['bin_bytes']} bytes) than "
                        f"data.train_path={cfg.data.train_path} (sha256 {data['idx_sha256'][:16]}..., "
                        f"{data['bin_bytes']} bytes); re-run mgsr cache-teacher")
    if cfg.loads_teacher and manifest.get("teacher"):
        check = check_same_hf_teacher if cfg.deepspeed.enabled else check_same_teacher
        check(manifest["teacher"], cfg.teacher.load)
    return manifest


def check_same_teacher(recorded: dict, load: str) -> None:
    """A generating schedule loads the teacher as well: its generated rows and the cached ground-truth rows
    must come from one teacher. Compared: the checkpoint's manifest hash and provenance (not its path, so a
    copied checkpoint still matches)."""
    current = teacher_fingerprint(load)
    if (recorded.get("manifest_sha256"), recorded.get("provenance")) != \
            (current["manifest_sha256"], current["provenance"]):
        raise UserError(f"{FIELD}: the cache was written by the teacher at {recorded.get('path')}, not by "
                        f"teacher.load={load} (its checkpoint manifest or provenance differs); re-run mgsr "
                        f"cache-teacher with this teacher")


def check_same_hf_teacher(recorded: dict, load: str) -> None:
    """check_same_teacher for the deepspeed engine, whose teacher.load is a Hugging Face directory: the cache's
    teacher must be an import of that directory (conversion.import_hf records its path in the provenance; no
    weight hash exists to compare, so a copied directory is refused)."""
    source = ((recorded.get("provenance") or {}).get("import") or {}).get("source")
    if source is None or Path(source).resolve() != Path(load).resolve():
        raise UserError(f"{FIELD}: the cache was written by the teacher at {recorded.get('path')} (imported from "
                        f"{source}), not by an import of teacher.load={load}; re-run mgsr cache-teacher with this "
                        f"teacher imported by tools/convert_checkpoint.py")


# --------------------------------------------------------------------------------------------------
# Top-K statistics of vocab-parallel rows.

def value_bits(values: torch.Tensor) -> np.ndarray:
    """The stored form of log-probabilities: float16 bits (clamped at VALUE_FLOOR: no -inf)."""
    return values.clamp(min=VALUE_FLOOR).to(torch.float16).view(torch.int16).cpu().numpy().view(np.uint16)


def from_value_bits(bits: np.ndarray, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """float32 values from the stored bits of `dtype` (VALUE_DTYPES of the cache's format version)."""
    return torch.from_numpy(np.array(bits).view(np.int16)).view(dtype).float()


def topk_rows(rows: torch.Tensor, k: int, temperature: float, shard):
    """For [n, V/TP] teacher logits (padded columns -inf): (log p of the global top-k [n, k] float64,
    their ids [n, k], log of the remaining mass [n] float64, entropy [n] float64), at `temperature`.
    The remaining mass is a log-sum-exp over the non-top-k columns (no 1 - sum cancellation)."""
    from mgsr_megatron.losses.vocab_parallel import (
        NEG_LARGE,
        _local_columns,
        global_topk,
        log_softmax_stats,
        scaled_rows,
    )

    scaled = scaled_rows(rows, temperature)
    (lse,), (entropy,) = log_softmax_stats([scaled], shard, entropy_of=(0,))
    # raw logits in the packets, divided in float64 (as DAC-KL does: exactly the loss's log-probs)
    top_raw, ids = global_topk(scaled, k, shard, report=rows)
    log_p = top_raw.double() / temperature - lse[:, None]
    local, owned = _local_columns(ids, shard)
    hit = torch.zeros_like(scaled).scatter_add_(-1, local, owned.float())
    scaled.masked_fill_(hit > 0, NEG_LARGE)
    (lse_rest,), _ = log_softmax_stats([scaled], shard)
    return log_p, ids, lse_rest - lse, entropy


# --------------------------------------------------------------------------------------------------
# Writing.

def _write_shard_arrays(directory: Path, index: int, tokens: int, k: int) -> dict:
    from numpy.lib.format import open_memmap

    stem = directory / f"shard_{index:05d}"
    return {"logp": open_memmap(f"{stem}.logp.npy", mode="w+", dtype=np.uint16, shape=(tokens, k)),
            "ids": open_memmap(f"{stem}.ids.npy", mode="w+", dtype=np.int32, shape=(tokens, k)),
            "rest": open_memmap(f"{stem}.rest.npy", mode="w+", dtype=np.uint16, shape=(tokens,)),
            "entropy": open_memmap(f"{stem}.entropy.npy", mode="w+", dtype=np.float32, shape=(tokens,))}


def write_cache(cfg, output: str | Path, top_k: int | None = None, rows_per_shard: int = 4096) -> dict:
    """Run the teacher over data.train_path at the config's TP/PP/DP layout and write the cache to `output`
    (the last pipeline stage's TP rank 0 of each DP replica writes its shards). Returns the manifest (on
    every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mgsr_megatron import parallel, platform
    from mgsr_megatron.config import validate
    from mgsr_megatron.data.collate import collate
    from mgsr_megatron.data.indexed import InstructionDataset
    from mgsr_megatron.data.tokenizer import load_tokenizer
    from mgsr_megatron.losses.vocab_parallel import shard_of
    from mgsr_megatron.models import build_teacher, mask_padded_logits
    from mgsr_megatron.models.checkpoint import (
        check_teacher_provenance,
        check_tokenizer_hash,
        load_model,
        replace_directory,
    )
    from mgsr_megatron.models.pipeline import forward_logits

    cfg.teacher.cache = None  # the cache being written is not an input
    validate(cfg)
    if not cfg.teacher.load:
        raise UserError("mgsr cache-teacher: teacher.load is not set (the teacher's checkpoint directory)")
    if not cfg.data.train_path:
        raise UserError("mgsr cache-teacher: data.train_path is not set (a prefix written by tools/preprocess_data.py)")
    k = needed_k(cfg.mgsr) if top_k is None else int(top_k)
    vocab = cfg.teacher.vocab_size
    if not 1 <= k < vocab:
        raise UserError(f"mgsr cache-teacher: --top-k {k} must be in [1, teacher.vocab_size={vocab})")
    if rows_per_shard < 1:
        raise UserError(f"mgsr cache-teacher: --rows-per-shard {rows_per_shard} must be >= 1")
    temperature = float(cfg.mgsr.temperature)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size != vocab:
        raise UserError(f"tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens but "
                        f"teacher.vocab_size={vocab}")
    check_teacher_provenance(cfg.teacher.load, cfg.teacher.allow_untrained)
    check_tokenizer_hash(cfg.teacher.load, tokenizer, "teacher.load")
    dataset = InstructionDataset(cfg.data.train_path, tokenizer)
    parallel.init_distributed(timeout_minutes=cfg.parallel.distributed_timeout_minutes,
                              rendezvous_timeout_s=cfg.parallel.rendezvous_timeout_seconds)
    parallel.initialize_model_parallel(cfg.parallel.tensor_model_parallel_size,
                                       cfg.parallel.pipeline_model_parallel_size, cfg.parallel.seed,
                                       {"teacher": cfg.teacher})
    teacher = build_teacher(cfg.teacher)
    load_model(teacher, cfg.teacher.load, verify=True, require_manifest=cfg.checkpoint.verify)
    teacher.eval()

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    # every pipeline stage runs each forward; the last stage has the logits, its TP rank 0 writes
    writer = parallel_state.is_pipeline_last_stage() and tp_rank == 0
    rank0 = dist.get_rank() == 0
    lengths = dataset.tokens.sequence_lengths[1::2].astype(np.int64)  # response tokens per row
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_rows = len(dataset)
    n_shards = max(1, -(-n_rows // rows_per_shard))
    output = Path(output)
    temporary = output.parent / f".{output.name}.tmp"
    if rank0:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    dist.barrier()
    device = platform.device()
    mbs, seq_length = cfg.schedule.micro_batch_size, cfg.schedule.seq_length
    for index in range(dp_rank, n_shards, dp_size):
        first, last = index * rows_per_shard, min((index + 1) * rows_per_shard, n_rows)
        start = int(offsets[first])
        arrays = _write_shard_arrays(temporary, index, int(offsets[last]) - start, k) if writer else None
        labelled = [i for i in range(first, last) if lengths[i] > 0]
        cursor = start
        for at in range(0, len(labelled), mbs):
            rows = labelled[at:at + mbs]
            batch = collate([dataset[i] for i in rows], tokenizer.pad_id, seq_length)
            mask = batch["loss_mask"] > 0
            columns = mask.any(0).nonzero()
            first = int(columns[0]) if columns.numel() else 0  # the prompt columns before it are never cached
            outputs = forward_logits(teacher, [batch["tokens"].to(device)], [first])
            if outputs is None:  # not the last pipeline stage
                continue
            logits = mask_padded_logits(outputs[0], vocab, tp_rank)
            mask = mask[:, first:].to(device)
            with torch.no_grad():
                log_p, ids, rest, entropy = topk_rows(logits[mask], k, temperature,
                                                      shard_of(logits.shape[-1], tp_group))
            n = log_p.shape[0]
            if n != int(lengths[rows].sum()):
                raise UserError(f"{cfg.data.train_path}: rows {rows} give {n} response positions at "
                                f"schedule.seq_length={seq_length}, the index says {int(lengths[rows].sum())}")
            if arrays is not None:
                span = slice(cursor - start, cursor - start + n)
                arrays["logp"][span] = value_bits(log_p)
                arrays["ids"][span] = ids.int().cpu().numpy()
                arrays["rest"][span] = value_bits(rest)
                arrays["entropy"][span] = entropy.float().cpu().numpy()
            cursor += n
        if arrays is not None:
            for array in arrays.values():
                array.flush()
            del arrays
    dist.barrier()
    shards = [{"index": s, "rows": [s * rows_per_shard, min((s + 1) * rows_per_shard, n_rows)],
               "tokens": [int(offsets[s * rows_per_shard]), int(offsets[min((s + 1) * rows_per_shard, n_rows)])]}
              for s in range(n_shards)]
    manifest = {"format_version": FORMAT_VERSION, "k": k, "temperature": temperature, "vocab_size": vocab,
                "rows": n_rows, "tokens": int(offsets[-1]), "rows_per_shard": rows_per_shard, "shards": shards,
                "value_dtype": "float16 bits in uint16", "id_dtype": "int32",
                "teacher": teacher_fingerprint(cfg.teacher.load), "tokenizer_hash": tokenizer.vocab_hash(),
                "data": data_fingerprint(cfg.data.train_path),
                "layout": {"tp": cfg.parallel.tensor_model_parallel_size,
                           "pp": cfg.parallel.pipeline_model_parallel_size, "dp": dp_size}}
    if rank0:
        np.save(temporary / ROW_OFFSETS, offsets)
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_directory(temporary, output)
    dist.barrier()
    return manifest


# --------------------------------------------------------------------------------------------------
# Reading.

class TeacherCache:
    """Read access to a cache directory: `rows(row_ids)` -> the concatenated cached tokens of those rows."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.k = int(self.manifest["k"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.temperature = float(self.manifest["temperature"])
        self.rows_per_shard = int(self.manifest["rows_per_shard"])
        self.value_dtype = VALUE_DTYPES[self.manifest["format_version"]]
        try:
            self.offsets = np.load(self.directory / ROW_OFFSETS)
        except (OSError, ValueError) as exc:
            raise UserError(f"{FIELD}: {self.directory / ROW_OFFSETS} unreadable ({exc})") from None
        if len(self.offsets) != int(self.manifest["rows"]) + 1:
            raise UserError(f"{FIELD}: {ROW_OFFSETS} has {len(self.offsets) - 1} rows, the manifest "
                            f"{self.manifest['rows']}")
        self._shards: dict[int, dict] = {}

    def _shard(self, index: int) -> dict:
        if index not in self._shards:
            stem = self.directory / f"shard_{index:05d}"
            try:
                self._shards[index] = {name: np.load(f"{stem}.{name}.npy", mmap_mode="r")
                                       for name in ("logp", "ids", "rest", "entropy")}
            except (OSError, ValueError) as exc:
                raise UserError(f"{FIELD}: shard {stem} unreadable ({exc}); re-run mgsr cache-teacher") from None
        return self._shards[index]

    def row(self, row: int):
        """(log p [R, K] float32, ids [R, K] int64, log rest [R] float32, entropy [R] float32) of a dataset row."""
        if not 0 <= row < len(self.offsets) - 1:
            raise UserError(f"{FIELD}: row {row} is outside the cache ({len(self.offsets) - 1} rows)")
        index = row // self.rows_per_shard
        base = int(self.offsets[index * self.rows_per_shard])
        shard = self._shard(index)
        span = slice(int(self.offsets[row]) - base, int(self.offsets[row + 1]) - base)
        return (from_value_bits(shard["logp"][span], self.value_dtype),
                torch.from_numpy(np.asarray(shard["ids"][span], np.int64)),
                from_value_bits(shard["rest"][span], self.value_dtype),
                torch.from_numpy(np.array(shard["entropy"][span])))

    def dense_teacher_logits(self, row_ids: torch.Tensor, loss_mask: torch.Tensor, local_vocab: int, tp_rank: int,
                             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, entropy): [b, s, local_vocab] float32 "logits" of this TP rank's vocabulary shard whose
        softmax at `temperature` is the cached distribution at the positions with loss_mask > 0 (top-K ids:
        their log p; other ids: the remaining mass spread uniformly over the V - K non-top ids), 0 elsewhere;
        and [b, s] float32 the teacher's true H(P) at those positions (the stored float32 value of the
        full distribution; 0 elsewhere): the same on every TP rank, for mgsr_objective's teacher_entropy.
        Padded columns are NOT masked here (the trainer masks them like the online teacher's)."""
        b, s = loss_mask.shape
        device = loss_mask.device
        parts = [self.row(int(r)) for r in row_ids.tolist()]
        counts = loss_mask.reshape(b, s).gt(0).sum(-1).tolist()
        for r, part, count in zip(row_ids.tolist(), parts, counts):
            if part[0].shape[0] != count:
                raise UserError(f"{FIELD}: dataset row {r} has {part[0].shape[0]} cached tokens but "
                                f"{count} response positions in the batch (cache written for other data?)")
        log_p, ids, rest, entropy = (torch.cat([p[i] for p in parts]).to(device) for i in range(4))
        at_tokens = torch.zeros(b * s, dtype=torch.float32, device=device)
        at_tokens[loss_mask.reshape(-1) > 0] = entropy
        return (dense_from_topk(log_p, ids, rest, loss_mask, local_vocab, tp_rank, self.vocab_size, temperature),
                at_tokens.view(b, s))


def dense_from_topk(log_p, ids, rest, loss_mask, local_vocab: int, tp_rank: int, vocab_size: int,
                    temperature: float) -> torch.Tensor:
    """The dense [b, s, local_vocab] float32 teacher "logits" of `TeacherCache.dense_teacher_logits` from the
    cached tokens in mask order: log_p, ids [n, K], rest [n] (n = number of loss_mask > 0 positions)."""
    b, s = loss_mask.shape
    k = ids.shape[-1]
    tail = rest.float() - math.log(vocab_size - k)  # the remaining mass spread over the V - K other ids
    rows = tail[:, None].expand(-1, local_vocab).clone()
    local = ids.long() - tp_rank * local_vocab
    owned = (local >= 0) & (local < local_vocab)
    at_row, at_k = owned.nonzero(as_tuple=True)
    rows[at_row, local[at_row, at_k]] = log_p[at_row, at_k].float()
    out = torch.zeros(b * s, local_vocab, dtype=torch.float32, device=loss_mask.device)
    out[loss_mask.reshape(-1) > 0] = rows.mul_(temperature)
    return out.view(b, s, local_vocab)
