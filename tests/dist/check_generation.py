"""Sampler, KV-cached generator and SCRG against a dense single-process reference (world size 4).

The reference is written independently of mgsr_megatron.generation: numpy noise from the spec in
docs/generation.md, sort-based top-k/top-p, and a plain loop that recomputes the whole sequence with
a TP1/PP1 GPTModel built from the gathered full state dict (no KV cache, no pipeline, no collectives).
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import torch
import torch.distributed as dist

from mgsr_megatron import parallel
from mgsr_megatron.config import MGSRConfig
from mgsr_megatron.models import build_model
from mgsr_megatron.models.state_dict import gather_full_state_dict, load_full_state_dict
from tests.dist.harness import dist_check

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
VOCAB, PADDED = 250, 256
M32 = np.uint64(0xFFFFFFFF)


# ---------------------------------------------------------------------------------------------------
# Independent reference: noise, sampler, generation loop, SCRG.

def _mix(x):
    x = x & M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & M32
    return x ^ (x >> np.uint64(16))


def ref_gumbel(seed: int, step: int, row: int, width: int) -> np.ndarray:
    """Gumbel noise for global ids 0..width-1 (spec: docs/generation.md, "Noise")."""
    v = np.arange(width, dtype=np.uint64)
    h = _mix(np.uint64(seed & 0xFFFFFFFF) ^ np.uint64(0x9E3779B9))
    h = _mix(h ^ np.uint64(step))
    h = _mix(h ^ np.uint64(row))
    h = _mix(h ^ v)
    h2 = _mix(h ^ np.uint64(0x85EBCA6B))
    bits = (h << np.uint64(21)) | (h2 >> np.uint64(11))
    u = (bits.astype(np.float64) + 0.5) / 2.0 ** 53
    return -np.log(-np.log(u))


def ref_sample(logits: np.ndarray, *, greedy, temperature, top_k, top_p, seed, step, row) -> int:
    """One token from dense logits [V_padded] (numpy float32 values)."""
    scores = logits.astype(np.float32).copy()
    scores[VOCAB:] = -np.inf
    if greedy:
        return int(np.argmax(scores))
    scores = (scores / np.float32(temperature)).astype(np.float64)
    if top_k > 0:
        kth = np.sort(scores)[::-1][top_k - 1]
        scores[scores < kth] = -np.inf
    if top_p < 1.0:
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        drop = order[mass_before >= top_p]
        scores[drop] = -np.inf
    return int(np.argmax(scores + ref_gumbel(seed, step, row, scores.shape[0])))


def ref_logits(model, seq: list[int]) -> np.ndarray:
    """Full recomputation: logits [len(seq), V_padded] of the dense model."""
    with torch.no_grad():
        tokens = torch.tensor([seq])
        return model(tokens, torch.arange(len(seq)).unsqueeze(0), None)[0].float().numpy()


def ref_generate(model, prompts, *, max_new_tokens, eos_id, seed, fixed=None, **opts):
    """Per row: continue `fixed[row]` (default the prompt) until EOS / the row's budget. Returns
    lists of response tokens (EOS included)."""
    responses = []
    for row, prompt in enumerate(prompts):
        seq = list(fixed[row] if fixed else prompt)
        end = len(prompt) + max_new_tokens
        done = any(t == eos_id for t in seq[len(prompt):]) or len(seq) >= end
        while not done:
            token = ref_sample(ref_logits(model, seq)[-1], seed=seed, step=len(seq), row=row, **opts)
            seq.append(token)
            done = token == eos_id or len(seq) >= end
        responses.append(seq[len(prompt):])
    return responses


def _log_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    x = logits.astype(np.float64) / temperature
    x[..., VOCAB:] = -np.inf
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def ref_divergence(lp: np.ndarray, lq: np.ndarray, kind: str) -> np.ndarray:
    p, q = np.exp(lp), np.exp(lq)
    with np.errstate(invalid="ignore"):
        if kind == "forward_kl":
            return np.where(p > 0, p * (lp - lq), 0).sum(-1)
        if kind == "reverse_kl":
            return np.where(q > 0, q * (lq - lp), 0).sum(-1)
        m = (p + q) / 2
        lm = np.log(m)
        return (0.5 * np.where(p > 0, p * (lp - lm), 0) + 0.5 * np.where(q > 0, q * (lq - lm), 0)).sum(-1)


def ref_scrg(student, teacher, prompts, cfg, *, eos_id, seed):
    """method.md section 1, one row at a time. Returns (responses, per-round [(j, t_j, d_j)] lists)."""
    from mgsr_megatron.generation.scrg import round_seed  # only the seed schedule is shared

    opts = dict(greedy=False, temperature=1.0, top_k=0, top_p=1.0)
    responses = ref_generate(student, prompts, max_new_tokens=cfg.max_new_tokens, eos_id=eos_id, seed=seed, **opts)
    rounds = []
    for k in range(1, cfg.scrg_rounds + 1):
        decisions, fixed = [], []
        for row, prompt in enumerate(prompts):
            seq = prompt + responses[row]
            lp = _log_softmax(ref_logits(teacher, seq), cfg.temperature)
            lq = _log_softmax(ref_logits(student, seq), cfg.temperature)
            best = None
            for i in range(len(prompt), len(seq)):
                if cfg.scrg_teacher_token == "greedy":
                    t_i = int(np.argmax(lp[i - 1]))
                else:
                    t_i = ref_sample(ref_logits(teacher, seq)[i - 1], greedy=False, temperature=cfg.temperature,
                                     top_k=0, top_p=1.0, seed=round_seed(seed, -k), step=i, row=row)
                d_i = float(ref_divergence(lp[i - 1], lq[i - 1], cfg.scrg_divergence))
                if seq[i] != t_i and (best is None or d_i > best[2]):
                    best = (i, t_i, d_i)
            if best is not None and best[2] < cfg.scrg_delta:
                best = None
            decisions.append(best)
            fixed.append(seq[:best[0]] + [best[1]] if best else seq)
        rounds.append(decisions)
        if all(d is None for d in decisions):
            break
        responses = ref_generate(student, prompts, max_new_tokens=cfg.max_new_tokens, eos_id=eos_id,
                                 seed=round_seed(seed, k), fixed=fixed, **opts)
    return responses, rounds


# ---------------------------------------------------------------------------------------------------
# Helpers.

def _tiny(arch: str, **overrides):
    from tests.dist.common import tiny

    return tiny(arch, vocab_size=VOCAB, make_vocab_size_divisible_by=64, max_position_embeddings=40, **overrides)


def _sharp_full_state(cfg, seed: int, scale: float = 25.0):
    """Dense weights with the output projection scaled up: random tiny models are nearly uniform,
    and a sample must depend on the logits for the comparison to mean anything."""
    parallel.initialize_model_parallel(1, 1, seed=seed)
    model = build_model(cfg)
    full = gather_full_state_dict(model)
    key = "output_layer.weight" if "output_layer.weight" in full else "embedding.word_embeddings.weight"
    full[key] = full[key] * scale
    return full


def _dense(cfg, full):
    parallel.initialize_model_parallel(1, 1)
    model = build_model(cfg)
    load_full_state_dict(model, full)
    model.eval()
    return model


def _same_on_all_ranks(obj, what: str):
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    for rank, other in enumerate(objs):
        assert other == objs[0], f"{what}: rank {rank} differs from rank 0: {other} vs {objs[0]}"


# ---------------------------------------------------------------------------------------------------
# Checks.

@dist_check(world_size=4)
def sampler_identical_tp124_and_dense():
    from megatron.core import parallel_state

    from mgsr_megatron.generation.sampling import SamplingOptions, sample

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, PADDED, generator=gen) * 3
    logits[:, VOCAB:] = 50.0  # padded columns must never win
    modes = [dict(greedy=True, temperature=1.0, top_k=0, top_p=1.0),
             dict(greedy=False, temperature=1.0, top_k=0, top_p=1.0),
             dict(greedy=False, temperature=0.7, top_k=5, top_p=1.0),
             dict(greedy=False, temperature=1.3, top_k=0, top_p=0.6),
             dict(greedy=False, temperature=1.0, top_k=40, top_p=0.9),
             dict(greedy=False, temperature=4.0, top_k=0, top_p=0.5)]
    for seed in (0, 11):
        for mode in modes:
            expected = [ref_sample(logits[r].numpy(), seed=seed, step=9, row=r, **mode) for r in range(6)]
            options = SamplingOptions(seed=seed, **mode)
            gathered = sample(logits, options, vocab_size=VOCAB, step=9).tolist()
            assert gathered == expected, f"gathered {mode} seed {seed}: {gathered} vs {expected}"
            for tp in (1, 2, 4):
                parallel.initialize_model_parallel(tp, 1)
                rank = parallel_state.get_tensor_model_parallel_rank()
                width = PADDED // tp
                shard = logits[:, rank * width:(rank + 1) * width]
                got = sample(shard, options, vocab_size=VOCAB, vocab_start=rank * width,
                             tp_group=parallel_state.get_tensor_model_parallel_group(), step=9)
                assert got.tolist() == expected, f"TP={tp} {mode} seed {seed}: {got.tolist()} vs {expected}"
                assert (got < VOCAB).all()
    # the sampled tokens follow the logits (not only the noise): over many seeds the most likely
    # token is the most frequent one
    counts = torch.bincount(torch.stack([sample(logits[:1], SamplingOptions(seed=s), vocab_size=VOCAB)
                                         for s in range(300)]).flatten(), minlength=PADDED)
    assert int(counts.argmax()) == int(logits[0, :VOCAB].argmax())


PROMPTS = [[5, 6, 7, 8, 9], [17, 4], [30, 31, 32]]
MODES = {"greedy": dict(greedy=True, temperature=1.0, top_k=0, top_p=1.0),
         "sampled": dict(greedy=False, temperature=1.0, top_k=0, top_p=1.0),
         "top_k_top_p": dict(greedy=False, temperature=0.8, top_k=20, top_p=0.9)}


@dist_check(world_size=4)
def scrg_divergences_tp124_with_padding_only_shard():
    """SCRG's per-position divergences (losses.divergences.divergence on the masked shards, as
    scrg.detect calls it) == numpy on the gathered logits, with a true vocabulary of 150 in 256 padded
    entries: at TP=4 the last shard holds padding only."""
    from megatron.core import parallel_state

    from mgsr_megatron.losses.divergences import divergence
    from mgsr_megatron.models.vocab import mask_padded_logits

    vocab = 150
    gen = torch.Generator().manual_seed(5)
    teacher_logits, student_logits = (torch.randn(3, 4, PADDED, generator=gen) * 4 for _ in range(2))
    teacher_logits[..., vocab:] = 80.0  # padded columns must not count
    for temperature, kind in itertools.product((1.0, 0.5), ("forward_kl", "reverse_kl", "jsd")):
        lp, lq = ((x[..., :vocab].double().numpy() / temperature) for x in (teacher_logits, student_logits))
        lp, lq = (x - x.max(-1, keepdims=True) for x in (lp, lq))
        lp, lq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (lp, lq))
        expected = ref_divergence(np.pad(lp, ((0, 0), (0, 0), (0, PADDED - vocab)), constant_values=-np.inf),
                                  np.pad(lq, ((0, 0), (0, 0), (0, PADDED - vocab)), constant_values=-np.inf), kind)
        for tp in (1, 2, 4):
            parallel.initialize_model_parallel(tp, 1)
            group = parallel_state.get_tensor_model_parallel_group()
            rank = parallel_state.get_tensor_model_parallel_rank()
            width = PADDED // tp
            teacher_shard, student_shard = (mask_padded_logits(x[..., rank * width:(rank + 1) * width], vocab, rank)
                                            for x in (teacher_logits, student_logits))
            got = divergence(student_shard, teacher_shard, kind, temperature=temperature, beta=0.5,
                             tp_group=group).double().numpy()
            where = f"TP={tp} T={temperature} {kind}"
            assert np.allclose(got, expected, rtol=1e-5, atol=1e-6), f"{where}: {got} vs {expected}"


def _generator_check(arch: str, layouts, modes, megatron_path_layouts=(), **overrides):
    """Tokens of `generate` == the dense reference at each layout and mode. The lean KV-cached stage
    runs by default (checked); at `megatron_path_layouts` Megatron's inference path runs as well."""
    from mgsr_megatron.generation.generator import generate
    from mgsr_megatron.generation.kv_decode import unsupported_reason
    from mgsr_megatron.generation.sampling import SamplingOptions

    cfg = _tiny(arch, **overrides)
    full = _sharp_full_state(cfg, seed=21)
    reference = _dense(cfg, full)
    cases = []
    for name, mode in modes.items():
        plain = ref_generate(reference, PROMPTS, max_new_tokens=9, eos_id=249, seed=5, **mode)
        # early EOS: make the third token of row 1's response the EOS id, rerun the reference
        eos = plain[1][2]
        cases.append((name, mode, eos, ref_generate(reference, PROMPTS, max_new_tokens=9, eos_id=eos, seed=5, **mode)))
    assert any(len(r) < 9 for *_, expected in cases for r in expected), "no row stopped early at EOS"
    for tp, pp in layouts:
        parallel.initialize_model_parallel(tp, pp, models={"m": cfg})
        model = build_model(cfg)
        load_full_state_dict(model, full)
        fallback = unsupported_reason(model) is not None
        paths = (False, True) if (tp, pp) in megatron_path_layouts else (False,)
        for (name, mode, eos, expected), megatron_path in itertools.product(cases, paths):
            with megatron_inference_path(megatron_path):
                out = generate(model, PROMPTS, SamplingOptions(max_new_tokens=9, eos_id=eos, seed=5, **mode),
                               vocab_size=VOCAB)
            where = f"{arch} {overrides or ''} TP={tp} PP={pp} {name} {out.stepper.path} path"
            assert out.stepper.path == ("megatron" if megatron_path or fallback else "lean"), where
            got = out.responses()
            assert got == expected, f"{where}: {got} vs reference {expected}"
            assert out.response_lengths.tolist() == [len(r) for r in expected]
            _same_on_all_ranks(out.tokens.tolist(), f"{where} tokens")


