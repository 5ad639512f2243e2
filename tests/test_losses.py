"""Single-process (TP=1) tests of mgsr_megatron.losses against the dense float64 references in
tests/loss_reference.py. TP=2 and TP=4 (real gloo collectives) live in tests/dist/check_losses.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgsr_megatron.config import MGSRConfig
from mgsr_megatron.errors import UserError
from mgsr_megatron.losses import KINDS, ClipNet, LossTargets, ObjectiveSettings, bounds, divergence, mgsr_objective
from tests import loss_reference as ref

VOCAB, PADDED = 50, 64
RTOL = 1e-5


def make_batch(b=2, s=7, vocab=VOCAB, padded=PADDED, seed=0, scale=2.0):
    """Logits with padded columns at -inf, a prompt (masked) prefix, labels -100 at prompt positions."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, s, padded, generator=g) * scale
    teacher = torch.randn(b, s, padded, generator=g) * scale
    student[..., vocab:] = float("-inf")
    teacher[..., vocab:] = float("-inf")
    labels = torch.randint(0, vocab, (b, s), generator=g)
    prompt = torch.zeros(b, s, dtype=torch.bool)
    prompt[0, :2] = True
    prompt[1, :3] = True
    labels[prompt] = -100
    kd_mask = (~prompt).float()
    sft_mask = kd_mask.clone()
    sft_mask[1] = 0.0  # a generated row: no SFT term
    pairs = torch.zeros(b, s, dtype=torch.bool)
    pairs[0, 2:5] = True  # span [2, 5]
    pairs[1, 4:6] = True  # span [4, 6]
    return student, teacher, labels, sft_mask, kd_mask, pairs


def small_cfg(**overrides):
    base = dict(k_feat=8, k_band=16, loss_chunk_tokens=3, temperature=1.3)
    base.update(overrides)
    return MGSRConfig(**base)


# ------------------------------------------------------------------------------------------------
# Divergences.

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_values_and_gradients(kind, temperature):
    student, teacher, *_ = make_batch()
    token_weight = torch.rand(student.shape[:-1], generator=torch.Generator().manual_seed(1))
    token_weight[0, 0] = 0.0
    x = student.clone().requires_grad_(True)
    value = divergence(x, teacher, kind, temperature=temperature, beta=0.3, alpha=0.2)
    (value * token_weight).sum().backward()
    xr = student.double().requires_grad_(True)
    expected = ref.divergence(xr, teacher, kind, temperature, beta=0.3, alpha=0.2, vocab=VOCAB)
    (expected * token_weight.double()).sum().backward()
    assert value.shape == student.shape[:-1] and value.dtype == torch.float32
    assert ref.rel_err(value, expected) < RTOL
    assert ref.rel_err(x.grad, xr.grad) < RTOL
    assert torch.all(x.grad[..., VOCAB:] == 0) and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[0, 0] == 0)  # a token with zero weight gets no gradient


def test_divergence_kinds_are_the_true_divergences():
    student, teacher, *_ = make_batch()
    same = divergence(teacher, teacher, "forward_kl")
    assert same.abs().max() < 1e-5  # KL(p||p) = 0, not the entropy (a cross-entropy would give H(p))
    for kind in KINDS:
        assert (divergence(student, teacher, kind) >= -1e-6).all(), kind


def test_divergence_bf16_teacher_and_3d_layout():
    student, teacher, *_ = make_batch()
    value = divergence(student, teacher.bfloat16(), "jsd")
    expected = ref.divergence(student, teacher.bfloat16().float(), "jsd", vocab=VOCAB)
    assert ref.rel_err(value, expected) < RTOL


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(rows=st.integers(1, 9), vocab=st.integers(2, 40), pad=st.integers(0, 7),
       temperature=st.floats(0.25, 4.0), kind=st.sampled_from(KINDS), beta=st.floats(0.0, 1.0),
       alpha=st.floats(0.0, 0.9), scale=st.floats(0.1, 6.0), seed=st.integers(0, 2 ** 16))
