"""SCRG: sequence correction and re-generation (method.md section 1).

    settings = ScrgSettings.from_config(config.mgsr)                       # once per run
    options = SamplingOptions(max_new_tokens=config.mgsr.max_new_tokens, eos_id=2, seed=step)
    out, stats = scrg(student, teacher, prompts, options, settings=settings, vocab_size=250)

    y <- student samples a response with `options` (temperature 1, top_p 1 unless told otherwise)
    repeat settings.rounds times (mgsr.scrg_rounds):
        no-grad forward of the teacher over [x; y]                 (vocab-parallel logits, last stage;
                                                                    the student's come from sampling y)
        t_i = teacher token at response position i                 (argmax, or a Gumbel-max sample)
        d_i = D(P_i, Q_i) at temperature settings.temperature      (forward_kl | reverse_kl | jsd)
        C   = { i in the response (up to and including its first EOS) : y_i != t_i }
        j   = argmax_{i in C} d_i  (smallest i on ties); rows with C empty or d_j < delta are done
        y   <- y_<j + t_j, then the student continues sampling from position j+1

Rows are processed together, each with its own j. Regeneration reuses the student's KV cache of the
first generation, valid below each row's own j: a row joins the decode passes at its j, rows not
corrected never do (generator.decode). Noise: the first generation uses `seed`, the regeneration of round k the
seed `round_seed(seed, k)`, the sampled teacher token `round_seed(seed, -k)`; every noise value also
depends on (absolute position, row, vocabulary id), so cache reuse and a cold regeneration agree.

The teacher pays for its forward once per call (`TeacherScores`, teacher_scores.py): the first detection
scores every position and keeps the teacher's KV cache; a later round's detection recomputes only the
rows the regeneration changed, from their j on. `keep_teacher_view` (the trainer,
mgsr.reuse_scrg_teacher_logits) scores the rows exactly as the loss pass collates them (`teacher_view`)
and returns the teacher's logits of the final sequences (one more suffix pass): the training step's
loss uses them instead of running the teacher again.

The per-position divergences are the losses' own vocab-parallel `losses.divergences.divergence`
(JSD with beta = 0.5; padded vocabulary masked to -inf, it contributes 0). The teacher argmax is an
all-gather of (value, id) per position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mgsr_megatron import platform
from mgsr_megatron.errors import UserError
from mgsr_megatron.generation.generator import (
    GenerationModel,
    GenerationOutput,
    check_request,
    decode,
    finish_passes,
    generate,
    new_stepper,
)
from mgsr_megatron.generation.sampling import SamplingOptions, parallel_argmax, sample
from mgsr_megatron.generation.teacher_scores import TeacherScores
from mgsr_megatron.losses.divergences import divergence as token_divergence
from mgsr_megatron.models.vocab import mask_padded_logits

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_TOKENS = ("greedy", "sampled")


@dataclass(frozen=True, kw_only=True)
class ScrgSettings:
    """SCRG's correction settings, built once from the config (`from_config(cfg.mgsr)`: mgsr.scrg_rounds,
    scrg_divergence, scrg_teacher_token, scrg_delta and the distillation temperature). How the student
    samples (and the response budget) is the `SamplingOptions` passed beside them."""

    rounds: int = 1
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    teacher_token: str = "greedy"  # greedy | sampled
    delta: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise UserError(f"mgsr.scrg_divergence '{self.divergence}' is not one of {', '.join(DIVERGENCES)}")
        if self.teacher_token not in TEACHER_TOKENS:
            raise UserError(f"mgsr.scrg_teacher_token '{self.teacher_token}' is not one of "
                            f"{', '.join(TEACHER_TOKENS)}")
        if self.rounds < 0:
            raise UserError(f"mgsr.scrg_rounds must be >= 0, got {self.rounds}")

    @classmethod
    def from_config(cls, cfg) -> ScrgSettings:
        """From an MGSRConfig (the `mgsr` section)."""
        return cls(rounds=cfg.scrg_rounds, divergence=cfg.scrg_divergence, teacher_token=cfg.scrg_teacher_token,
                   delta=cfg.scrg_delta, temperature=cfg.temperature)


def round_seed(seed: int, round_index: int) -> int:
    """A distinct 32-bit seed per SCRG round (deterministic, identical on every rank)."""
    return (seed * 1_000_003 + round_index * 7_919 + 0x5BD1E995) & 0xFFFFFFFF


def _tp(model=None):
    """(group, rank, size) of the model's tensor-parallel group; (None, 0, 1) for a GenerationModel."""
    if isinstance(model, GenerationModel):
        return None, 0, 1
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    return group, parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _score(model, tokens: torch.Tensor):
    """Vocab-parallel logits [b, L, V/TP] on the last stage (None elsewhere), no grad."""
    if isinstance(model, GenerationModel):
        return model.score(tokens)
    from mgsr_megatron.models.pipeline import forward_logits

    was_training = model.training
    model.eval()
    try:
        outputs = forward_logits(model, [tokens])
    finally:
        model.train(was_training)
    return None if outputs is None else outputs[0]