@dist_check(world_size=4)
def generator_matches_dense_reference_llama():
    _generator_check("llama", LAYOUTS, MODES, megatron_path_layouts=[(2, 2)])


@dist_check(world_size=4)
def generator_matches_dense_reference_gpt2():
    # learned absolute positions; TP2xPP2 covers both kinds of parallelism
    _generator_check("gpt2", [(2, 2)], {"sampled": MODES["sampled"]})


@dist_check(world_size=4)
def evaluation_answers_independent_of_dp_size():
    """evaluate()'s sampled answers at DP=4, DP=2 (TP=2) and DP=1 (TP2xPP2) equal the dense reference's,
    block by block: batch k of consecutive prompts samples with seed*100003 + its first prompt's index."""
    from types import SimpleNamespace

    from mgsr_megatron.evaluation.evaluate import answers_per_seed
    from mgsr_megatron.generation.sampling import SamplingOptions

    cfg = _tiny("llama")
    full = _sharp_full_state(cfg, seed=22)
    reference = _dense(cfg, full)
    prompts = [[5 + i, 6 + 2 * i, 40 + i][: 1 + i % 3] for i in range(7)]  # 7 prompts, blocks of 2: 4 blocks
    items = [SimpleNamespace(prompt_ids=torch.tensor(p)) for p in prompts]
    tokenizer = SimpleNamespace(eos_id=249, decode=lambda ids: " ".join(map(str, ids)))
    options = [SamplingOptions(max_new_tokens=6, eos_id=249, seed=seed) for seed in (10, 20)]
    expected = []
    for seed in (10, 20):
        answers = {}
        for start in range(0, len(prompts), 2):
            block = ref_generate(reference, prompts[start:start + 2], max_new_tokens=6, eos_id=249,
                                 seed=seed * 100_003 + start, **MODES["sampled"])
            answers.update({start + row: tokenizer.decode([t for t in ids if t != 249])
                            for row, ids in enumerate(block)})
        expected.append(answers)
    for tp, pp in [(1, 1), (2, 1), (2, 2)]:
        parallel.initialize_model_parallel(tp, pp, models={"m": cfg})
        model = build_model(cfg)
        load_full_state_dict(model, full)
        got = answers_per_seed(model, items, tokenizer, options, vocab_size=VOCAB, batch_size=2)
        assert got == expected, f"TP={tp} PP={pp} (DP={4 // (tp * pp)}): {got} vs reference {expected}"