def test_divergence_property_tp1(rows, vocab, pad, temperature, kind, beta, alpha, scale, seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab + pad, generator=g) * scale
    teacher = torch.randn(rows, vocab + pad, generator=g) * scale
    student[:, vocab:] = teacher[:, vocab:] = float("-inf")
    mask = (torch.rand(rows, generator=g) > 0.3).double()
    x = student.clone().requires_grad_(True)
    value = divergence(x, teacher, kind, temperature=temperature, beta=beta, alpha=alpha)
    (value.double() * mask).sum().backward()
    xr = student.double().requires_grad_(True)
    expected = ref.divergence(xr, teacher, kind, temperature, beta, alpha, vocab)
    (expected * mask).sum().backward()
    assert torch.isfinite(value).all()
    assert (value - expected).abs().max() <= RTOL * max(1.0, expected.abs().max().item())
    assert (x.grad - xr.grad).abs().max() <= RTOL * max(1.0, xr.grad.abs().max().item())
    assert torch.all(x.grad[:, vocab:] == 0)


# ------------------------------------------------------------------------------------------------
# The objective and its terms.

OBJECTIVE_CASES = {
    "learned_tail": {},
    "learned_renormalize": dict(band_norm="renormalize"),
    "fixed_l1": dict(dac_mode="fixed", fixed_l=0.05, fixed_u=0.9, span_distance="l1"),
    "off_l2": dict(dac_mode="off", span_distance="l2"),
    "off_t1": dict(dac_mode="off", temperature=1.0),  # SFT gradient fused into the off-mode pass
    "off_jsd": dict(dac_mode="off", kd_divergence="jsd", kd_beta=0.5),  # GKD: SFT apart from the divergence
    "off_skew_rkl_t1": dict(dac_mode="off", kd_divergence="skew_reverse_kl", kd_alpha=0.2, temperature=1.0),
    "fixed_t1": dict(dac_mode="fixed", temperature=1.0),  # ... and into DAC-KL's band pass
    "kband_is_vocab": dict(k_band=PADDED, k_feat=PADDED, temperature=1.0),
    "one_chunk": dict(loss_chunk_tokens=1024),
    "chunk_of_one": dict(loss_chunk_tokens=1),
    "weighted": dict(w_sft=0.5, w_dac=2.0, w_span=0.25),
}


def run_objective(cfg, batch, clipnet, teacher_dtype=torch.float32, grad_seq_first=False):
    student, teacher, labels, sft_mask, kd_mask, pairs = batch
    x = student.clone().requires_grad_(True)
    clipnet.zero_grad()
    loss, metrics = mgsr_objective(x, teacher.to(teacher_dtype), LossTargets(labels, sft_mask, kd_mask, pairs),
                                   clipnet=clipnet, settings=ObjectiveSettings.from_config(cfg),
                                   grad_seq_first=grad_seq_first)
    strides = []
    x.register_hook(lambda grad: strides.append(grad.stride()))
    loss.backward()
    b, s, vocab = student.shape  # the gradient's memory order: [b, s] rows, or [s, b] with grad_seq_first
    assert strides == [(vocab, b * vocab, 1) if grad_seq_first else (s * vocab, vocab, 1)], strides
    return loss, metrics, x.grad, [p.grad.clone() if p.grad is not None else None for p in clipnet.parameters()]


def run_reference(cfg, batch, clipnet):
    student, teacher, labels, sft_mask, kd_mask, pairs = batch
    xr = student.double().requires_grad_(True)
    net = ref.double_clipnet(clipnet)
    loss, terms, stats = ref.objective(xr, teacher, labels, sft_mask, kd_mask, pairs, net, cfg, VOCAB)
    loss.backward()
    return loss, terms, stats, xr.grad, [p.grad for p in net.parameters()]


