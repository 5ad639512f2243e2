"""The offline teacher cache (training/teacher_cache.py): the losses from a cached top-K distribution
against the full teacher logits, and the one-line errors of a bad `teacher.cache`. The distributed half
(TP=1 vs TP=2 caches, training from a cache at TP=1 and TP=2) is tests/dist/check_teacher_cache.py."""

import dataclasses
import json

import pytest
import torch

from mgsr_megatron.errors import UserError
from mgsr_megatron.losses import ClipNet, LossTargets, ObjectiveSettings, mgsr_objective
from mgsr_megatron.losses.dac_kl import DacSettings
from mgsr_megatron.losses.vocab_parallel import Shard
from mgsr_megatron.models.vocab import mask_padded_logits
from mgsr_megatron.training.teacher_cache import dense_from_topk, from_value_bits, topk_rows, value_bits

VOCAB, PADDED, B, S, K = 250, 256, 2, 14, 48


def _batch(scale: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    teacher = mask_padded_logits(scale * torch.randn(B, S, PADDED, generator=gen), VOCAB)
    student = mask_padded_logits(2.0 * torch.randn(B, S, PADDED, generator=gen), VOCAB)
    labels = torch.randint(0, VOCAB, (B, S), generator=gen)
    mask = torch.zeros(B, S)
    mask[0, 3:12], mask[1, 5:13] = 1.0, 1.0
    pairs = torch.zeros(B, S, dtype=torch.bool)
    pairs[0, 4:8], pairs[1, 6:11] = True, True
    return teacher, student, LossTargets(labels, mask, mask.clone(), pairs)


def _cached_teacher(teacher, mask, temperature, k=K, stored=True):
    """What a cache gives back for these logits: (top-k log p and log rest through the stored float16, densified;
    the stored float32 entropy H(P) [b, s], 0 outside the mask)."""
    log_p, ids, rest, entropy = topk_rows(teacher[mask > 0], k, temperature, Shard(None, 1, 0, PADDED))
    if stored:
        log_p, rest = (from_value_bits(value_bits(x)) for x in (log_p, rest))
    at_tokens = torch.zeros(mask.shape)
    at_tokens[mask > 0] = entropy.float()
    dense = dense_from_topk(log_p, ids, rest, mask, PADDED, 0, VOCAB, temperature)
    return mask_padded_logits(dense, VOCAB), at_tokens


def _metrics(student, teacher, targets, settings, entropy=None):
    clipnet = ClipNet(k_feat=settings.dac.k_feat, hidden=16, seed=3, rho=settings.dac.rho)
    _, metrics = mgsr_objective(student, teacher, targets, clipnet=clipnet, settings=settings,
                                teacher_entropy=entropy)
    return {k: float(metrics[k]) for k in ("sft", "dac_kl", "span", "mean_l", "mean_u")}


@pytest.mark.parametrize("mode,band_norm", [("fixed", "tail_bucket"), ("fixed", "renormalize"),
                                            ("learned", "tail_bucket")])
@pytest.mark.parametrize("scale,temperature", [(3.0, 1.0), (6.0, 2.0)])
def test_losses_from_cache_match_full_teacher(mode, band_norm, scale, temperature, capsys):
    teacher, student, targets = _batch(scale)
    settings = ObjectiveSettings(chunk_tokens=8, dac=DacSettings(mode=mode, k_band=32, k_feat=16, kappa=0.01,
                                                                  band_norm=band_norm, fixed_u=0.9,
                                                                  temperature=temperature))
    full = _metrics(student, teacher, targets, settings)
    dense, entropy = _cached_teacher(teacher, targets.kd_mask, temperature)
    cached = _metrics(student, dense, targets, settings, entropy)
    with capsys.disabled():
        print(f"\n[teacher cache] {mode}/{band_norm} scale {scale} T {temperature}: full {full} cached {cached} "
              f"span rel diff {abs(cached['span'] - full['span']) / full['span']:.3e}")
    assert cached["sft"] == full["sft"]  # SFT never reads the teacher
    # the tolerance is the float16 storage's: log p is stored to 2^-12 relative (|log p| <= ~10 here, so p
    # moves by up to ~0.3% per entry; the errors mostly cancel in the band sum: measured <= 7e-5 relative)
    assert cached["dac_kl"] == pytest.approx(full["dac_kl"], rel=5e-3)
    if mode == "fixed":  # the bounds do not read the teacher
        assert (cached["mean_l"], cached["mean_u"]) == (full["mean_l"], full["mean_u"])
    else:  # ClipNet reads the stored log p (float16) and the true entropy
        assert cached["mean_l"] == pytest.approx(full["mean_l"], abs=1e-5)
        assert cached["mean_u"] == pytest.approx(full["mean_u"], abs=1e-5)


def _learned_step(student, teacher, targets, settings, entropy=None):
    """(loss, student gradient, ClipNet gradients, mean l, mean u) of one learned-mode objective call, with
    a ClipNet whose output layer is far from its near-zero start (so that every feature moves the bounds)."""
    clipnet = ClipNet(k_feat=settings.dac.k_feat, hidden=16, seed=3, rho=settings.dac.rho)
    with torch.no_grad():
        clipnet.fc2_weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(5))
    logits = student.clone().requires_grad_(True)
    loss, metrics = mgsr_objective(logits, teacher, targets, clipnet=clipnet, settings=settings,
                                   teacher_entropy=entropy)
    loss.backward()
    return (float(loss.detach()), logits.grad, [p.grad for p in clipnet.parameters()], float(metrics["mean_l"]),
            float(metrics["mean_u"]))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("scale,temperature", [(3.0, 1.0), (6.0, 2.0)])
