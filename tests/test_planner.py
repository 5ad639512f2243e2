"""`mgsr plan`: every component against numbers worked out by hand for a small config, the parameter
count against Megatron's own GPTModel, Korthikanti et al.'s formula as a special case, and errors."""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from mgsr_megatron.config import Config, ModelConfig
from mgsr_megatron.errors import UserError
from mgsr_megatron.planner import GIB, largest_micro_batch, layer_activation_bytes, plan, run_plan, stage_params

ROOT = Path(__file__).resolve().parent.parent


def small_config() -> Config:
    """llama, h=64, f=128, 4 heads of 16, 2 KV groups, vocab 250 -> padded 256, 4 layers, bf16;
    TP=2, PP=2 on 8 GPUs -> DP=2; global batch 8, micro-batch 2 -> 2 micro-batches per step."""
    cfg = Config()
    model = dict(arch="llama", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, vocab_size=250, make_vocab_size_divisible_by=64, max_position_embeddings=64,
                 params_dtype="bfloat16")
    cfg.student = ModelConfig(**model)
    cfg.teacher = ModelConfig(**{**model, "num_layers": 8})
    cfg.teacher.load = "x"
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = 2, 2
    cfg.schedule.global_batch_size, cfg.schedule.micro_batch_size, cfg.schedule.seq_length = 8, 2, 32
    cfg.data.max_prompt_length, cfg.mgsr.max_new_tokens = 16, 16
    cfg.mgsr.data_schedule = "on_policy"
    cfg.optimizer.use_distributed_optimizer = True
    return cfg


def test_small_config_by_hand():
    p = plan(small_config(), world_size=8, gpu_memory_gib=1.0)
    assert (p.tp, p.pp, p.dp, p.num_micro) == (2, 2, 2, 2)
    # one layer on one TP rank: QKV 64*(64+2*32)/2 = 4096, out-proj 64*64/2 = 2048,
    # SwiGLU 3*64*128/2 = 12288, two RMSNorms 2*64 = 128  -> 18560
    layer = 18560
    first, last = p.stages
    # stage 0: 2 layers + embedding 256*64/2 = 8192; stage 1: 2 layers + final norm 64 + output 8192
    assert first.student_params == 2 * layer + 8192
    assert last.student_params == 2 * layer + 64 + 8192
    # teacher (8 layers, 4 per stage) in bf16: 2 bytes per parameter
    assert first.teacher_weights == 2 * (4 * layer + 8192)
    # distributed optimizer, bf16: 6 + 12/DP = 12 bytes per parameter; plain: 18
    assert first.student_states == 12 * (2 * layer + 8192)
    assert first.student_states_other == 18 * (2 * layer + 8192)
    # activations of one layer, s=32, b=2, h=64, a=4, g=2, d=16, f=128, e=2, t=2:
    #   replicated  s*b*h*(2e+2e+2) = 2048*64*10      = 40960   (Korthikanti's "10 sbh")
    #   attention   s*b*e*(2*a*d + 2*g*d)/t = 64*2*192/2 = 12288
    #   scores      b*a*s*s*(2e+1)/t = 2*4*1024*5/2   = 20480
    #   SwiGLU      s*b*f*e*4/t = 64*128*8/2           = 32768   -> 106496
    per_layer = 106496
    assert layer_activation_bytes(small_config().student, 2, 2, 32) == per_layer
    # 1F1B: stage 0 keeps min(PP - 0, 2) = 2 micro-batches in flight, stage 1 one; plus the embedding's
    # dropout mask (s*b*h = 4096 bytes) on stage 0
    assert first.activations == 2 * (2 * per_layer + 4096)
    assert last.activations == 1 * (2 * per_layer)
    # full recomputation: layer inputs s*b*h*e = 8192 per layer and micro-batch + one layer recomputed
    assert first.activations_recompute == 2 * (2 * 8192 + 4096) + per_layer
    # logits on the last stage: b*s*V_pad/t*e = 2*32*128*2 = 16384 per micro-batch; teacher logits of
    # the whole step (2 micro-batches) are kept
    assert last.student_logits == 16384 and first.student_logits == 0
    assert last.teacher_logits == 2 * 16384 and first.teacher_logits == 0
    # SCRG KV cache: 2 * 2 layers * b=2 * (16+16) positions * g/t=1 group * d=16 * 2 bytes = 8192
    assert first.kv_cache == last.kv_cache == 8192
    # scoring pass: student + teacher logits over [x; y] on the last stage
    assert last.scoring_logits == 2 * 16384 and first.scoring_logits == 0
    # teacher forward workspace: scores b*(a/t)*s*s*e + SwiGLU s*b*(f/t)*e*2 = 2*2*1024*2 + 64*64*2*2
    assert first.teacher_forward == 8192 + 16384
    # peak = static + max(training, generation)
    static = first.teacher_weights + first.student_states
    assert first.peak() == static + max(first.teacher_forward, first.activations)