@pytest.mark.parametrize("seq_first", [False, True], ids=["bsv", "sbv"])  # the gradient's memory order
@pytest.mark.parametrize("min_slice_rows", [64, 5])  # 5: row 0's response run is a view, row 1's is gathered
@pytest.mark.parametrize("case", sorted(OBJECTIVE_CASES))
def test_objective_matches_dense_reference(case, min_slice_rows, seq_first, monkeypatch):
    monkeypatch.setattr("mgsr_megatron.losses.objective.MIN_SLICE_ROWS", min_slice_rows)
    cfg = small_cfg(**OBJECTIVE_CASES[case])
    batch = make_batch()
    clipnet = ClipNet(cfg.k_feat, 16, seed=3)
    loss, metrics, grad, net_grads = run_objective(cfg, batch, clipnet, grad_seq_first=seq_first)
    r_loss, r_terms, r_stats, r_grad, r_net_grads = run_reference(cfg, batch, clipnet)
    assert ref.rel_err(loss, r_loss) < RTOL
    for name in ("sft", "dac_kl", "span"):
        assert ref.rel_err(metrics[name], r_terms[name]) < RTOL, name
    if r_stats is not None:
        for name, expected in zip(("mean_l", "mean_u", "band_size", "kept_mass"), r_stats):
            assert ref.rel_err(metrics[name], expected) < RTOL, name
    assert ref.rel_err(grad, r_grad) < RTOL
    assert torch.all(grad[..., VOCAB:] == 0)
    if cfg.dac_mode == "learned":
        for mine, theirs in zip(net_grads, r_net_grads):
            assert ref.rel_err(mine, theirs) < RTOL
    assert metrics["rows_without_sft"].tolist() == [False, True]
    assert metrics["nonfinite"] is False


@pytest.mark.parametrize("case", ["learned_t1", "fixed_t1", "off_t1", "learned_t13", "given_entropy_t1", "no_kd"])
def test_teacher_entropy_metric_is_the_dense_entropy_at_t1(case):
    """The teacher_entropy metric, wherever the objective takes it from (DAC-KL's statistics, the given
    entropy, a pass of its own), is the mean over kd_mask positions of the dense H(softmax(teacher));
    0 when no KD term reads the teacher."""
    overrides = {"learned_t1": dict(temperature=1.0), "fixed_t1": dict(temperature=1.0, dac_mode="fixed"),
                 "off_t1": dict(temperature=1.0, dac_mode="off"), "learned_t13": {},
                 "given_entropy_t1": dict(temperature=1.0), "no_kd": dict(w_dac=0.0, w_span=0.0)}[case]
    cfg = small_cfg(**overrides)
    student, teacher, labels, sft_mask, kd_mask, pairs = make_batch(seed=4)
    log_p = torch.log_softmax(teacher[..., :VOCAB].double(), -1)
    dense = -(log_p.exp() * log_p).sum(-1)
    given = dense.float() if case == "given_entropy_t1" else None
    if given is not None:  # a rebuilt teacher (as from a top-K cache) whose own entropy differs
        teacher = teacher.clone()
        teacher[..., 10:VOCAB] = -30.0
    _, metrics = mgsr_objective(student.clone().requires_grad_(True), teacher,
                                LossTargets(labels, sft_mask, kd_mask, pairs), clipnet=ClipNet(cfg.k_feat, 16, seed=3),
                                settings=ObjectiveSettings.from_config(cfg), teacher_entropy=given)
    expected = 0.0 if case == "no_kd" else float(dense[kd_mask > 0].mean())
    assert abs(float(metrics["teacher_entropy"]) - expected) <= 1e-6 * max(expected, 1.0), (case, metrics)


def test_kband_equal_to_vocab_is_the_exact_sorted_band():
    """K_band = V: the top-K machinery must reproduce the full sort (reference sorts all V tokens)."""
    cfg = small_cfg(k_band=PADDED, w_sft=0.0, w_span=0.0)
    batch = make_batch(seed=5)
    clipnet = ClipNet(cfg.k_feat, 16, seed=1)
    loss, metrics, grad, net_grads = run_objective(cfg, batch, clipnet)
    student, teacher, labels, sft_mask, kd_mask, pairs = batch
    xr = student.double().requires_grad_(True)
    net = ref.double_clipnet(clipnet)
    expected, _ = ref.dac(xr, teacher, kd_mask, net, dataclasses.replace(cfg, k_band=10 ** 9), VOCAB)
    expected.backward()
    assert ref.rel_err(loss, expected) < RTOL
    assert ref.rel_err(grad, xr.grad) < RTOL