def test_learned_mode_from_cache_with_true_entropy_equals_online(scale, temperature, capsys):
    """DAC-KL's learned mode from a cache with K >= max(k_band, k_feat), the stored entropy passed as
    teacher_entropy, against the online teacher (the full logits): without the 16-bit storage the loss,
    the bounds and the gradients (student logits and ClipNet) are the online ones to float rounding; the
    rebuild's own entropy (a uniform tail: larger) instead moves ClipNet's gradient by ~6e-3. With the
    stored float16 values SFT + DAC-KL stays within 1e-4 relative; the gradients carry float16's ~2^-12
    |log p| error of p (measured: student 9e-5, ClipNet 2.4e-3; bfloat16 values gave 6e-4 and 5e-3)."""
    teacher, student, targets = _batch(scale, seed=2)
    settings = ObjectiveSettings(w_span=0.0, chunk_tokens=8, dac=DacSettings(mode="learned", k_band=32, k_feat=16,
                                                                             temperature=temperature))
    online = _learned_step(student, teacher, targets, settings)
    exact, entropy = _cached_teacher(teacher, targets.kd_mask, temperature, stored=False)
    true = _learned_step(student, exact, targets, settings, entropy)
    rebuild = _learned_step(student, exact, targets, settings)
    assert true[0] == pytest.approx(online[0], rel=1e-6)
    assert (true[3], true[4]) == pytest.approx((online[3], online[4]), abs=1e-7)
    assert _rel(true[1], online[1]) < 1e-6
    clip_true = max(_rel(a, b) for a, b in zip(true[2], online[2]))
    clip_rebuild = max(_rel(a, b) for a, b in zip(rebuild[2], online[2]))
    assert clip_true < 2e-5 and clip_rebuild > 1e-3, (clip_true, clip_rebuild)
    stored, entropy = _cached_teacher(teacher, targets.kd_mask, temperature)
    half = _learned_step(student, stored, targets, settings, entropy)
    assert half[0] == pytest.approx(online[0], rel=1e-4)
    assert _rel(half[1], online[1]) < 5e-4
    with capsys.disabled():
        print(f"\n[teacher cache] learned, scale {scale} T {temperature}: ClipNet grad rel diff, true entropy "
              f"{clip_true:.1e}, rebuild's {clip_rebuild:.1e}; float16 cache: loss rel "
              f"{abs(half[0] / online[0] - 1):.1e}, "
              f"student grad rel {_rel(half[1], online[1]):.1e}, ClipNet grad rel "
              f"{max(_rel(a, b) for a, b in zip(half[2], online[2])):.1e}")


def test_cache_exact_without_16_bit_storage_for_fixed_band():
    """Without the 16-bit storage, DAC-KL (fixed band, tail_bucket) from the cached support is the full one to
    float rounding: it reads only the top-k_band log-probs and the tail bucket's mass."""
    teacher, student, targets = _batch(3.0, seed=1)
    settings = ObjectiveSettings(chunk_tokens=8, dac=DacSettings(mode="fixed", k_band=32, k_feat=16, fixed_u=0.9))
    log_p, ids, rest, _ = topk_rows(teacher[targets.kd_mask > 0], K, 1.0, Shard(None, 1, 0, PADDED))
    dense = mask_padded_logits(dense_from_topk(log_p, ids, rest, targets.kd_mask, PADDED, 0, VOCAB, 1.0), VOCAB)
    full, cached = (_metrics(student, t, targets, settings) for t in (teacher, dense))
    assert cached["dac_kl"] == pytest.approx(full["dac_kl"], rel=1e-5)