@dist_check(world_size=4)
def scrg_matches_dense_reference():
    from mgsr_megatron.generation.sampling import SamplingOptions
    from mgsr_megatron.generation.scrg import ScrgSettings, scrg

    student_cfg, teacher_cfg = _tiny("llama", num_layers=2), _tiny("llama", num_layers=2, hidden_size=96,
                                                                     ffn_hidden_size=128)
    student_full = _sharp_full_state(student_cfg, seed=31, scale=6.0)
    teacher_full = _sharp_full_state(teacher_cfg, seed=41, scale=25.0)
    settings = [MGSRConfig(max_new_tokens=8, scrg_rounds=2, scrg_divergence="forward_kl"),
                MGSRConfig(max_new_tokens=8, scrg_rounds=1, scrg_divergence="jsd", scrg_teacher_token="sampled"),
                MGSRConfig(max_new_tokens=8, scrg_rounds=1, scrg_divergence="reverse_kl", scrg_delta=0.5)]
    student_ref, teacher_ref = _dense(student_cfg, student_full), _dense(teacher_cfg, teacher_full)
    expected = [ref_scrg(student_ref, teacher_ref, PROMPTS, c, eos_id=3, seed=8) for c in settings]
    assert any(d is not None for _, rounds in expected for d in rounds[0]), "reference corrected nothing"
    for tp, pp in LAYOUTS:
        parallel.initialize_model_parallel(tp, pp, models={"s": student_cfg, "t": teacher_cfg})
        student, teacher = build_model(student_cfg), build_model(teacher_cfg)
        load_full_state_dict(student, student_full)
        load_full_state_dict(teacher, teacher_full)
        for index, (c, (responses, rounds)) in enumerate(zip(settings, expected)):
            if index > 0 and (tp, pp) != (2, 2):
                continue  # the options are layout-independent code: check them at TP2xPP2 only
            where = f"TP={tp} PP={pp} {c.scrg_divergence}/{c.scrg_teacher_token}/delta={c.scrg_delta}"
            results = {}
            # reuse False: a cold regeneration; "megatron": Megatron's inference path generates and the
            # teacher scores on it too (generation/teacher_scores.py: whole-batch suffix passes, round 2)
            variants = (True, False) + (("megatron",) if (tp, pp) == (2, 2) else ()) if index == 0 else (True,)
            for reuse in variants:
                options = SamplingOptions(max_new_tokens=c.max_new_tokens, eos_id=3, seed=8)
                with megatron_inference_path(reuse == "megatron"):
                    out, stats = scrg(student, teacher, PROMPTS, options, settings=ScrgSettings.from_config(c),
                                      vocab_size=VOCAB, reuse_cache=reuse is not False)
                results[reuse] = out.tokens.tolist()
                assert out.responses() == responses, f"{where} reuse={reuse}: {out.responses()} vs {responses}"
                assert len(stats["per_round"]) == len(rounds), where
                for k, (decision, ref_round) in enumerate(zip(stats["per_round"], rounds)):
                    for row, ref in enumerate(ref_round):
                        j, t_j, d_j = decision[row].tolist()
                        if ref is None:
                            assert j == -1, f"{where} round {k} row {row}: corrected at {j}, reference did not"
                        else:
                            assert (int(j), int(t_j)) == ref[:2], \
                                f"{where} round {k} row {row}: {(j, t_j)} vs {ref[:2]}"
                            assert abs(d_j - ref[2]) <= 1e-5 * max(1.0, ref[2]), f"{where}: d_j {d_j} vs {ref[2]}"
            if False in results:
                assert results[True] == results[False], f"{where}: cache reuse differs from regeneration"
            _same_on_all_ranks(results[True], where)