def test_bf16_teacher():
    """Teacher logits arrive in bf16. Their values are made distinct (ties in the teacher's ranking are
    broken arbitrarily, by the reference's sort as well as by the top-K, so they are kept out here)."""
    cfg = small_cfg()
    batch = list(make_batch())
    g = torch.Generator().manual_seed(7)
    distinct = torch.stack([torch.randperm(VOCAB, generator=g) for _ in range(14)]).float().sub(25) / 8
    batch[1][..., :VOCAB] = distinct.reshape(2, 7, VOCAB)  # multiples of 1/8: exact in bf16
    clipnet = ClipNet(cfg.k_feat, 16, seed=3)
    loss, _, grad, _ = run_objective(cfg, tuple(batch), clipnet, teacher_dtype=torch.bfloat16)
    r_loss, _, _, r_grad, _ = run_reference(cfg, tuple(batch), clipnet)
    assert ref.rel_err(loss, r_loss) < RTOL
    assert ref.rel_err(grad, r_grad) < RTOL


def test_empty_sft_mask_gives_zero_sft_term():
    batch = list(make_batch())
    batch[3] = torch.zeros_like(batch[3])
    cfg = small_cfg()
    loss, metrics, grad, _ = run_objective(cfg, tuple(batch), ClipNet(cfg.k_feat, 16, seed=0))
    assert metrics["sft"] == 0 and metrics["rows_without_sft"].all()
    r_loss, *_ = run_reference(dataclasses.replace(cfg, w_sft=0.0), tuple(batch), ClipNet(cfg.k_feat, 16, seed=0))
    assert ref.rel_err(loss, r_loss) < RTOL


@pytest.mark.parametrize("where", ["student_nan", "teacher_posinf", "student_row_all_neginf"])
def test_nonfinite_logits_are_flagged_not_raised(where):
    batch = list(make_batch())
    if where == "student_nan":
        batch[0][0, 1, 3] = float("nan")  # a prompt position: still reported
    elif where == "teacher_posinf":
        batch[1][1, 5, 7] = float("inf")
    else:
        batch[0][1, 6, :] = float("-inf")
    cfg = small_cfg()
    _, metrics, _, _ = run_objective(cfg, tuple(batch), ClipNet(cfg.k_feat, 16, seed=0))
    assert metrics["nonfinite"] is True


# ------------------------------------------------------------------------------------------------
# ClipNet.

def test_clipnet_initial_bounds_and_width_floor():
    net = ClipNet(64, 128, seed=0)
    lower, upper = bounds(*net(torch.randn(32, 66) * 3), rho=0.8)
    assert lower.max() < 0.01 and (upper - 0.95).abs().max() < 0.02
    a = torch.tensor([-50.0, 0.0, 50.0, 50.0, -50.0])
    b = torch.tensor([-50.0, 0.0, 50.0, -50.0, 50.0])
    lower, upper = bounds(a, b, rho=0.8)
    assert torch.all(upper - lower >= 0.8 - 1e-6) and torch.all(lower >= 0) and torch.all(upper <= 1)


def test_clipnet_same_seed_same_parameters_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    one = ClipNet(16, 32, seed=9)
    after = torch.rand(3)
    two = ClipNet(16, 32, seed=9)
    assert torch.equal(before, after)
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(one.parameters(), ClipNet(16, 32, seed=10).parameters()))


