"""Batched, KV-cached autoregressive generation for Megatron-Core GPTModels under TP and PP.

    out = generate(model, [[5, 17, 3], [9, 2]], SamplingOptions(max_new_tokens=32, eos_id=2, seed=1), vocab_size=250)
    out.tokens            [b, L] int64, right-padded with `options.pad_id` (default: eos_id)
    out.prompt_lengths    [b]
    out.response_lengths  [b]  generated tokens per row, the EOS included when one was produced

The result is identical on every rank of the model's TP and PP groups (DP replicas generate for their
own prompts; give them different seeds).

How it works: each pipeline stage computes with the lean KV-cached forward of kv_decode.py (or, for
layer types it does not cover, Megatron-Core 0.16.1's `StaticInferenceContext`). The cache has ONE
sequence offset for the whole batch, so rows move in lock-step, one position per forward pass. Position t of every row
is either *fixed* (a prompt token, or in SCRG a kept/corrected token: `t < fixed_lengths[row]`) or
*sampled*. Only rows that sample at least one token take part in the passes. The first pass
prefills every position those rows know (`[min cache_valid, min fixed)` over them), then each decode
pass feeds one column; a row whose token at the next position is fixed gets it forced. A row is
finished when its last response token is EOS or it has `max_new_tokens` response tokens; passes stop
when all sampling rows are (no pass is ever handed zero rows), rows of fixed tokens only are settled
without one.

Under PP the first stage embeds, hidden states travel stage to stage (blocking p2p), and the last
stage's sampled column is broadcast to every stage of the pipeline. Under TP the last stage returns
decode-step logits gathered over the vocabulary (as Megatron's inference path does), and every TP
rank takes the same sample from the same logits (sampling.py).

Noise of sampled tokens depends on (seed, absolute position, row, vocabulary id) only: regenerating
with or without a reused cache gives the same tokens.

Models that are not Megatron GPTModels come through `GenerationModel` (hf_stage.HfCausalLM for Hugging Face
causal LMs): their stepper replaces PipelineStepper, the rest of this module runs unchanged.
"""

from __future__ import annotations

import bisect
import contextlib
import operator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mgsr_megatron import platform
from mgsr_megatron.errors import UserError
from mgsr_megatron.generation.kv_decode import LeanStage, unsupported_reason
from mgsr_megatron.generation.sampling import SamplingOptions, sample
from mgsr_megatron.models.pipeline import unwrap


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [b, L] int64, right-padded with pad_id
    prompt_lengths: torch.Tensor  # [b] int64
    response_lengths: torch.Tensor  # [b] int64 (EOS counted when produced)
    # the student's KV cache after generation (SCRG regenerates from it); not part of the result
    stepper: PipelineStepper | None = field(default=None, repr=False, compare=False)
    # with record_logits, on the last stage: this TP rank's shard of the logits the decode passes
    # computed, [b, L, V_padded / TP], position p = the output at p (it predicts token p + 1); filled
    # from each row's last prompt position on. SCRG's detection uses them instead of re-scoring.
    logits: torch.Tensor | None = field(default=None, repr=False, compare=False)
    logits_recorded: bool = field(default=False, repr=False, compare=False)  # the same on every stage

    def responses(self) -> list[list[int]]:
        return [self.tokens[r, p:p + n].tolist()
                for r, (p, n) in enumerate(zip(self.prompt_lengths.tolist(), self.response_lengths.tolist()))]