def test_dense_tensor_at_two_tp_shards_is_the_split_of_one():
    teacher, _, targets = _batch(3.0)
    log_p, ids, rest, _ = topk_rows(teacher[targets.kd_mask > 0], K, 1.0, Shard(None, 1, 0, PADDED))
    whole = dense_from_topk(log_p, ids, rest, targets.kd_mask, PADDED, 0, VOCAB, 1.0)
    parts = [dense_from_topk(log_p, ids, rest, targets.kd_mask, PADDED // 2, r, VOCAB, 1.0) for r in (0, 1)]
    assert torch.equal(torch.cat(parts, -1), whole)
    # softmax of the dense rows is the cached distribution: the top-K probabilities are the teacher's
    probs = torch.softmax(mask_padded_logits(whole, VOCAB)[targets.kd_mask > 0], -1)
    true = torch.softmax(teacher[targets.kd_mask > 0], -1)
    assert torch.allclose(probs.gather(-1, ids), true.gather(-1, ids), atol=1e-6)
    assert torch.allclose(probs[:, VOCAB:], torch.zeros(())) and torch.allclose(probs.sum(-1), torch.ones(()))


# --------------------------------------------------------------------------------------------------
# Config validation of teacher.cache.

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from mgsr_megatron.training.smoke import build_files

    root = tmp_path_factory.mktemp("cache_cfg")
    build_files(root)
    return root


def _fake_cache(root, directory, **changes):
    """A manifest like `mgsr cache-teacher` writes for the tiny setup (validation reads nothing else)."""
    from mgsr_megatron.data.tokenizer import load_tokenizer
    from mgsr_megatron.training.teacher_cache import FORMAT_VERSION, MANIFEST, data_fingerprint

    directory.mkdir(exist_ok=True)
    manifest = {"format_version": FORMAT_VERSION, "k": 32, "temperature": 1.0, "vocab_size": 256,
                "tokenizer_hash": load_tokenizer(str(root / "tok.model")).vocab_hash(),
                "data": data_fingerprint(str(root / "data.train"))}
    manifest.update(changes)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return str(directory)


def _config(root, cache):
    from mgsr_megatron.training.smoke import base_config

    cfg = base_config(root)
    cfg.mgsr.data_schedule = "ground_truth"
    cfg.teacher.cache = cache
    return cfg


def test_valid_cache_config_passes_and_skips_the_teacher(tiny_root, tmp_path):
    from mgsr_megatron.config import validate

    cfg = _config(tiny_root, _fake_cache(tiny_root, tmp_path / "ok"))
    validate(cfg)
    assert cfg.needs_teacher and not cfg.loads_teacher
    cfg.mgsr.data_schedule = "on_policy"  # generating schedules keep the online teacher
    assert cfg.loads_teacher


@pytest.mark.parametrize("changes,message", [
    ("missing", "teacher.cache=.*: no manifest.json"),
    ({"k": 8}, "teacher.cache: the cache holds top-8 but DAC-KL needs max\\(mgsr.k_band, mgsr.k_feat\\) = 32"),
    ({"tokenizer_hash": "0123456789abcdef"}, "teacher.cache: the cache was written with tokenizer hash 0123"),
    ({"temperature": 2.0}, "teacher.cache: the cache was written at temperature 2.0 but mgsr.temperature=1.0"),
    ({"data": {"idx_sha256": "0" * 64, "bin_bytes": 1}}, "teacher.cache: the cache was written for other data"),
    ({"format_version": 99}, "teacher.cache: .* has format_version 99"),
])
def test_bad_cache_is_one_line_error(tiny_root, tmp_path, changes, message):
    from mgsr_megatron.config import validate

    cache = str(tmp_path / "absent") if changes == "missing" else _fake_cache(tiny_root, tmp_path / "c", **changes)
    with pytest.raises(UserError, match=message) as err:
        validate(_config(tiny_root, cache))
    assert "\n" not in str(err.value)


def test_cache_of_another_teacher_is_refused_when_the_teacher_loads(tiny_root, tmp_path):
    """on_policy loads the online teacher beside the cache: a cache written by another checkpoint is refused
    (a copy of the same checkpoint passes); ground truth only never reads teacher.load."""
    from mgsr_megatron.models.checkpoint import MODEL_CONFIG, PROVENANCE
    from mgsr_megatron.training.teacher_cache import check_cache_config, teacher_fingerprint

    def checkpoint(name, manifest):
        directory = tmp_path / name
        directory.mkdir()
        (directory / MODEL_CONFIG).write_text("arch: llama\n")
        (directory / "manifest.json").write_text(manifest)
        (directory / PROVENANCE).write_text(json.dumps({"kind": "trained", "steps": 5}))
        return str(directory)

    writer, copy, other = checkpoint("a", '{"x": 1}'), checkpoint("a_copy", '{"x": 1}'), checkpoint("b", '{"x": 2}')
    cfg = _config(tiny_root, _fake_cache(tiny_root, tmp_path / "c", teacher=teacher_fingerprint(writer)))
    cfg.mgsr = dataclasses.replace(cfg.mgsr, data_schedule="on_policy")
    for load in (writer, copy):
        cfg.teacher.load = load
        check_cache_config(cfg)
    cfg.teacher.load = other
    with pytest.raises(UserError, match="teacher.cache: the cache was written by the teacher at .*/a, not by "
                                        "teacher.load=.*/b") as err:
        check_cache_config(cfg)
    assert "\n" not in str(err.value)
    cfg.mgsr = dataclasses.replace(cfg.mgsr, data_schedule="ground_truth")
    check_cache_config(cfg)  # the teacher is not loaded


def test_dac_mode_off_with_cache_is_refused(tiny_root, tmp_path):
    from mgsr_megatron.config import validate

    cfg = _config(tiny_root, _fake_cache(tiny_root, tmp_path / "c"))
    cfg.mgsr = dataclasses.replace(cfg.mgsr, dac_mode="off")
    with pytest.raises(UserError, match="mgsr.dac_mode=off .* cannot use a top-K cache"):
        validate(cfg)


def test_deepspeed_engine_cache_checks(tiny_root, tmp_path):
    """Under the deepspeed engine the cache's vocabulary is the tokenizer's (its logits are cut to it), and with a
    generating schedule (the teacher loads) the cache must come from an import of teacher.load, a Hugging Face
    directory; ground truth only never reads teacher.load."""
    from mgsr_megatron.training.teacher_cache import check_cache_config

    hf = tmp_path / "teacher_hf"
    recorded = {"path": str(tmp_path / "imported"), "provenance": {"import": {"source": str(hf)}}}
    cfg = _config(tiny_root, _fake_cache(tiny_root, tmp_path / "c", teacher=recorded))
    cfg.deepspeed.enabled, cfg.teacher.vocab_size = True, 320  # an HF teacher wider than the tokenizer
    cfg.mgsr = dataclasses.replace(cfg.mgsr, data_schedule="on_policy")
    cfg.teacher.load = str(hf)
    check_cache_config(cfg)
    cfg.teacher.load = str(tmp_path / "other_hf")
    with pytest.raises(UserError, match="not by an import of teacher.load=.*/other_hf") as err:
        check_cache_config(cfg)
    assert "\n" not in str(err.value)
    cfg.mgsr = dataclasses.replace(cfg.mgsr, data_schedule="ground_truth")
    check_cache_config(cfg)
    cfg.teacher.cache = _fake_cache(tiny_root, tmp_path / "wide", vocab_size=320)
    with pytest.raises(UserError, match="vocab_size 320 but the deepspeed engine's logits have the 256 ids"):
        check_cache_config(cfg)


@pytest.mark.parametrize("version,dtype", [(1, torch.bfloat16), (2, torch.float16)])
def test_stored_values_read_back_in_their_format_dtype(tmp_path, version, dtype):
    """Format 2 stores float16 bits, format 1 (older caches) bfloat16 bits: each reads back as its own dtype's
    rounding of log p, and log p below float16's range is clamped to its lowest finite value, not -inf."""
    import numpy as np

    from mgsr_megatron.training.teacher_cache import MANIFEST, ROW_OFFSETS, VALUE_FLOOR, TeacherCache

    log_p = torch.tensor([[-0.01234, -3.3333, -11.777, -9e4]])
    bits = log_p.clamp(min=VALUE_FLOOR).to(dtype).view(torch.int16).numpy().view(np.uint16)
    stem = tmp_path / "shard_00000"
    np.save(f"{stem}.logp.npy", bits)
    np.save(f"{stem}.ids.npy", np.arange(4, dtype=np.int32)[None])
    np.save(f"{stem}.rest.npy", bits[:, -1])
    np.save(f"{stem}.entropy.npy", np.ones(1, dtype=np.float32))
    np.save(tmp_path / ROW_OFFSETS, np.array([0, 1], dtype=np.int64))
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": version, "k": 4, "temperature": 1.0,
                                                 "vocab_size": 8, "rows": 1, "rows_per_shard": 1}))
    values, ids, rest, _ = TeacherCache(tmp_path).row(0)
    assert torch.equal(values, log_p.clamp(min=VALUE_FLOOR).to(dtype).float()) and torch.isfinite(values).all()
    assert ids.tolist() == [[0, 1, 2, 3]] and float(rest[0]) == float(values[0, -1])
    one_step = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]  # at |log p| in [1, 2) x 2^e
    assert abs(float(values[0, 1]) + 3.3333) <= 2 * one_step
