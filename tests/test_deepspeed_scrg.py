"""Generation and SCRG on Hugging Face models (generation/hf_stage.py) and the generating schedules under the
DeepSpeed engine (issue 17 item 2).

In this process: the HF stage's greedy generation equals transformers' own `generate(do_sample=False)`; the
same tiny random weights as an HF model and, converted (conversion/convert.py, HF -> Megatron), as a
Megatron model give the same SCRG picks (corrected rows, j, t_j, regenerated sequences); every schedule passes
the engine's settings, and an off_policy resume from a checkpoint without the schedule files is one line. One
torchrun launch of 2 ranks (tests/dist/deepspeed_scrg_checks.py): ZeRO-3 lockstep generation and SCRG with ranks
of different lengths, on_policy (lambda 1) and seqkd training (with ROUGE-L evaluation in metrics.jsonl), the
engine's evaluation answers (ZeRO-3, a prompt count that leaves one rank a block short) equal to single-process
HF and to the converted Megatron model's, off_policy (generate and replay steps) resumed exactly under ZeRO-2
and equal to the Megatron engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mgsr_megatron.generation import SamplingOptions, ScrgSettings, generate, scrg
from mgsr_megatron.generation.hf_stage import HfCausalLM

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 250
EOS = 2
PROMPTS = [[5, 6, 7, 8, 9], [17, 4], [30, 31, 32, 33, 34, 35, 36], [60]]
DIST_CHECKS = ("lockstep_generation_zero3", "on_policy_zero3_training", "seqkd_zero3_training", "evaluation_zero3",
               "off_policy_resume_zero2", "off_policy_megatron_parity")


def tiny_llama(seed: int, hidden: int, scale: float):
    """A random HF llama (GQA, RoPE), fp32, with its output projection scaled up: random tiny models are
    nearly uniform, and the picks must depend on the logits for the comparison to mean anything."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
                            tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def hf_models():
    return tiny_llama(31, 64, 6.0), tiny_llama(41, 96, 25.0)


@pytest.fixture(scope="module")
def megatron_models(hf_models, tmp_path_factory):
    """The same weights converted with conversion/convert.py (HF dir -> Megatron checkpoint -> GPTModel)."""
    from mgsr_megatron import parallel
    from mgsr_megatron.conversion.convert import import_hf
    from mgsr_megatron.models import build_model
    from mgsr_megatron.models.checkpoint import load_model

    tmp = tmp_path_factory.mktemp("hf_to_megatron")
    loaded = []
    for name, model in zip(("student", "teacher"), hf_models):
        model.save_pretrained(tmp / f"{name}_hf")
        cfg = import_hf(tmp / f"{name}_hf", tmp / f"{name}_meg", make_vocab_size_divisible_by=64, progress=False)
        parallel.initialize_model_parallel(1, 1)
        megatron = build_model(cfg)
        load_model(megatron, tmp / f"{name}_meg")
        loaded.append(megatron.eval())
    return loaded


def test_hf_greedy_generation_equals_transformers_generate(hf_models):
    """Rows of different prompt lengths in one batch (a prefill, then per-row forced prompt tokens)."""
    student = hf_models[0]
    options = SamplingOptions(max_new_tokens=10, eos_id=EOS, greedy=True)
    out = generate(HfCausalLM(student, VOCAB), PROMPTS, options, vocab_size=VOCAB)
    for prompt, response in zip(PROMPTS, out.responses()):
        with torch.no_grad():
            reference = student.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=EOS,
                                         pad_token_id=0)
        assert response == reference[0, len(prompt):].tolist(), prompt


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_hf_stage_on_learned_position_architectures(kind):
    """GPT-2 and OPT (learned positions, OPT's offset of 2): greedy = transformers' generate, and SCRG's
    regeneration from the reused cache = a cold one."""
    from tests.dist.check_conversion import VOCAB as KIND_VOCAB
    from tests.dist.check_conversion import tiny_hf_model

    model = tiny_hf_model(kind)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)
    student, teacher = HfCausalLM(model, KIND_VOCAB), HfCausalLM(tiny_hf_model("llama_gqa", seed=1), KIND_VOCAB)
    prompts = PROMPTS[:3]
    out = generate(student, prompts, SamplingOptions(max_new_tokens=8, eos_id=EOS, greedy=True), vocab_size=KIND_VOCAB)
    for prompt, response in zip(prompts, out.responses()):
        with torch.no_grad():
            reference = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=EOS,
                                       pad_token_id=0)
        assert response == reference[0, len(prompt):].tolist(), prompt
    options, settings = SamplingOptions(max_new_tokens=8, eos_id=EOS, seed=4), ScrgSettings(rounds=2)
    warm = scrg(student, teacher, prompts, options, settings=settings, vocab_size=KIND_VOCAB)
    cold = scrg(student, teacher, prompts, options, settings=settings, vocab_size=KIND_VOCAB, reuse_cache=False)
    assert _picks(*warm) == _picks(*cold) and any(warm[1]["corrected"].tolist())


def _picks(out, stats) -> dict:
    return {"corrected": stats["corrected"].tolist(), "j": stats["j"].tolist(),
            "teacher_token": stats["teacher_token"].tolist(), "responses": out.responses(),
            "per_round": [decision[:, :2].tolist() for decision in stats["per_round"]]}