class GenerationModel:
    """The model interface generation and SCRG need, for models that are not Megatron GPTModels (a bare
    GPTModel, or one in DDP / Float16Module wrappers, takes the Megatron path: PipelineStepper,
    models.pipeline.forward_logits, Megatron's TP/PP groups). hf_stage.HfCausalLM implements it for a
    Hugging Face causal LM (TP = PP = 1).

    Contract: logits cover the vocabulary given to the adapter (no TP shard: the whole of it);
    `lockstep` True means every data-parallel rank must run the same number of forward passes (ZeRO-3
    gathers the parameters collectively in each one): `announce_pass` precedes each real pass and
    `join_peer_passes` runs idle passes until every rank is done (both no-ops without lockstep)."""

    lockstep: bool = False

    @property
    def training(self) -> bool:
        raise NotImplementedError

    def train(self, mode: bool = True):
        raise NotImplementedError

    def eval(self):
        return self.train(False)

    def context_limit(self) -> int:
        """Positions the model can attend over."""
        raise NotImplementedError

    def stepper(self, batch_size: int, max_length: int):
        """A stepper with PipelineStepper's interface (forward, reorder_rows, broadcast_column, logit_record,
        tp_rank, batch_size) over a fresh KV cache of batch_size rows and max_length positions."""
        raise NotImplementedError

    def score(self, tokens: torch.Tensor) -> torch.Tensor:
        """No-grad logits [b, L, V] of a whole-sequence forward (eval mode), as _score's Megatron path."""
        raise NotImplementedError

    def any_rank(self, flag: torch.Tensor) -> bool:
        """flag.any() on any data-parallel rank (with lockstep; this rank's otherwise)."""
        return bool(flag.any())

    def announce_pass(self) -> None:
        """Called before each real forward pass of a stepper (lockstep bookkeeping)."""

    def join_peer_passes(self) -> None:
        """Called when this rank has no pass left in a generate / regenerate: idle until its peers finish."""


def new_stepper(model, batch_size: int, max_length: int):
    """The KV-cached stepper of `model`: its adapter's (GenerationModel) or Megatron's PipelineStepper."""
    if isinstance(model, GenerationModel):
        return model.stepper(batch_size, max_length)
    return PipelineStepper(model, batch_size, max_length)


def finish_passes(model) -> None:
    """After this rank's last pass of a generation: lockstep adapters idle until every rank is done."""
    if isinstance(model, GenerationModel):
        model.join_peer_passes()


def context_limit(model) -> int:
    """Positions the model can attend over (max_position_embeddings)."""
    if isinstance(model, GenerationModel):
        return model.context_limit()
    return int(unwrap(model).max_sequence_length)