@dist_check(world_size=4)
def schedule_same_decision_on_every_rank():
    from mgsr_megatron.data.schedule import DataSchedule

    parallel.initialize_model_parallel(1, 1)
    rank = dist.get_rank()
    for kind in ("off_policy", "on_policy"):
        schedule = DataSchedule(kind, seed=77, capacity=6, init_threshold=0.3)
        decisions = []
        for step in range(60):
            kind_now = schedule.decide(step, 60)
            decisions.append(kind_now)
            if kind_now == "generate":
                schedule.push([(rank, step)] * 2)  # each rank its own samples, the same number
            if step % 10 == 9:  # every rank reports the same (data-parallel averaged) loss
                schedule.report_validation_loss([1.0, 1.2, 1.1, 1.5, 1.7, 1.6][step // 10])
        assert "generate" in decisions and (kind == "on_policy" or "replay" in decisions), decisions
        _same_on_all_ranks((decisions, schedule.threshold), f"{kind} schedule")


# ---------------------------------------------------------------------------------------------------
# Regeneration edge cases (issue 13): SCRG's regeneration once handed a decode pass ZERO rows (a
# crash in the lean stage, "cannot reshape tensor of 0 elements into shape [0, 0, -1, head_dim]";
# Megatron's path got a zero-width pass) whenever a row that takes no part in the regeneration (not
# corrected: its response is complete) ends at or before the smallest corrected position j; and it
# ran passes holding only rows that no longer sample (finished ones, or rows whose fixed tokens end in
# EOS / fill the budget). The rule since: only rows that still sample take part, a pass starts at the
# first position such a row samples, and none runs once they have all finished.

def regeneration_edge_cases(reference):
    """[(name, eos_id, max_new_tokens, j, t_j, passes, plain, expected)] over PROMPTS with the
    sampled mode (first generation seed 2, regeneration seed 9): `plain` the first generation's
    responses, `expected` the reference's responses after correcting (j, t_j) (j = -1: row not
    corrected), `passes` the number of decode passes the regeneration needs (None: not fixed here,
    it depends on when sampling hits EOS)."""
    opts = MODES["sampled"]
    full = ref_generate(reference, PROMPTS, max_new_tokens=8, eos_id=249, seed=2, **opts)
    assert all(len(r) == 8 for r in full), f"the cases below assume budget-length responses: {full}"
    short_eos = full[1][0]  # with this EOS row 1's response is one token: it ends at position 3
    assert short_eos != 249 and short_eos not in full[0] + full[2], (short_eos, full)
    p0, p1, p2 = (len(p) for p in PROMPTS)  # 5, 2, 3: rows of different prompt lengths
    cases = [
        # row 1 (uncorrected) ended by EOS at 3 <= j_0 = 8: the first pass had zero rows
        ("uncorrected_row_ends_by_eos_before_j", short_eos, 8, [p0 + 3, -1, -1], [11, -1, -1], None),
        # rows 1, 2 (uncorrected, shorter prompts) reach max_new_tokens at 6 and 7 <= j_0 = 7
        ("uncorrected_rows_end_at_budget_before_j", 249, 4, [p0 + 2, -1, -1], [11, -1, -1], 1),
        # every corrected row gets the teacher's EOS: nothing samples, no pass may run
        ("corrected_rows_end_with_teacher_eos", short_eos, 8, [p0 + 3, -1, p2 + 5], [short_eos, -1, short_eos], 0),
        # every row corrected at its last budget position: nothing samples (before: passes of finished rows)
        ("all_rows_corrected_at_last_position", 249, 8, [p0 + 7, p1 + 7, p2 + 7], [11, 12, 13], 0),
        # the only corrected row at its last position, the others end before it: zero rows before
        ("corrected_at_last_position_others_shorter", 249, 8, [p0 + 7, -1, -1], [11, -1, -1], 0),
        # row 1 samples one token and reaches its budget; rows 0 and 2 are complete and longer:
        # before, passes of the finished row 1 went on until row 0's end
        ("sampling_row_finishes_before_complete_rows", 249, 8, [-1, p1 + 6, -1], [-1, 12, -1], 1),
    ]
    out = []
    for name, eos, new_tokens, j, t_j, passes in cases:
        plain = ref_generate(reference, PROMPTS, max_new_tokens=new_tokens, eos_id=eos, seed=2, **opts)
        fixed = [p + r[:jr - len(p)] + [tr] if jr >= 0 else p + r
                 for p, r, jr, tr in zip(PROMPTS, plain, j, t_j)]
        for p, r, jr in zip(PROMPTS, plain, j):
            assert jr < len(p) + len(r), f"{name}: j={jr} beyond the response {r}"
        expected = ref_generate(reference, PROMPTS, max_new_tokens=new_tokens, eos_id=eos, seed=9, fixed=fixed, **opts)
        out.append((name, eos, new_tokens, j, t_j, passes, plain, expected))
    return out


@contextlib.contextmanager
def megatron_inference_path(enabled: bool = True):
    """Inside the block (when `enabled`) the generator decodes with Megatron-Core's inference path, its
    fallback for models the lean KV-cached stage does not cover, instead of the lean stage."""
    from mgsr_megatron.generation import generator

    original = generator.unsupported_reason
    if enabled:
        generator.unsupported_reason = lambda gpt: "Megatron's inference path forced by a test"
    try:
        yield
    finally:
        generator.unsupported_reason = original


class PassRecorder:
    """Records (rows, columns, offset) of every decode pass (PipelineStepper.forward) while active; the
    teacher's scoring passes (all_columns, generation/teacher_scores.py) are not decode passes."""

    def __init__(self):
        self.passes = []

    def __enter__(self):
        from mgsr_megatron.generation.generator import PipelineStepper

        self.original = PipelineStepper.forward
        recorder = self

        def forward(stepper, tokens, offset, **stage_options):
            if not stage_options.get("all_columns"):
                recorder.passes.append((int(tokens.shape[0]), int(tokens.shape[1]), int(offset)))
            return recorder.original(stepper, tokens, offset, **stage_options)

        PipelineStepper.forward = forward
        return self

    def __exit__(self, *exc):
        from mgsr_megatron.generation.generator import PipelineStepper

        PipelineStepper.forward = self.original
        return False


def check_regeneration_edge_cases(model, cases, where: str, megatron_path: bool = False) -> list:
    """Run every case on `model` (any layout) and compare with the reference; returns the tokens.
    `megatron_path`: generate and regenerate on Megatron-Core's inference path."""
    with megatron_inference_path(megatron_path):
        return _regeneration_edge_cases(model, cases, where, megatron_path)


def _regeneration_edge_cases(model, cases, where: str, megatron_path: bool) -> list:
    from mgsr_megatron.generation.generator import generate
    from mgsr_megatron.generation.sampling import SamplingOptions
    from mgsr_megatron.generation.scrg import regenerate

    results = []
    for name, eos, new_tokens, j, t_j, passes, plain, expected in cases:
        at = f"{where} {name}" + (" (megatron path)" if megatron_path else "")
        first = SamplingOptions(max_new_tokens=new_tokens, eos_id=eos, seed=2, **MODES["sampled"])
        out = generate(model, PROMPTS, first, vocab_size=VOCAB, record_logits=True)
        assert out.responses() == plain, f"{at}: first generation {out.responses()} vs {plain}"
        common = dict(options=SamplingOptions(max_new_tokens=new_tokens, eos_id=eos, seed=9), vocab_size=VOCAB)
        jt, tt = torch.tensor(j), torch.tensor(t_j)
        with PassRecorder() as reused_passes:
            reused = regenerate(model, out, jt, tt, **common)
        with PassRecorder() as cold_passes:
            cold = regenerate(model, out, jt, tt, reuse_cache=False, **common)
        for kind, result, fed in (("reused", reused, reused_passes.passes), ("cold", cold, cold_passes.passes)):
            assert result.responses() == expected, f"{at} {kind}: {result.responses()} vs reference {expected}"
            assert result.response_lengths.tolist() == [len(r) for r in expected], at
            ends = [len(p) + len(r) for p, r in zip(PROMPTS, expected)]
            assert tuple(result.tokens.shape) == (3, max(ends)), f"{at} {kind}: shape {tuple(result.tokens.shape)}"
            for row, e in enumerate(ends):
                assert (result.tokens[row, e:] == eos).all(), f"{at} {kind}: row {row} not padded after {e}"
            assert all(rows > 0 and columns > 0 for rows, columns, _ in fed), f"{at} {kind}: empty pass in {fed}"
        if passes is not None:
            fed = reused_passes.passes
            assert len(fed) == passes, f"{at}: {len(fed)} passes {fed}, expected {passes}"
        # only corrected rows that still sample are computed (on the lean stage)
        if not megatron_path and out.stepper.path == "lean":
            sampling = sum(1 for p, jr, tr in zip(PROMPTS, j, t_j)
                           if jr >= 0 and tr != eos and jr + 1 < len(p) + new_tokens)
            assert all(rows <= sampling for rows, _, _ in reused_passes.passes), f"{at}: {reused_passes.passes}"
        assert torch.equal(reused.tokens, cold.tokens), at
        if reused.logits is not None:  # last stage: the recorded logits (next round's detection) agree too
            torch.testing.assert_close(reused.logits, cold.logits, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, at=at: f"{at}: {m}")
        results.append(reused.tokens.tolist())
    return results


@dist_check(world_size=4)
def regeneration_never_runs_an_empty_pass():
    """Issue 13 at TP=2 and TP2xPP2 (lean stage; Megatron's path at TP=2): every regeneration edge
    case equals the dense reference, with and without cache reuse, and no pass has zero rows."""
    cfg = _tiny("llama", num_layers=2)
    full = _sharp_full_state(cfg, seed=31, scale=6.0)
    cases = regeneration_edge_cases(_dense(cfg, full))
    for tp, pp in ((2, 1), (2, 2)):
        parallel.initialize_model_parallel(tp, pp, models={"s": cfg})
        model = build_model(cfg)
        load_full_state_dict(model, full)
        where = f"TP={tp} PP={pp}"
        tokens = check_regeneration_edge_cases(model, cases, where)
        if (tp, pp) == (2, 1):
            tokens += check_regeneration_edge_cases(model, cases, where, megatron_path=True)
        _same_on_all_ranks(tokens, where)