def test_korthikanti_formula_is_a_special_case():
    """e=2, MHA, f=4h, no gating: s*b*h*(10 + 24/t + 5*a*s/(h*t)) (Korthikanti et al. 2022, eq. 2)."""
    m = ModelConfig(arch="gpt2", num_layers=2, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8,
                    params_dtype="bfloat16", num_query_groups=8)
    for t in (1, 2, 4):
        s, b, h, a = 128, 3, 256, 8
        assert layer_activation_bytes(m, t, b, s) == s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def test_states_without_distributed_optimizer_and_largest_micro_batch():
    cfg = small_config()
    cfg.optimizer.use_distributed_optimizer = False
    p = plan(cfg, 8, 1.0)
    assert p.stages[0].student_states == 18 * p.stages[0].student_params
    # with 1 GiB nothing is tight; with a budget just above the micro-batch-1 peak only b=1 fits
    assert largest_micro_batch(cfg, 8, 1.0) == 4  # global 8 / DP 2
    need_b1 = plan(cfg, 8, 1.0, micro_batch=1).worst().peak()
    need_b2 = plan(cfg, 8, 1.0, micro_batch=2).worst().peak()
    assert need_b1 < need_b2
    budget = (need_b1 + need_b2) / 2 / 0.9 / GIB
    assert largest_micro_batch(cfg, 8, budget) == 1
    assert largest_micro_batch(cfg, 8, need_b1 * 0.5 / GIB) is None


PARAM_COUNT = """
import json, sys
from mgsr_megatron import parallel
from mgsr_megatron.config import ModelConfig
from mgsr_megatron.models import build_model
parallel.initialize_model_parallel(1, 1, seed=1)
out = {}
for spec in json.loads(sys.argv[1]):
    m = ModelConfig(**spec)
    out[m.arch + str(m.tie_embeddings)] = sum(p.numel() for p in build_model(m).parameters())
print(json.dumps(out))
"""

MODELS = [dict(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
               num_query_groups=2, vocab_size=200, make_vocab_size_divisible_by=64, max_position_embeddings=32),
          dict(arch="llama", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=200,
               make_vocab_size_divisible_by=64, max_position_embeddings=32, tie_embeddings=True,
               add_qkv_bias=True),
          dict(arch="gpt2", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=200,
               make_vocab_size_divisible_by=64, max_position_embeddings=32),
          dict(arch="opt", num_layers=3, hidden_size=48, ffn_hidden_size=80, num_attention_heads=6, vocab_size=200,
               make_vocab_size_divisible_by=64, max_position_embeddings=40, tie_embeddings=False)]