def _broadcast_from_last_stage_tp0(values: torch.Tensor | None, shape, model=None) -> torch.Tensor:
    """Make the last stage's TP-rank-0 tensor the value on every rank of this model replica (a
    GenerationModel's replica is one rank: nothing to do)."""
    if isinstance(model, GenerationModel):
        return values
    from megatron.core import parallel_state

    tp_group, _, tp = _tp()
    if values is not None and tp > 1:
        dist.broadcast(values, src=parallel_state.get_tensor_model_parallel_src_rank(), group=tp_group)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        if values is None:
            values = torch.empty(shape, dtype=torch.float64, device=platform.device())
        dist.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return values


def teacher_view(out: GenerationOutput, view: tuple[int, int]) -> torch.Tensor:
    """The tokens the teacher scores. `view = (length, pad_id)`: every row cut at its end (prompt +
    response) and right-padded with pad_id to `length` (with the trainer's, its collated micro-batch,
    training/data.py collate_generated, so that SCRG's teacher logits ARE the loss pass's). Sequences
    longer than `length` (the collation would truncate them): `out.tokens`."""
    tokens = out.tokens
    length, pad_id = view
    if tokens.shape[1] > length:
        return tokens
    b, total = tokens.shape
    ends = (out.prompt_lengths + out.response_lengths).unsqueeze(-1)
    inside = torch.arange(total, device=tokens.device).unsqueeze(0) < ends
    view = torch.full((b, length), pad_id, dtype=tokens.dtype, device=tokens.device)
    view[:, :total] = torch.where(inside, tokens, pad_id)
    return view


def detect(teacher, student, out: GenerationOutput, settings: ScrgSettings, *, vocab_size: int,
           seed: int, row_ids: tuple[int, ...] | None = None) -> torch.Tensor:
    """One detection pass. Returns [b, 3] float64 (j, t_j, d_j) per row, j = -1 when the row has
    no mismatch (or d_j < settings.delta); identical on every rank of the model replica. `seed` and
    `row_ids` (SamplingOptions'): the noise of sampled teacher tokens."""
    scores = TeacherScores(teacher, first_column=first_candidate(out) - 1)
    return decide(teacher, student, out, scores(out.tokens), settings, vocab_size=vocab_size, seed=seed,
                  row_ids=row_ids)


def first_candidate(out: GenerationOutput) -> int:
    """The first position a correction can fall on: the shortest prompt's length. The teacher's logits are
    read from the column before it (they predict the next token) on, by the decision and by the loss."""
    return int(out.prompt_lengths.min())


def decide(teacher, student, out: GenerationOutput, teacher_logits: torch.Tensor | None, settings: ScrgSettings,
           *, vocab_size: int, seed: int, row_ids: tuple[int, ...] | None = None) -> torch.Tensor:
    """`detect` on the teacher's logits of a view of `out` from column `first_candidate(out) - 1` on
    ([b, >= total - first_candidate(out) + 1, V/TP] on the last stage, None on the others): the decision does
    not depend on the view's padding (causal: positions beyond a row's end are never candidates)."""
    temperature = settings.temperature
    tokens, prompt_lengths, lengths = out.tokens, out.prompt_lengths, out.response_lengths
    b, total = tokens.shape
    # the student's logits over [x; y] were computed while sampling y (generate(record_logits=True))
    student_logits = out.logits if out.logits_recorded else _score(student, tokens)
    decision = None
    if teacher_logits is not None:
        tp_group, tp_rank, _ = _tp(teacher)
        start = tp_rank * teacher_logits.shape[-1]
        # logits at position i - 1 predict the token at position i; candidates start at the shortest prompt
        first = first_candidate(out)
        t_logits, s_logits = teacher_logits[:, :total - first], student_logits[:, first - 1:total - 1]
        positions = torch.arange(first, total, device=tokens.device).unsqueeze(0).expand(b, total - first)
        t_scores, s_scores = (mask_padded_logits(x, vocab_size, vocab_start=start) for x in (t_logits, s_logits))
        if settings.teacher_token == "greedy":
            teacher_tokens = parallel_argmax(t_scores, start, tp_group)[1]
        else:
            rows = torch.arange(b, device=tokens.device).unsqueeze(-1).expand(b, total - first)
            teacher_tokens = sample(t_logits.reshape(b * (total - first), -1),
                                    SamplingOptions(temperature=temperature, seed=seed, row_ids=row_ids),
                                    vocab_size=vocab_size,
                                    vocab_start=start, tp_group=tp_group, step=positions.reshape(-1),
                                    rows=rows.reshape(-1)).view(b, -1)
        d = token_divergence(s_scores, t_scores, settings.divergence, temperature=temperature, beta=0.5,
                             tp_group=tp_group)
        in_response = (positions >= prompt_lengths.unsqueeze(-1)) & \
                      (positions < (prompt_lengths + lengths).unsqueeze(-1))
        mismatched = in_response & (tokens[:, first:] != teacher_tokens)
        d_candidates = torch.where(mismatched, d.double(), float("-inf"))
        best_d, best = d_candidates.max(dim=-1)  # first (smallest) position on ties
        has = mismatched.any(-1) & ~(best_d < settings.delta)
        j = torch.where(has, best + first, -1)
        t_j = torch.where(has, teacher_tokens.gather(-1, best.unsqueeze(-1)).squeeze(-1), -1)
        decision = torch.stack([j.double(), t_j.double(), torch.where(has, best_d, float("nan"))], -1)
    return _broadcast_from_last_stage_tp0(decision, (b, 3), teacher)


