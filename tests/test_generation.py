"""Single-process tests of sampling, the KV-cached generator and SCRG (TP1/PP1, a world of one).

The multi-rank layouts (TP=2/4, PP=2, TP2xPP2) are in tests/dist/check_generation.py; both compare
against the same independent dense reference defined there.
"""

import dataclasses

import numpy as np
import pytest
import torch

from mgsr_megatron.config import MGSRConfig
from mgsr_megatron.errors import UserError
from mgsr_megatron.generation import SamplingOptions, ScrgSettings, generate, sample, scrg
from mgsr_megatron.generation.sampling import uniform_noise
from tests.dist.check_generation import (
    MODES,
    PADDED,
    PROMPTS,
    VOCAB,
    PassRecorder,
    _dense,
    _sharp_full_state,
    _tiny,
    megatron_inference_path,
    ref_generate,
    ref_gumbel,
    ref_sample,
    ref_scrg,
    regeneration_edge_cases,
)


@pytest.fixture(scope="module")
def models():
    from mgsr_megatron import parallel

    parallel.init_distributed()
    student_cfg = _tiny("llama", num_layers=2)
    teacher_cfg = _tiny("llama", num_layers=2, hidden_size=96, ffn_hidden_size=128)
    student = _dense(student_cfg, _sharp_full_state(student_cfg, seed=31, scale=6.0))
    teacher = _dense(teacher_cfg, _sharp_full_state(teacher_cfg, seed=41, scale=25.0))
    return student, teacher


def test_noise_matches_spec_and_is_uniform():
    rows = torch.arange(3)
    ids = torch.arange(PADDED)
    u = uniform_noise(123, 17, rows, ids)
    for r in range(3):
        expected = np.exp(-np.exp(-ref_gumbel(123, 17, r, PADDED)))  # back from Gumbel to uniform
        np.testing.assert_allclose(u[r].numpy(), expected, rtol=1e-12)
    # seeds, steps and rows with the top bit set (the [rows, V] part of the hash runs on int32 words)
    high_rows = [2 ** 31 + 5, 2 ** 32 - 1]
    high = uniform_noise(2 ** 32 - 1, 2 ** 31 + 3, torch.tensor(high_rows), ids)
    for r, row in enumerate(high_rows):
        expected = np.exp(-np.exp(-ref_gumbel(2 ** 32 - 1, 2 ** 31 + 3, row, PADDED)))
        np.testing.assert_allclose(high[r].numpy(), expected, rtol=1e-12)
    big = uniform_noise(5, 0, torch.arange(64), torch.arange(4096)).flatten()
    assert 0 < big.min() and big.max() < 1
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002
    # the value at a global id is the same whichever slice of ids is asked for
    assert torch.equal(uniform_noise(5, 3, rows, torch.arange(128, 256)), uniform_noise(5, 3, rows, ids)[:, 128:])
    assert not torch.equal(uniform_noise(5, 3, rows, ids), uniform_noise(5, 4, rows, ids))


@pytest.mark.parametrize("mode", [dict(greedy=True, temperature=1.0, top_k=0, top_p=1.0),
                                  dict(greedy=False, temperature=1.0, top_k=0, top_p=1.0),
                                  dict(greedy=False, temperature=0.5, top_k=3, top_p=1.0),
                                  dict(greedy=False, temperature=1.0, top_k=0, top_p=0.3),
                                  dict(greedy=False, temperature=2.0, top_k=50, top_p=0.95)])
def test_sampler_matches_dense_reference(mode):
    logits = torch.randn(16, PADDED, generator=torch.Generator().manual_seed(1)) * 2
    logits[:, VOCAB:] = 100.0  # padded entries would win every time if they were not masked
    for seed in range(4):
        got = sample(logits, SamplingOptions(seed=seed, **mode), vocab_size=VOCAB, step=seed + 2)
        expected = [ref_sample(logits[r].numpy(), seed=seed, step=seed + 2, row=r, **mode) for r in range(16)]
        assert got.tolist() == expected
        assert (got < VOCAB).all()


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0] + [-5.0] * (PADDED - 4)])
    seen_k = {int(sample(logits, SamplingOptions(top_k=2, seed=s), vocab_size=VOCAB)) for s in range(200)}
    assert seen_k == {0, 1}
    probs = torch.softmax(logits[0, :VOCAB], -1)
    top_p = float(probs[0] + probs[1] / 2)  # needs tokens 0 and 1 to reach it, never token 2
    seen_p = {int(sample(logits, SamplingOptions(top_p=top_p, seed=s), vocab_size=VOCAB)) for s in range(200)}
    assert seen_p == {0, 1}