def test_parameter_count_matches_megatron_gptmodel():
    from mgsr_megatron.models.builder import resolve

    result = subprocess.run([sys.executable, "-c", PARAM_COUNT, json.dumps(MODELS)], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    megatron = json.loads(result.stdout.strip().splitlines()[-1])
    for spec in MODELS:
        m = resolve(ModelConfig(**spec))
        assert stage_params(m, 1, 1, 0) == megatron[m.arch + str(spec.get("tie_embeddings"))], spec


@pytest.mark.parametrize("change,message", [
    (dict(tp=3), "TP=3 does not divide num_attention_heads=4"),
    (dict(pp=8), "PP=8 is larger than num_layers=4"),
    (dict(pp=3, world=6), "PP=3 does not divide num_layers=4"),
    (dict(world=6), "world size 6 is not a multiple of TP*PP = 2*2 = 4"),
    (dict(global_batch=6), "global_batch_size=6 is not a multiple of micro_batch_size*DP = 2*2 = 4"),
    (dict(seq=128), "seq_length=128 exceeds student.max_position_embeddings=64"),
])
def test_impossible_layouts_name_the_constraint(change, message):
    cfg = small_config()
    cfg.parallel.tensor_model_parallel_size = change.get("tp", 2)
    cfg.parallel.pipeline_model_parallel_size = change.get("pp", 2)
    cfg.schedule.global_batch_size = change.get("global_batch", 8)
    cfg.schedule.seq_length = change.get("seq", 32)
    world = change.get("world", 8 if "tp" not in change else 12)
    if "pp" in change and "world" not in change:
        world = 16
    with pytest.raises(UserError) as info:
        plan(cfg, world, 80)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_prints_the_plan(tmp_path, capsys):
    import yaml

    cfg = small_config()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": vars(cfg.student), "teacher": vars(cfg.teacher),
                                    "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
                                    "schedule": {"global_batch_size": 8, "micro_batch_size": 2, "seq_length": 32},
                                    "data": {"max_prompt_length": 16}, "mgsr": {"max_new_tokens": 16,
                                                                                "data_schedule": "on_policy"}}))
    run_plan(Namespace(config=str(path), nodes=2, gpus_per_node=4, gpu_memory_gib=1.0), [])
    out = capsys.readouterr().out
    assert "world 8: TP=2 PP=2 DP=2" in out and "FITS" in out and "stage 1" in out
    with pytest.raises(UserError, match="--nodes and --gpus-per-node must be >= 1"):
        run_plan(Namespace(config=str(path), nodes=0, gpus_per_node=4, gpu_memory_gib=1.0), [])


def test_cpu_device_adds_the_measured_process_runtime(tmp_path, capsys):
    """--device cpu: every row of the GPU plan plus one row, the process runtime (CPU_RUNTIME_BYTES);
    tests/test_plan_cpu_rss.py checks the sum against a CPU run's peak RSS."""
    import yaml

    from mgsr_megatron.planner import CPU_RUNTIME_BYTES

    cfg = small_config()
    gpu, cpu = plan(cfg, 8, 1.0), plan(cfg, 8, 1.0, device="cpu")
    for a, b in zip(gpu.stages, cpu.stages):
        assert b.peak() - a.peak() == CPU_RUNTIME_BYTES and a.runtime == 0
    with pytest.raises(UserError, match="--device must be one of gpu, cpu"):
        plan(cfg, 8, 1.0, device="tpu")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": vars(cfg.student), "teacher": vars(cfg.teacher),
                                    "parallel": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
                                    "schedule": {"global_batch_size": 8, "micro_batch_size": 2, "seq_length": 32}}))
    run_plan(Namespace(config=str(path), nodes=1, gpus_per_node=8, gpu_memory_gib=1.0, device="cpu"), [])
    out = capsys.readouterr().out
    assert "8 CPU process(es) of 1 GiB" in out and "per CPU process, GiB" in out
    row = next(line for line in out.splitlines() if "CPU process runtime (measured constant)" in line)
    assert row.split()[-1] == f"{CPU_RUNTIME_BYTES / GIB:.2f}", row