def scrg(student, teacher, prompts: list[list[int]], options: SamplingOptions, *, settings: ScrgSettings,
         vocab_size: int, reuse_cache: bool = True,
         keep_teacher_view: tuple[int, int] | None = None) -> tuple[GenerationOutput, dict]:
    """Student sample + `settings.rounds` correction rounds. See the module docstring.

    `options` are the student's sampling options (method: temperature 1.0, top_k 0, top_p 1.0), with the
    response budget (max_new_tokens), eos_id and the seed of the first generation.
    Returns the corrected batch and per-row statistics (tensors of shape [b]):
      corrected (bool), j (last corrected position, -1), d_j (its divergence, nan), teacher_token (-1),
      rounds_used (how many rounds corrected the row), continuation_changed (a regeneration changed the
      tokens after j); plus `per_round`: [b, 3] (j, t_j, d_j) per round.
    `reuse_cache=False` regenerates with a fresh cache (the reference for the cache-reuse test).

    The teacher scores a fixed-width view of the rows (`teacher_view`) with `TeacherScores`: the first
    detection runs it over every position, each later one only over the suffixes the regeneration changed.
    `keep_teacher_view=(length, pad_id)` is the view as the trainer collates the rows; the teacher's
    logits are then brought up to date with the FINAL sequences (one more suffix pass) and returned for the
    loss: `teacher_logits` (this TP rank's shard [b, length' - c0, V_padded/TP] of columns c0.. on the last
    pipeline stage, None elsewhere; length' > length only where a row is longer than the collation keeps),
    `teacher_first_column` (c0 = first_candidate - 1: no loss reads a column before it), `teacher_scored`
    ([b, length'], the tokens scored) and `teacher_recomputed` (the share of those positions the last pass
    computed again); None, 0, None, 1.0 when settings.rounds == 0. The decisions do not depend on the view.
    """
    prompts = check_request(student, prompts, options, vocab_size=vocab_size)
    seed = options.seed
    out = generate(student, prompts, options, vocab_size=vocab_size, record_logits=settings.rounds > 0)
    b, device = out.tokens.shape[0], out.tokens.device
    stats = {"corrected": torch.zeros(b, dtype=torch.bool, device=device),
             "j": torch.full((b,), -1, dtype=torch.int64, device=device),
             "d_j": torch.full((b,), float("nan"), dtype=torch.float64, device=device),
             "teacher_token": torch.full((b,), -1, dtype=torch.int64, device=device),
             "rounds_used": torch.zeros(b, dtype=torch.int64, device=device),
             "continuation_changed": torch.zeros(b, dtype=torch.bool, device=device), "per_round": []}
    # one width for every round (rows end anywhere below it), so that later rounds rescore suffixes only
    view = keep_teacher_view or (int(out.prompt_lengths.max()) + options.max_new_tokens, options.pad or 0)
    first_column = first_candidate(out) - 1  # the same in every round: regeneration keeps the prompts
    scores = TeacherScores(teacher, first_column) if settings.rounds > 0 else None
    for round_index in range(1, settings.rounds + 1):
        teacher_logits = scores(teacher_view(out, view))
        decision = decide(teacher, student, out, teacher_logits, settings, vocab_size=vocab_size,
                          seed=round_seed(seed, -round_index), row_ids=options.row_ids)
        del teacher_logits
        stats["per_round"].append(decision)
        j, t_j = decision[:, 0].long(), decision[:, 1].long()
        fix = j >= 0
        if not _any_rank(fix, student, teacher):  # lockstep ranks run the same rounds
            break
        stats["corrected"] |= fix
        stats["j"] = torch.where(fix, j, stats["j"])
        stats["d_j"] = torch.where(fix, decision[:, 2], stats["d_j"])
        stats["teacher_token"] = torch.where(fix, t_j, stats["teacher_token"])
        stats["rounds_used"] += fix.long()
        before = out
        out = regenerate(student, out, j, t_j, dataclasses.replace(options, seed=round_seed(seed, round_index)),
                         vocab_size=vocab_size, reuse_cache=reuse_cache,
                         record_logits=round_index < settings.rounds)  # the next round's detection
        stats["continuation_changed"] |= _suffix_changed(before, out, j)
    if keep_teacher_view is not None:
        stats.update(teacher_logits=None, teacher_scored=None, teacher_recomputed=1.0, teacher_first_column=0)
        if scores is not None:
            scored = teacher_view(out, view)
            stats.update(teacher_logits=scores(scored), teacher_scored=scored, teacher_recomputed=scores.recomputed,
                         teacher_first_column=first_column)
    return out, stats