def test_sampling_frequencies_follow_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5] + [-30.0] * (PADDED - 4)])
    draws = torch.stack([sample(logits, SamplingOptions(), vocab_size=VOCAB, step=s) for s in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4)[:4].double() / 4000
    np.testing.assert_allclose(freq.numpy(), torch.softmax(logits[0, :4].double(), -1).numpy(), atol=0.025)


@pytest.mark.parametrize("mode", ["greedy", "sampled", "top_p"])
def test_generate_matches_full_recompute_reference(models, mode):
    student, _ = models
    opts = {"greedy": dict(greedy=True, temperature=1.0, top_k=0, top_p=1.0),
            "sampled": dict(greedy=False, temperature=1.0, top_k=0, top_p=1.0),
            "top_p": dict(greedy=False, temperature=0.7, top_k=0, top_p=0.8)}[mode]
    plain = ref_generate(student, PROMPTS, max_new_tokens=7, eos_id=249, seed=2, **opts)
    eos = plain[0][1]  # early EOS in row 0
    expected = ref_generate(student, PROMPTS, max_new_tokens=7, eos_id=eos, seed=2, **opts)
    out = generate(student, PROMPTS, SamplingOptions(max_new_tokens=7, eos_id=eos, seed=2, **opts), vocab_size=VOCAB)
    assert out.responses() == expected
    ends = [len(p) + len(r) for p, r in zip(PROMPTS, expected)]
    assert out.response_lengths[0] <= 2 and out.tokens.shape == (3, max(ends))
    # padding after a row's end is pad_id (= eos by default)
    row0_end = len(PROMPTS[0]) + int(out.response_lengths[0])
    assert (out.tokens[0, row0_end:] == eos).all()


def test_lean_stage_is_used_and_megatron_path_is_the_fallback(models):
    from mgsr_megatron.generation.generator import PipelineStepper
    from mgsr_megatron.generation.kv_decode import unsupported_reason

    student, _ = models
    assert unsupported_reason(student) is None and PipelineStepper(student, 3, 16).path == "lean"
    opts = SamplingOptions(max_new_tokens=7, eos_id=249, seed=2)
    lean = generate(student, PROMPTS, opts, vocab_size=VOCAB)
    with megatron_inference_path():
        megatron = generate(student, PROMPTS, opts, vocab_size=VOCAB)
    assert megatron.stepper.path == "megatron" and torch.equal(lean.tokens, megatron.tokens)
    student.config.sequence_parallel = True  # a layout the lean stage does not cover
    try:
        assert unsupported_reason(student) == "sequence parallelism"
        assert PipelineStepper(student, 3, 16).path == "megatron"
    finally:
        student.config.sequence_parallel = False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adapter is only active without CUDA")
def test_lean_decoding_runs_without_the_cpu_adapter_and_megatron_keeps_it(models, monkeypatch):
    """The decoding loop suspends the adapter's mode on the lean path only: Megatron's inference path
    needs it (device="cuda" in its masks and buffers)."""
    from mgsr_megatron.generation.generator import MegatronStage
    from mgsr_megatron.generation.kv_decode import LeanStage
    from mgsr_megatron.platform import cpu

    student, _ = models
    modes = {}
    for stage in (LeanStage, MegatronStage):
        def recording(self, *args, _call=stage.__call__, _name=stage.__name__, **kwargs):
            modes.setdefault(_name, set()).add(torch.overrides._get_current_function_mode() is cpu._MODE)
            return _call(self, *args, **kwargs)
        monkeypatch.setattr(stage, "__call__", recording)
    opts = SamplingOptions(max_new_tokens=4, eos_id=249, seed=2)
    generate(student, PROMPTS, opts, vocab_size=VOCAB)
    with megatron_inference_path():
        generate(student, PROMPTS, opts, vocab_size=VOCAB)
    assert cpu.is_active() and modes == {"LeanStage": {False}, "MegatronStage": {True}}
    assert torch.overrides._get_current_function_mode() is cpu._MODE  # back after the loop


def test_recorded_logits_equal_full_recompute(models):
    """generate(record_logits=True) keeps what SCRG's detection would otherwise recompute: the
    student's logits at every position from each row's last prompt token on."""
    student, _ = models
    out = generate(student, PROMPTS, SamplingOptions(max_new_tokens=7, eos_id=249, seed=2), vocab_size=VOCAB,
                   record_logits=True)
    assert out.logits_recorded and out.logits.shape == (*out.tokens.shape, PADDED)
    for row, prompt in enumerate(PROMPTS):
        end = len(prompt) + int(out.response_lengths[row])
        with torch.no_grad():
            full = student(out.tokens[row:row + 1, :end], torch.arange(end).unsqueeze(0), None)[0]
        first = len(prompt) - 1  # the output at the last prompt token predicts the first response token
        torch.testing.assert_close(out.logits[row, first:end - 1], full[first:end - 1], rtol=1e-4, atol=1e-4)


def test_scrg_matches_reference_and_cache_reuse(models):
    student, teacher = models
    cfg = MGSRConfig(max_new_tokens=6, scrg_rounds=2)
    responses, rounds = ref_scrg(student, teacher, PROMPTS, cfg, eos_id=3, seed=8)
    options = SamplingOptions(max_new_tokens=cfg.max_new_tokens, eos_id=3, seed=8)
    settings = ScrgSettings.from_config(cfg)
    reused, stats = scrg(student, teacher, PROMPTS, options, settings=settings, vocab_size=VOCAB)
    cold, _ = scrg(student, teacher, PROMPTS, options, settings=settings, vocab_size=VOCAB, reuse_cache=False)
    assert reused.responses() == responses == cold.responses()
    assert torch.equal(reused.tokens, cold.tokens)
    for decision, ref_round in zip(stats["per_round"], rounds):
        assert [tuple(int(v) for v in d[:2]) if d[0] >= 0 else None for d in decision.tolist()] == \
               [r[:2] if r else None for r in ref_round]
    last = {row: d for ref_round in rounds for row, d in enumerate(ref_round) if d}
    assert stats["corrected"].tolist() == [row in last for row in range(3)]
    assert stats["j"].tolist() == [last[row][0] if row in last else -1 for row in range(3)]


def test_regeneration_computes_only_rows_without_cache(models):
    """Regenerating from each row's own j: a pass feeds only the rows whose cache ends below the
    position it feeds (rows not corrected: none); tokens and recorded logits equal a regeneration
    with a fresh cache that recomputes every row."""
    from mgsr_megatron.generation.scrg import regenerate

    student, _ = models
    out = generate(student, PROMPTS, SamplingOptions(max_new_tokens=8, eos_id=249, seed=2), vocab_size=VOCAB,
                   record_logits=True)
    j = torch.tensor([len(PROMPTS[0]) + 5, -1, len(PROMPTS[2]) + 2])
    t_j = torch.tensor([11, -1, 12])
    fed = []  # (rows, offset) per pass
    forward = out.stepper.forward
    out.stepper.forward = lambda tokens, offset: fed.append((tokens.shape[0], offset)) or forward(tokens, offset)
    common = dict(options=SamplingOptions(max_new_tokens=8, eos_id=249, seed=9), vocab_size=VOCAB)
    reused = regenerate(student, out, j, t_j, **common)
    cold = regenerate(student, out, j, t_j, reuse_cache=False, **common)
    assert torch.equal(reused.tokens, cold.tokens) and torch.equal(reused.response_lengths, cold.response_lengths)
    assert reused.tokens[0, j[0]] == 11 and reused.tokens[2, j[2]] == 12
    assert torch.equal(reused.tokens[1], out.tokens[1])
    assert fed[0] == (1, int(j[2])) and {rows for rows, offset in fed if offset < j[0]} == {1}
    assert {rows for rows, offset in fed if offset >= j[0]} == {2}
    torch.testing.assert_close(reused.logits, cold.logits, rtol=1e-4, atol=1e-4)
    # Megatron's static cache decodes whole batches: every row is fed from min j, same tokens
    with megatron_inference_path():
        megatron = generate(student, PROMPTS, SamplingOptions(max_new_tokens=8, eos_id=249, seed=2), vocab_size=VOCAB,
                            record_logits=True)
    assert megatron.stepper.path == "megatron" and torch.equal(megatron.tokens, out.tokens)
    assert torch.equal(regenerate(student, megatron, j, t_j, **common).tokens, reused.tokens)
    nothing = torch.full_like(j, -1)
    assert torch.equal(regenerate(student, reused, nothing, nothing, **common).tokens, reused.tokens)


@pytest.fixture(scope="module")
def edge_cases(models):
    return {case[0]: case for case in regeneration_edge_cases(models[0])}


EDGE_CASES = ["uncorrected_row_ends_by_eos_before_j", "uncorrected_rows_end_at_budget_before_j",
              "corrected_rows_end_with_teacher_eos", "all_rows_corrected_at_last_position",
              "corrected_at_last_position_others_shorter", "sampling_row_finishes_before_complete_rows"]


@pytest.mark.parametrize("megatron_path", [False, True], ids=["lean", "megatron"])
@pytest.mark.parametrize("name", EDGE_CASES)
def test_regeneration_edge_cases_never_run_an_empty_pass(models, edge_cases, name, megatron_path):
    """Issue 13: a regeneration whose rows that take no part (not corrected, or corrected with nothing
    left to sample) end at or before the smallest corrected j handed the first pass zero rows (the
    lean stage crashed; Megatron's path got a zero-width pass). Every case must equal the dense
    reference (with and without cache reuse), pad after each row's end, run no empty pass, and run
    only the passes the rows that sample need (see regeneration_edge_cases)."""
    from tests.dist.check_generation import check_regeneration_edge_cases

    check_regeneration_edge_cases(models[0], [edge_cases[name]], "TP1", megatron_path=megatron_path)


def test_scrg_regeneration_with_short_uncorrected_row(models, edge_cases, monkeypatch):
    """The crash as the run met it: scrg -> regenerate -> decode with an uncorrected row (its response
    ended by EOS) ending before the only corrected row's j. Detection is replaced by fixed decisions;
    the second round then corrects nothing."""
    import importlib

    scrg_module = importlib.import_module("mgsr_megatron.generation.scrg")  # the package exports scrg()
    student, teacher = models
    _, eos, new_tokens, j, t_j, _, plain, _ = edge_cases["uncorrected_row_ends_by_eos_before_j"]
    decisions = iter([torch.tensor([[j[0], t_j[0], 1.0], [-1, -1, float("nan")], [-1, -1, float("nan")]],
                                   dtype=torch.float64), torch.full((3, 3), -1.0, dtype=torch.float64)])
    monkeypatch.setattr(scrg_module, "decide", lambda *a, **k: next(decisions))
    settings = ScrgSettings.from_config(MGSRConfig(max_new_tokens=new_tokens, scrg_rounds=2))
    with PassRecorder() as fed:
        out, stats = scrg(student, teacher, PROMPTS, SamplingOptions(max_new_tokens=new_tokens, eos_id=eos, seed=2),
                          settings=settings, vocab_size=VOCAB)
    # the regeneration's seed is round_seed(2, 1), not 9: compare its fixed part and the rest's shape
    assert out.responses()[1:] == plain[1:] and out.responses()[0][:j[0] - 5 + 1] == plain[0][:3] + [11]
    assert stats["corrected"].tolist() == [True, False, False] and stats["j"].tolist() == [j[0], -1, -1]
    assert all(rows > 0 and columns > 0 for rows, columns, _ in fed.passes), fed.passes


def test_generate_passes_cover_every_row_with_different_prompt_lengths(models):
    """generate (no reused cache): the first pass prefills up to the shortest prompt for every row, then
    one column per pass for every row, until the last row ends (here by max_new_tokens). Not a path of
    issue 13 (every row samples, nothing is cached), checked so that it stays so."""
    student, _ = models
    with PassRecorder() as fed:
        out = generate(student, PROMPTS, SamplingOptions(max_new_tokens=4, eos_id=249, seed=2, **MODES["sampled"]),
                       vocab_size=VOCAB)
    assert out.response_lengths.tolist() == [4, 4, 4]
    shortest, longest_end = min(map(len, PROMPTS)), max(map(len, PROMPTS)) + 4
    assert fed.passes == [(3, shortest, 0)] + [(3, 1, p) for p in range(shortest, longest_end - 1)]


def test_scrg_zero_rounds_is_plain_sampling(models):
    student, teacher = models
    options = SamplingOptions(max_new_tokens=5, eos_id=3, seed=4)
    out, stats = scrg(student, teacher, PROMPTS, options, settings=ScrgSettings(rounds=0), vocab_size=VOCAB)
    plain = generate(student, PROMPTS, options, vocab_size=VOCAB)
    assert torch.equal(out.tokens, plain.tokens) and not stats["corrected"].any()


def test_scrg_large_delta_corrects_nothing(models):
    student, teacher = models
    options = SamplingOptions(max_new_tokens=5, eos_id=3, seed=4)
    out, stats = scrg(student, teacher, PROMPTS, options, settings=ScrgSettings.from_config(MGSRConfig(scrg_delta=1e9)),
                      vocab_size=VOCAB)
    plain = generate(student, PROMPTS, options, vocab_size=VOCAB)
    assert torch.equal(out.tokens, plain.tokens) and stats["j"].tolist() == [-1, -1, -1]


@pytest.mark.parametrize("vocab", [1000, 32768])
def test_decode_logits_equal_the_linear_product(vocab):
    """The lean stage's decode product (kv_decode._decode_logits): weight-major on CPU for an output layer
    of 16 MiB and more (32768 x 128 fp32), F.linear below; the same values to rounding either way."""
    from mgsr_megatron.generation.kv_decode import _decode_logits

    generator = torch.Generator().manual_seed(5)
    weight, hidden = torch.randn(vocab, 128, generator=generator), torch.randn(6, 128, generator=generator)
    expected = (hidden.double() @ weight.double().t()).float()
    torch.testing.assert_close(_decode_logits(hidden, weight), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("first_column", [0, 5])
@pytest.mark.parametrize("megatron_path", [False, True], ids=["lean", "megatron"])
def test_teacher_scores_rescore_only_the_changed_suffixes(models, megatron_path, first_column):
    """TeacherScores (generation/teacher_scores.py): one full pass, then each changed row from its first
    changed column on, with the teacher's KV cache of the columns before it. Every call equals the
    teacher's training forward of the same tokens (Megatron's GPTModel, an independent path) from
    `first_column` on (the columns before it are not kept); rows that did not change keep their values (the
    lean stage computes only the changed rows)."""
    from mgsr_megatron.generation.scrg import _score
    from mgsr_megatron.generation.teacher_scores import TeacherScores

    _, teacher = models
    fc = first_column

    def reference(tokens):
        return _score(teacher, tokens)[:, fc:]

    tokens = torch.randint(3, VOCAB, (4, 14), generator=torch.Generator().manual_seed(3))
    changed = tokens.clone()
    changed[1, 9:] = (changed[1, 9:] + 1) % VOCAB
    changed[3, 6] = (changed[3, 6] + 5) % VOCAB
    with megatron_inference_path(megatron_path):
        scores = TeacherScores(teacher, first_column=fc)
        first = scores(tokens).clone()
        assert scores.stepper.path == ("megatron" if megatron_path else "lean") and scores.recomputed == 1.0
        assert first.shape[1] == 14 - fc
        torch.testing.assert_close(first, reference(tokens), rtol=1e-5, atol=1e-5)
        second = scores(changed)
        # the lean stage's ragged pass: row 1 from column 9, row 3 from 6; Megatron's every row from 6
        assert scores.recomputed == pytest.approx((4 * 8 if megatron_path else 5 + 8) / (4 * 14))
        torch.testing.assert_close(second, reference(changed), rtol=1e-5, atol=1e-5)
        assert torch.equal(second[:, :6 - fc], first[:, :6 - fc])
        assert not torch.equal(second[3, 6 - fc:], first[3, 6 - fc:])
        if not megatron_path:
            assert torch.equal(second[[0, 2]], first[[0, 2]]) and torch.equal(second[1, :9 - fc], first[1, :9 - fc])
        again = scores(changed.clone())
        assert scores.recomputed == 0.0 and torch.equal(again, second)
        # rows 0, 1 change from column 1 (below first_column 5 too), rows 2, 3 from column 13: the lean stage
        # computes 2 x 13 + 2 x 1 positions, Megatron's every row from column 1
        split = changed.clone()
        split[:2, 1] = (split[:2, 1] + 1) % VOCAB
        split[2:, 13] = (split[2:, 13] + 1) % VOCAB
        third = scores(split)
        assert scores.recomputed == pytest.approx((4 * 13 if megatron_path else 2 * 13 + 2 * 1) / (4 * 14))
        torch.testing.assert_close(third, reference(split), rtol=1e-5, atol=1e-5)
        scores(changed[:, :12])  # another width: scored whole again
        assert scores.recomputed == 1.0


@pytest.mark.parametrize("rounds", [1, 2])
def test_scrg_keeps_the_teacher_logits_of_the_final_sequences(models, rounds):
    """keep_teacher_view (the trainer's reuse, docs/generation.md): the same samples and decisions as
    without it; the kept logits are the teacher's over the padded view of the FINAL sequences (the training
    forward's, to rounding), and the last suffix pass computed only the rows corrected after the last
    detection, from their j."""
    import importlib

    scrg_module = importlib.import_module("mgsr_megatron.generation.scrg")
    student, teacher = models
    options = SamplingOptions(max_new_tokens=5, eos_id=3, seed=4)
    settings = ScrgSettings(rounds=rounds, delta=5.5)  # between the rows' d_j here: some rows kept as sampled
    plain, plain_stats = scrg(student, teacher, PROMPTS, options, settings=settings, vocab_size=VOCAB)
    length, pad = max(map(len, PROMPTS)) + 5 + 3, 0
    out, stats = scrg(student, teacher, PROMPTS, options, settings=settings, vocab_size=VOCAB,
                      keep_teacher_view=(length, pad))
    assert torch.equal(out.tokens, plain.tokens) and torch.equal(stats["j"], plain_stats["j"])
    final = scrg_module.teacher_view(out, (length, pad))
    assert torch.equal(stats["teacher_scored"], final) and final.shape == (len(PROMPTS), length)
    for row in range(len(PROMPTS)):
        end = int(out.prompt_lengths[row] + out.response_lengths[row])
        assert final[row, :end].tolist() == out.tokens[row, :end].tolist() and (final[row, end:] == pad).all()
    # kept from the shortest prompt's last position on (the first column a decision or the loss reads)
    first = min(map(len, PROMPTS)) - 1
    assert stats["teacher_first_column"] == first
    torch.testing.assert_close(stats["teacher_logits"], scrg_module._score(teacher, final)[:, first:],
                               rtol=1e-5, atol=1e-5)
    last_j = stats["per_round"][-1][:, 0]
    assert (last_j >= 0).any() and not (last_j >= 0).all(), stats["per_round"]
    rescored = sum(length - int(j) for j in last_j if j >= 0)  # each corrected row from its own j
    assert stats["teacher_recomputed"] == pytest.approx(rescored / final.numel())


@pytest.mark.parametrize("teacher_token", ["greedy", "sampled"])
def test_rows_batched_from_several_requests_keep_their_samples(models, teacher_token):
    """SamplingOptions.row_ids (the trainer's generation of several micro-batches in one call): a row's
    samples, SCRG decisions and corrections depend on its row id, not on which rows share its call. A
    request of the last prompt alone with row id 2 gives row 2 of the whole request (whose samples the
    dense reference checks above); two requests batched into one with their own row ids give both."""
    student, teacher = models
    settings = ScrgSettings(rounds=2, teacher_token=teacher_token)
    options = SamplingOptions(max_new_tokens=6, eos_id=3, seed=9)

    def run(prompts, row_ids):
        out, stats = scrg(student, teacher, prompts, dataclasses.replace(options, row_ids=row_ids),
                          settings=settings, vocab_size=VOCAB)
        return out.responses(), stats["j"].tolist(), stats["teacher_token"].tolist()

    whole = run(PROMPTS, None)
    assert run(PROMPTS[2:], (2,)) == tuple(column[2:] for column in whole)
    first, second = run(PROMPTS[:2], (10, 11)), run(PROMPTS[2:], (20,))
    assert run(PROMPTS, (10, 11, 20)) == tuple(a + b for a, b in zip(first, second))
    assert first != tuple(column[:2] for column in whole) or second[0] != whole[0][2:]  # the ids matter
    sampled = generate(student, PROMPTS, dataclasses.replace(options, row_ids=(10, 11, 20)), vocab_size=VOCAB)
    parts = [generate(student, PROMPTS[:2], dataclasses.replace(options, row_ids=(10, 11)), vocab_size=VOCAB),
             generate(student, PROMPTS[2:], dataclasses.replace(options, row_ids=(20,)), vocab_size=VOCAB)]
    assert sampled.responses() == parts[0].responses() + parts[1].responses()


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([[1] * 41], dict(max_new_tokens=1), "41 tokens, longer than the model's context of 40"),
    ([[1] * 30], dict(max_new_tokens=11), "30 tokens) + max_new_tokens (11) = 41 overflows the model's 40"),
    ([[1, 2]], dict(max_new_tokens=4, eos_id=250), "eos_id 250 is outside the vocabulary [0, 250)"),
    ([[1, 2]], dict(max_new_tokens=4, eos_id=-1), "eos_id -1 is outside the vocabulary"),
    ([[1, 2], []], dict(max_new_tokens=4), "prompt 1 is empty"),
    ([], dict(max_new_tokens=4), "no prompts given"),
    ([[1, 300]], dict(max_new_tokens=4), "token id 300 outside the vocabulary [0, 250)"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    ([[1, 2]], dict(max_new_tokens=3, temperature=0.0), "temperature must be > 0"),
    ([[1, 2]], dict(max_new_tokens=3, top_p=0.0), "top_p must be in (0, 1]"),
    ([[1, 2.5]], dict(max_new_tokens=3), "prompt 0 holds a non-integer token id"),
    ([[1, 2]], dict(max_new_tokens=3, row_ids=(0, 1)), "2 row_ids for 1 prompts"),
])
def test_bad_input_is_reported_before_generation(models, prompts, kwargs, message):
    student, _ = models
    kwargs = {"eos_id": 3, **kwargs}
    with pytest.raises(UserError) as err:
        generate(student, prompts, SamplingOptions(**kwargs), vocab_size=VOCAB)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tensor_and_numpy_prompts_are_accepted(models):
    student, _ = models
    greedy = SamplingOptions(max_new_tokens=3, eos_id=3, greedy=True)
    expected = generate(student, [[5, 6, 7], [8, 9, 10]], greedy, vocab_size=VOCAB)
    for prompts in (torch.tensor([[5, 6, 7], [8, 9, 10]]), [np.array([5, 6, 7]), np.array([8, 9, 10])]):
        out = generate(student, prompts, greedy, vocab_size=VOCAB)
        assert torch.equal(out.tokens, expected.tokens)


def test_scrg_bad_options(models):
    student, teacher = models
    for field, value in (("scrg_divergence", "tvd"), ("scrg_teacher_token", "beam"), ("scrg_rounds", -1)):
        with pytest.raises(UserError, match=field):
            ScrgSettings.from_config(MGSRConfig(max_new_tokens=4, **{field: value}))
    with pytest.raises(UserError, match="overflows"):
        scrg(student, teacher, PROMPTS, SamplingOptions(max_new_tokens=39, eos_id=3), settings=ScrgSettings(),
             vocab_size=VOCAB)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bench_runs_and_its_hf_mapping_agrees(models, arch):
    """tools/bench_generation.py at toy sizes: its HF model (same weights) must produce our greedy
    tokens, and its full-recompute baseline our sampled tokens; otherwise its figures mean nothing."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "bench_generation.py"
    spec = importlib.util.spec_from_file_location("bench_generation", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        figures = bench.main(["--arch", arch, "--batch", "3", "--new-tokens", "6", "--hidden", "64", "--layers", "2",
                              "--teacher-hidden", "64", "--teacher-layers", "2", "--vocab", "300", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    assert figures["greedy_token_agreement_with_hf"] == 1.0
    assert figures["same_tokens_as_full_recompute"] is True
    assert figures["speedup_vs_full_recompute"] > 0 and figures["scrg_one_round_cost_vs_sampling"] > 0