def normalise_prompts(prompts) -> list[list[int]]:
    """A list of token-id lists (tensors, numpy arrays and numpy ints accepted) as Python ints."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise UserError("generate: no prompts given (expected a non-empty list of token-id lists)")
    normalised = []
    for row, prompt in enumerate(prompts):
        values = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
        try:
            normalised.append([operator.index(t) for t in values])
        except TypeError:
            raise UserError(f"generate: prompt {row} holds a non-integer token id") from None
    return normalised


def check_request(model, prompts, options: SamplingOptions, *, vocab_size: int) -> list[list[int]]:
    """Bad input (prompts, options.max_new_tokens, options.eos_id) -> UserError naming the value and the
    limit, before any forward pass. Returns the prompts as lists of Python ints."""
    max_new_tokens, eos_id = options.max_new_tokens, options.eos_id
    prompts = normalise_prompts(prompts)
    limit = context_limit(model)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size:
        raise UserError(f"generate: eos_id {eos_id!r} is outside the vocabulary [0, {vocab_size})")
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"generate: prompt {row} is empty (every prompt needs at least one token)")
        if len(prompt) > limit:
            raise UserError(f"generate: prompt {row} has {len(prompt)} tokens, longer than the model's "
                            f"context of {limit} positions (max_position_embeddings)")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"generate: prompt {row} has token id {bad[0]!r} outside the vocabulary "
                            f"[0, {vocab_size})")
    if options.row_ids is not None and len(options.row_ids) != len(prompts):
        raise UserError(f"generate: {len(options.row_ids)} row_ids for {len(prompts)} prompts")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise UserError(f"generate: longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                        f"{longest + max_new_tokens} overflows the model's {limit} position embeddings "
                        f"(max_position_embeddings); lower max_new_tokens to {limit - longest} or less")
    return prompts


class MegatronStage:
    """Megatron-Core's own inference path (`StaticInferenceContext`); the fallback for layer types
    the lean stage (kv_decode.py) does not cover, and the comparison path in the tests."""

    def __init__(self, model, batch_size: int, max_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model, self.gpt = model, unwrap(model)
        self.context = StaticInferenceContext(batch_size, max_length)

    def hidden_shape(self, batch: int, columns: int) -> tuple[int, int, int]:
        return columns, batch, self.gpt.config.hidden_size

    def reorder_rows(self, order: torch.Tensor) -> bool:
        return False  # the static context's cache decodes whole batches

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, received: torch.Tensor | None, offset: int, *,
                 all_columns: bool = False, rows: torch.Tensor | None = None, first_column: int = 0) -> torch.Tensor:
        if rows is not None:
            raise ValueError("MegatronStage computes whole batches (reorder_rows is False): rows must be None")
        b, s = tokens.shape
        self.context.sequence_len_offset = offset
        self.context.materialize_only_last_token_logits = not all_columns  # a static context's default: True
        # Megatron switches its causal mask off once the offset is > 0 (and asserts sq == sk without
        # a mask), so pass the causal mask over [cached + new] keys explicitly: True = masked.
        query_pos = torch.arange(offset, offset + s, device=tokens.device).unsqueeze(-1)
        key_pos = torch.arange(offset + s, device=tokens.device).unsqueeze(0)
        mask = (key_pos > query_pos).view(1, 1, s, offset + s)
        positions = torch.arange(offset, offset + s, device=tokens.device).unsqueeze(0).expand(b, s)
        if received is not None:
            self.gpt.set_input_tensor(received)
        output = self.model(tokens if self.gpt.pre_process else None, positions, mask,
                            inference_context=self.context, runtime_gather_output=True)
        self.context.increment_sequence_len_offset(s)
        if not self.gpt.post_process:
            return output
        if all_columns:  # Megatron's inference always gathers the vocabulary: keep this TP rank's shard
            from megatron.core import parallel_state

            shard = output.shape[-1] // parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            return output[:, max(first_column - offset, 0):, rank * shard:(rank + 1) * shard]
        return output[:, -1, :]  # only the last column's logits


class PipelineStepper:
    """One forward pass of new token columns through all stages, with the model's KV cache.

    `forward(tokens[b, s], offset)` writes the cache at positions [offset, offset + s) (earlier
    positions must already hold this batch's keys and values) and returns, on the last stage, the
    gathered logits [b, V_padded] of the last column (None elsewhere). Each stage computes with the
    lean KV-cached forward (kv_decode.LeanStage) when it covers the model, else with Megatron-Core's
    inference path; `self.path` says which.
    """

    def __init__(self, model, batch_size: int, max_length: int):
        from megatron.core import parallel_state

        gpt = unwrap(model)
        self.path = "megatron" if unsupported_reason(gpt) is not None else "lean"
        self.stage = (MegatronStage(model, batch_size, max_length) if self.path == "megatron"
                      else LeanStage(gpt, batch_size, max_length))
        self.gpt = gpt
        self.batch_size = batch_size
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
        self.last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.device = platform.device()
        self.dtype = gpt.config.pipeline_dtype or gpt.config.params_dtype

    def logit_record(self, length: int) -> torch.Tensor | None:
        """A zeroed [b, length, V_padded / TP] buffer for `decode(record=...)` on the last stage."""
        if not self.last:
            return None
        shard = self.gpt.vocab_size // self.tp_size
        return torch.zeros(self.batch_size, length, shard, dtype=self.dtype, device=self.device)

    def forward(self, tokens: torch.Tensor, offset: int, **stage_options) -> torch.Tensor | None:
        """`stage_options`: all_columns, first_column, rows, starts (the stages' keywords; rows and starts, a ragged
        pass, only on the lean path: kv_decode.LeanStage)."""
        received = None
        if not self.first:
            received = torch.empty(self.stage.hidden_shape(*tokens.shape), dtype=self.dtype, device=tokens.device)
            dist.recv(received, src=self.prev_rank)
        output = self.stage(tokens, received, offset, **stage_options)
        if not self.last:
            dist.send(output.contiguous(), dst=self.next_rank)
            return None
        return output

    def reorder_rows(self, order: torch.Tensor) -> bool:
        """Permute the cached rows (row i <- row order[i]) so that a pass may compute a prefix of the
        batch; False (nothing done) on Megatron's path, whose static cache decodes whole batches."""
        return self.stage.reorder_rows(order)

    def broadcast_column(self, column: torch.Tensor | None) -> torch.Tensor:
        """The last stage's int64 column [b] on every stage of this pipeline."""
        if self.pp_size == 1:
            return column
        if column is None:
            column = torch.empty(self.batch_size, dtype=torch.int64, device=self.device)
        dist.broadcast(column, src=self.last_rank, group=self.pp_group)
        return column


def decode(stepper: PipelineStepper, tokens: torch.Tensor, prompt_lengths: torch.Tensor,
           fixed_lengths: torch.Tensor, cache_valid, *, options: SamplingOptions, vocab_size: int,
           record: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The lock-step loop. tokens [b, >= max(fixed)] hold every fixed position; the stepper's cache
    must hold row r's keys/values for positions < cache_valid[r] (an int: the same for every row),
    and cache_valid[r] < fixed_lengths[r] for every row that still samples. Returns (tokens [b, L],
    response lengths), L = the longest row's end, every position after a row's end = options.pad.
    `options` gives the budget (max_new_tokens), eos_id, pad_id and how tokens are sampled.
    `record` [b, >= L, V_padded / TP] (last stage): each pass writes this TP rank's shard of its logits
    at the position it ran, for the rows it computed (see GenerationOutput.logits).

    Only rows that SAMPLE take part in the passes: a row whose tokens are all fixed (its fixed tokens
    end in EOS or fill its max_new_tokens; in SCRG a row not corrected, or one whose teacher token is
    EOS or sits at its last budget position) needs no logits. The first pass runs at the first
    position a sampling row samples, from the smallest cache_valid of the sampling rows; no pass runs
    once every sampling row has finished, and none at all when no row samples. So no pass is ever
    handed zero rows or zero columns (issue 13: an SCRG regeneration whose uncorrected rows ended
    before the smallest corrected j did). Rows whose tokens are all fixed are settled position by
    position all the same (their length: the first EOS in the response, or the budget).

    Rows join the passes from the first one that feeds a position they have no cache for: with
    per-row cache_valid (SCRG's regeneration from each row's own j) the cache rows are sorted by it
    (rows that never sample last), so that every pass computes a prefix of the batch, and put back
    at the end. (Megatron's static cache decodes whole batches: there every pass feeds every row.)"""
    b, device = tokens.shape[0], tokens.device
    max_new_tokens, eos_id, pad_id = options.max_new_tokens, options.eos_id, options.pad
    prompt_lengths, fixed_lengths = prompt_lengths.to(device), fixed_lengths.to(device)
    cache_valid = torch.as_tensor(cache_valid, dtype=torch.int64, device=device).expand(b)
    end = prompt_lengths + max_new_tokens  # exclusive end position of each row's response
    total = int(end.max())
    buffer = torch.full((b, total), pad_id, dtype=torch.int64, device=device)
    width = min(tokens.shape[1], total)
    buffer[:, :width] = tokens[:, :width]
    fixed_lengths = torch.minimum(fixed_lengths, end)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.int64, device=device)

    def close_rows(position: int) -> None:
        """Update finished/lengths after the tokens at `position` are settled."""
        in_response = (position >= prompt_lengths) & ~finished
        stop = in_response & ((buffer[:, position] == eos_id) | (position + 1 >= end))
        lengths[stop] = position + 1 - prompt_lengths[stop]
        finished[stop] = True

    positions = torch.arange(total, device=device).unsqueeze(0)
    fixed_eos = ((buffer == eos_id) & (positions >= prompt_lengths.unsqueeze(-1))
                 & (positions < fixed_lengths.unsqueeze(-1))).any(-1)
    samples = (fixed_lengths < end) & ~fixed_eos  # rows that sample at least one token
    if bool((samples & (cache_valid >= fixed_lengths)).any()):
        raise ValueError("decode: a row that samples must have cache_valid < fixed_lengths (it needs the "
                         "logits of the pass that feeds its last fixed token)")
    # a row joins the passes at the first position it has no cache for; rows that never sample never join
    joins = torch.where(samples, cache_valid, total)
    start = int(torch.where(samples, fixed_lengths, total).min())  # first sampled position (total: none)
    offset = int(joins.min())  # < start: the row that samples first has cache_valid < its fixed length
    order = torch.argsort(joins, stable=True)  # pass rows: order[:active]
    sorted_joins = joins[order].tolist()
    compact = start < total and sorted_joins[-1] > offset and stepper.reorder_rows(order)
    if not compact:
        order = torch.arange(b, device=device)
    # the lean stage and the sampler never reach Megatron's CUDA calls: no CPU adapter handler per torch call
    with platform.without_adapter() if stepper.path == "lean" else contextlib.nullcontext():
        position = int(prompt_lengths.min())  # the next position to settle
        while position < total and not bool(finished.all()):
            if position >= start and bool((samples & ~finished).any()):
                # a pass feeds [offset, position) to the rows that have no key/value at some position in
                # it (rows joining recompute their cached ones) and samples `position` from its logits
                rows = order[:bisect.bisect_left(sorted_joins, position)] if compact else order
                in_pass = rows if compact else slice(None)  # a slice keeps the full-batch path copy-free
                logits = stepper.forward(buffer[in_pass, offset:position], offset)
                offset = position
                column = None
                if logits is not None:
                    if record is not None:
                        shard = record.shape[-1]
                        first = stepper.tp_rank * shard
                        record[in_pass, position - 1] = logits[:, first:first + shard]
                    column = sample(logits, options, vocab_size=vocab_size, step=position, rows=rows)
                    if compact:  # rows not in the pass keep their (fixed) token
                        column = buffer[:, position].index_copy(0, rows, column)
                column = stepper.broadcast_column(column)
                sampled = (position >= fixed_lengths) & ~finished
                buffer[:, position] = torch.where(sampled, column, buffer[:, position])
            buffer[finished, position] = pad_id
            close_rows(position)
            position += 1
    if compact:
        stepper.reorder_rows(torch.argsort(order))
    # every row is closed (by EOS or by the budget in close_rows); nothing after a row's end survives
    width = int((prompt_lengths + lengths).max())
    out = buffer[:, :width]
    out.masked_fill_(positions[:, :width] >= (prompt_lengths + lengths).unsqueeze(-1), pad_id)
    return out, lengths


def generate(model, prompts: list[list[int]], options: SamplingOptions, *, vocab_size: int,
             record_logits: bool = False) -> GenerationOutput:
    """Generate a response per prompt (see the module docstring) with `options` (max_new_tokens and
    eos_id required). The model is put in eval mode. `record_logits=True` keeps the decode passes'
    logits (GenerationOutput.logits)."""
    prompts = check_request(model, prompts, options, vocab_size=vocab_size)
    max_new_tokens, pad_id = options.max_new_tokens, options.pad
    was_training = model.training
    model.eval()
    try:
        device = platform.device()
        prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
        tokens = torch.full((len(prompts), int(prompt_lengths.max())), pad_id, dtype=torch.int64, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.int64, device=device)
        max_length = int(prompt_lengths.max()) + max_new_tokens
        stepper = new_stepper(model, len(prompts), max_length)
        record = stepper.logit_record(max_length) if record_logits else None
        out_tokens, lengths = decode(stepper, tokens, prompt_lengths, prompt_lengths.clone(), 0,
                                     options=options, vocab_size=vocab_size, record=record)
        finish_passes(model)
    finally:
        model.train(was_training)
    logits = None if record is None else record[:, :out_tokens.shape[1]]
    return GenerationOutput(out_tokens, prompt_lengths, lengths, stepper, logits, record_logits)