def _any_rank(flag: torch.Tensor, *models) -> bool:
    """flag.any() on this rank, or on any data-parallel rank when one of the models runs in lockstep
    (then every rank must take the same branch: another detection pass or regeneration)."""
    synced = [m for m in models if isinstance(m, GenerationModel) and m.lockstep]
    return synced[0].any_rank(flag) if synced else bool(flag.any())


def _suffix_changed(before: GenerationOutput, after: GenerationOutput, j: torch.Tensor) -> torch.Tensor:
    """Per row: the regenerated tokens after j differ from the first sample's (False where j < 0)."""
    ends_before = (before.prompt_lengths + before.response_lengths).tolist()
    ends_after = (after.prompt_lengths + after.response_lengths).tolist()
    changed = [jr >= 0 and before.tokens[r, jr + 1:ends_before[r]].tolist()
               != after.tokens[r, jr + 1:ends_after[r]].tolist() for r, jr in enumerate(j.tolist())]
    return torch.tensor(changed, dtype=torch.bool, device=j.device)


def regenerate(student, out: GenerationOutput, j: torch.Tensor, t_j: torch.Tensor, options: SamplingOptions, *,
               vocab_size: int, reuse_cache: bool = True, record_logits: bool | None = None) -> GenerationOutput:
    """Rows with j >= 0: keep y_<j, put t_j at j, let the student continue with `options` (the same
    max_new_tokens, eos_id and pad_id as the generation of `out`). Other rows are unchanged.
    `record_logits` (default: when `out` has them) keeps the student's logits of the new sequences
    (the recorded ones of `out` below j, the regeneration's from j on)."""
    max_new_tokens = options.max_new_tokens
    fix = j >= 0
    if not bool(fix.any()):
        finish_passes(student)  # lockstep: the other ranks' regeneration passes
        return out
    tokens = out.tokens.clone()
    rows = torch.nonzero(fix).squeeze(-1)
    tokens[rows, j[rows]] = t_j[rows]
    fixed_lengths = torch.where(fix, j + 1, out.prompt_lengths + out.response_lengths)
    # the first generation's cache holds each row's keys/values below its own j; rows not corrected
    # are complete and never join a pass
    max_length = int(out.prompt_lengths.max()) + max_new_tokens
    stepper, cache_valid = out.stepper, torch.where(fix, j, max_length)
    if not reuse_cache or stepper is None:
        stepper = new_stepper(student, tokens.shape[0], max_length)  # the same path: it depends on the model
        cache_valid = 0
    record_logits = out.logits_recorded if record_logits is None else record_logits
    if record_logits and not out.logits_recorded:
        raise ValueError("regenerate: record_logits needs the logits of the first generation (out.logits)")
    record = stepper.logit_record(max_length) if record_logits else None
    if record is not None:  # keep the logits below j, the passes overwrite the rest
        record[:, :out.logits.shape[1]] = out.logits
    was_training = student.training
    student.eval()
    try:
        new_tokens, lengths = decode(stepper, tokens, out.prompt_lengths, fixed_lengths, cache_valid,
                                     options=options, vocab_size=vocab_size, record=record)
        finish_passes(student)
    finally:
        student.train(was_training)
    logits = None if record is None else record[:, :new_tokens.shape[1]]
    return GenerationOutput(new_tokens, out.prompt_lengths, lengths, stepper, logits, record_logits)