def test_learned_bounds_move_under_training_and_keep_the_floor():
    cfg = small_cfg(w_sft=0.0, w_span=0.0)
    batch = make_batch(b=4, s=8, seed=2)
    net = ClipNet(cfg.k_feat, 16, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    first = None
    settings = ObjectiveSettings.from_config(cfg)
    for _ in range(15):
        opt.zero_grad()
        loss, metrics = mgsr_objective(batch[0], batch[1], LossTargets(*batch[2:]), clipnet=net, settings=settings)
        loss.backward()
        opt.step()
        first = first if first is not None else (metrics["mean_l"].item(), metrics["mean_u"].item())
    assert metrics["mean_u"] - metrics["mean_l"] >= cfg.rho - 1e-6
    assert (metrics["mean_l"].item(), metrics["mean_u"].item()) != first


# ------------------------------------------------------------------------------------------------
# Bad input: each raises a one-line UserError naming the argument.

def call(batch=None, cfg=None, clipnet="default", **changes):
    student, teacher, labels, sft_mask, kd_mask, pairs = batch or make_batch()
    args = dict(student_logits=student, teacher_logits=teacher, labels=labels, sft_mask=sft_mask, kd_mask=kd_mask,
                span_pair_mask=pairs)
    args.update(changes)
    cfg = cfg or small_cfg()
    net = ClipNet(cfg.k_feat, 16, seed=0) if clipnet == "default" else clipnet
    return mgsr_objective(args.pop("student_logits"), args.pop("teacher_logits"), LossTargets(**args), clipnet=net,
                          settings=ObjectiveSettings.from_config(cfg))


def _pairs(mutate):
    pairs = make_batch()[5].clone()
    mutate(pairs)
    return pairs


BAD_INPUTS = {
    "teacher_shape": (lambda: call(teacher_logits=torch.zeros(2, 7, 32)), "teacher_logits"),
    "labels_shape": (lambda: call(labels=torch.zeros(2, 6, dtype=torch.long)), "labels"),
    "kd_mask_shape": (lambda: call(kd_mask=torch.ones(7, 2)), "kd_mask"),
    "kd_mask_empty": (lambda: call(kd_mask=torch.zeros(2, 7)), "kd_mask has no valid token"),
    "span_leaves_response": (lambda: call(span_pair_mask=_pairs(lambda p: p[0].__setitem__(1, True))),
                             "leaves the response"),
    "span_past_sequence": (lambda: call(span_pair_mask=_pairs(lambda p: p[1].__setitem__(6, True))),
                           "runs past the end"),
    "k_band_too_large": (lambda: call(cfg=small_cfg(k_band=PADDED + 1)), "mgsr.k_band=65"),
    "k_feat_too_large": (lambda: call(cfg=small_cfg(k_feat=PADDED + 1)), "mgsr.k_feat=65"),
    "label_outside_vocab": (lambda: call(labels=torch.full((2, 7), PADDED)), "labels at position"),
    "float_labels": (lambda: call(labels=torch.zeros(2, 7)), "labels must be integer"),
    "missing_clipnet": (lambda: call(clipnet=None), "clipnet is None"),
    "clipnet_k_feat": (lambda: call(clipnet=ClipNet(4, 8, seed=0)), "clipnet was built for k_feat=4"),
    "bad_mode": (lambda: call(cfg=small_cfg(dac_mode="soft")), "mgsr.dac_mode"),
    "bad_band_norm": (lambda: call(cfg=small_cfg(band_norm="x")), "mgsr.band_norm"),
    "bad_span_distance": (lambda: call(cfg=small_cfg(span_distance="cos")), "mgsr.span_distance"),
    "bad_rho": (lambda: call(cfg=small_cfg(rho=1.0)), "mgsr.rho"),
    "bad_temperature": (lambda: call(cfg=small_cfg(temperature=0.0)), "mgsr.temperature"),
    "bad_fixed_bounds": (lambda: call(cfg=small_cfg(dac_mode="fixed", fixed_l=0.9, fixed_u=0.5)), "mgsr.fixed_l"),
    "divergence_shapes": (lambda: divergence(torch.zeros(3, 8), torch.zeros(3, 9), "jsd"), "teacher_logits"),
    "divergence_kind": (lambda: divergence(torch.zeros(3, 8), torch.zeros(3, 8), "kl"), "kind='kl'"),
    "divergence_temperature": (lambda: divergence(torch.zeros(3, 8), torch.zeros(3, 8), "tvd", temperature=-1),
                               "temperature=-1"),
    "divergence_beta": (lambda: divergence(torch.zeros(3, 8), torch.zeros(3, 8), "jsd", beta=1.5), "beta=1.5"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    fn, message = BAD_INPUTS[case]
    with pytest.raises(UserError) as info:
        fn()
    assert message in str(info.value)
    assert "\n" not in str(info.value)