@pytest.mark.parametrize("greedy", [True, False])
def test_scrg_picks_equal_on_hf_and_converted_megatron(hf_models, megatron_models, greedy):
    """The acceptance check: same corrected rows, positions j, teacher tokens t_j and regenerated sequences
    (two rounds; greedy, and sampled with the same seed: the noise depends only on seed, position, row, id)."""
    options = SamplingOptions(max_new_tokens=12, eos_id=EOS, greedy=greedy, seed=7)
    settings = ScrgSettings(rounds=2, divergence="forward_kl")
    hf_student, hf_teacher = (HfCausalLM(model, VOCAB) for model in hf_models)
    hf_out, hf_stats = scrg(hf_student, hf_teacher, PROMPTS, options, settings=settings, vocab_size=VOCAB)
    mg_out, mg_stats = scrg(*megatron_models, PROMPTS, options, settings=settings, vocab_size=VOCAB)
    assert _picks(hf_out, hf_stats) == _picks(mg_out, mg_stats)
    assert any(hf_stats["corrected"].tolist()), "nothing was corrected: the check would be empty"
    torch.testing.assert_close(hf_stats["d_j"], mg_stats["d_j"], rtol=1e-4, atol=1e-6, equal_nan=True)


def test_hf_regeneration_with_reused_cache_equals_cold(hf_models):
    """Rows join the regeneration at their own j from the first generation's cache (reordered rows, passes
    from any offset) = a fresh cache from position 0."""
    options = SamplingOptions(max_new_tokens=12, eos_id=EOS, seed=3)
    settings = ScrgSettings(rounds=2)
    hf_student, hf_teacher = (HfCausalLM(model, VOCAB) for model in hf_models)
    warm, warm_stats = scrg(hf_student, hf_teacher, PROMPTS, options, settings=settings, vocab_size=VOCAB)
    cold, cold_stats = scrg(hf_student, hf_teacher, PROMPTS, options, settings=settings, vocab_size=VOCAB,
                            reuse_cache=False)
    assert _picks(warm, warm_stats) == _picks(cold, cold_stats)
    assert len(set(warm_stats["j"].tolist())) > 1, "rows should join at different positions"


def test_hf_recorded_logits_equal_a_whole_sequence_forward(hf_models):
    """SCRG's detection uses the decode passes' logits as the student's: they must be the model's own."""
    student = HfCausalLM(hf_models[0], VOCAB)
    out = generate(student, PROMPTS, dataclasses.replace(SamplingOptions(max_new_tokens=8, eos_id=EOS), seed=5),
                   vocab_size=VOCAB, record_logits=True)
    full = student.score(out.tokens)
    for row, (p, n) in enumerate(zip(out.prompt_lengths.tolist(), out.response_lengths.tolist())):
        torch.testing.assert_close(out.logits[row, p - 1:p + n - 1], full[row, p - 1:p + n - 1], rtol=1e-4,
                                   atol=1e-4)


def test_generating_schedules_under_deepspeed_settings():
    """Every schedule passes the engine's settings (off_policy's state is in its checkpoints)."""
    from mgsr_megatron.config import Config
    from mgsr_megatron.deepspeed_engine.settings import validate_settings
    from mgsr_megatron.errors import UserError

    for schedule in ("on_policy", "seqkd", "off_policy"):
        cfg = Config()
        cfg.deepspeed.enabled = True
        cfg.mgsr.data_schedule = schedule
        with pytest.raises(UserError) as info:  # student.load is not set: the next check
            validate_settings(cfg)
        message = str(info.value)
        assert "\n" not in message and "student.load" in message, (schedule, message)


def test_off_policy_resume_needs_every_ranks_schedule_file(tmp_path):
    """An off_policy resume names the first missing schedule_dp{d}.pt; other schedules do not need them."""
    from mgsr_megatron.config import Config
    from mgsr_megatron.deepspeed_engine.checkpoint import check_schedule_files
    from mgsr_megatron.errors import UserError

    (tmp_path / "schedule_dp0.pt").write_bytes(b"")
    cfg = Config()
    for schedule in ("on_policy", "seqkd", "ground_truth"):
        cfg.mgsr.data_schedule = schedule
        check_schedule_files(cfg, tmp_path, 2)
    cfg.mgsr.data_schedule = "off_policy"
    check_schedule_files(cfg, tmp_path, 1)
    with pytest.raises(UserError) as info:
        check_schedule_files(cfg, tmp_path, 2)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "schedule_dp1.pt")) and "\n" not in message, message


# ------------------------------------------------------------------------------------------ 2 ranks
@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    from tests.test_deepspeed_engine import run_checks_launch

    script = ROOT / "tests" / "dist" / "deepspeed_scrg_checks.py"
    return run_checks_launch(script, tmp_path_factory.mktemp("deepspeed_scrg"))


@pytest.mark.parametrize("name", DIST_CHECKS)
def test_distributed_check(launch, name):
    record = launch["results"]["checks"].get(name)
    assert record is not None, f"check {name} did not run; launch log:\n{launch['log'][-6000:]}"
    assert record["ok"], record["error"]
