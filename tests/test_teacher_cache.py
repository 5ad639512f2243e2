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
from mgsr_megatron.training.teacher_cache import _bf16_bits, _from_bf16_bits, dense_from_topk, topk_rows

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


def _cached_teacher(teacher, mask, temperature, k=K):
    """What a cache gives back for these logits: top-k log p and log rest through bf16, densified."""
    log_p, ids, rest, _ = topk_rows(teacher[mask > 0], k, temperature, Shard(None, 1, 0, PADDED))
    log_p, rest = (_from_bf16_bits(_bf16_bits(x)) for x in (log_p, rest))
    return mask_padded_logits(dense_from_topk(log_p, ids, rest, mask, PADDED, 0, VOCAB, temperature), VOCAB)


def _metrics(student, teacher, targets, settings):
    clipnet = ClipNet(k_feat=settings.dac.k_feat, hidden=16, seed=3, rho=settings.dac.rho)
    _, metrics = mgsr_objective(student, teacher, targets, clipnet=clipnet, settings=settings)
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
    cached = _metrics(student, _cached_teacher(teacher, targets.kd_mask, temperature), targets, settings)
    with capsys.disabled():
        print(f"\n[teacher cache] {mode}/{band_norm} scale {scale} T {temperature}: full {full} cached {cached} "
              f"span rel diff {abs(cached['span'] - full['span']) / full['span']:.3e}")
    assert cached["sft"] == full["sft"]  # SFT never reads the teacher
    # the tolerance is bf16's: log p is stored to 2^-9 relative (|log p| <= ~10 here, so p moves by up to
    # ~2% per entry; the errors mostly cancel in the band sum: measured <= 1e-3 relative)
    assert cached["dac_kl"] == pytest.approx(full["dac_kl"], rel=5e-3)
    if mode == "fixed":  # the bounds do not read the teacher
        assert (cached["mean_l"], cached["mean_u"]) == (full["mean_l"], full["mean_u"])


def test_cache_exact_without_bf16_for_fixed_band():
    """Without the bf16 storage, DAC-KL (fixed band, tail_bucket) from the cached support is the full one to
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


def test_dac_mode_off_with_cache_is_refused(tiny_root, tmp_path):
    from mgsr_megatron.config import validate

    cfg = _config(tiny_root, _fake_cache(tiny_root, tmp_path / "c"))
    cfg.mgsr = dataclasses.replace(cfg.mgsr, dac_mode="off")
    with pytest.raises(UserError, match="mgsr.dac_mode=off .* cannot use a top-K cache"):
        validate(cfg)
