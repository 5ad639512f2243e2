"""`mgsr plan`: every component against numbers worked out by hand for a small config, the parameter
count against Megatron's own GPTModel, Korthikanti et al.'s formula as a special case, and errors."""

import dataclasses
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
    cfg = small_config()
    cfg.mgsr.generation_micro_batches = 1  # one micro-batch per generation call (the default: the step's all)
    p = plan(cfg, world_size=8, gpu_memory_gib=1.0)
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
    # SCRG KV caches: the student's 2 * 2 layers * b=2 * (16+16) positions * g/t=1 group * d=16 * 2 bytes
    # = 8192, the teacher's (4 layers per stage) 16384
    assert first.kv_cache == last.kv_cache == 8192 + 16384
    # scoring pass: student + teacher logits over [x; y] on the last stage, and (reuse) the teacher logits
    # of the step's first micro-batch while the second generates
    assert last.scoring_logits == 2 * 16384 and first.scoring_logits == 0
    assert last.scrg_kept_logits == 16384 and first.scrg_kept_logits == 0
    # the default, both micro-batches in one generation call: twice the rows' KV caches and scoring logits,
    # nothing kept from another call
    _, whole = plan(small_config(), world_size=8, gpu_memory_gib=1.0).stages
    assert whole.kv_cache == 2 * (8192 + 16384) and whole.scoring_logits == 4 * 16384
    assert whole.scrg_kept_logits == 0
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


# --------------------------------------------------------------------------------------------------
# Teacher cache (issue 18) and the DeepSpeed engine (issue 17)

def test_cached_teacher_is_not_loaded_on_ground_truth_but_its_dense_logits_are_kept():
    """teacher.cache + ground truth: Config.loads_teacher is false, so no teacher weights or forward; the
    trainer still builds dense fp32 logits from the cache for every micro-batch on the last stage."""
    cfg = small_config()
    cfg.mgsr.data_schedule = "ground_truth"
    online = plan(cfg, 8, 1.0)
    cfg.teacher.cache = "runs/teacher_cache"
    assert not cfg.loads_teacher
    cached = plan(cfg, 8, 1.0)
    assert not cached.uses_teacher and cached.teacher_cached and cached.generator is None
    first, last = cached.stages
    assert first.teacher_weights == last.teacher_weights == 0 and first.teacher_forward == 0
    # fp32 dense logits of the step's 2 micro-batches: 2 * b*s*V_pad/t * 4 = 2 * 2*32*128*4; one micro-batch's
    # expansion workspace instead of the teacher forward
    assert last.teacher_logits == 2 * 2 * 32 * 128 * 4 == 2 * online.stages[1].teacher_logits
    assert last.teacher_forward == 2 * 32 * 128 * 4
    assert cached.worst().peak() < online.worst().peak()
    # a generating schedule needs the online teacher: weights and forward counted, logits at 4 bytes
    cfg.mgsr.data_schedule = "on_policy"
    assert cfg.loads_teacher
    mixed = plan(cfg, 8, 1.0)
    reference = plan(small_config(), 8, 1.0)
    assert mixed.uses_teacher and mixed.teacher_cached
    for a, b in zip(mixed.stages, reference.stages):
        assert a.teacher_weights == b.teacher_weights > 0
    assert mixed.stages[1].teacher_logits == 2 * reference.stages[1].teacher_logits


def test_cached_teacher_is_named_in_the_output():
    from mgsr_megatron.planner import format_plan

    cfg = small_config()
    cfg.mgsr.data_schedule = "ground_truth"
    cfg.teacher.cache = "runs/teacher_cache"
    out = format_plan(cfg, plan(cfg, 8, 1.0), 1, 8)
    assert "teacher not loaded: its distribution comes from teacher.cache runs/teacher_cache" in out
    cfg.mgsr.data_schedule = "on_policy"
    out = format_plan(cfg, plan(cfg, 8, 1.0), 1, 8)
    assert "for generated batches; ground-truth batches from teacher.cache runs/teacher_cache" in out


def deepspeed_estimators():
    from mgsr_megatron.deepspeed_engine.runtime import import_deepspeed

    import_deepspeed()  # the shared-memory op switched off before DeepSpeed looks at it
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

    return zero2, zero3


def test_zero_states_against_deepspeeds_estimators():
    """bf16, LLaMA-2-7B's P and largest module (the embedding, 32000 x 4096). DeepSpeed's estimators with
    additional_buffer_factor=1 (their own margin), CPU figures per node; where the planner differs, the
    difference is the documented one (planner module docstring)."""
    from mgsr_megatron.planner import ZeroChoice, zero_state_bytes

    zero2, zero3 = deepspeed_estimators()
    P, L, e = 6_738_415_616, 32000 * 4096, 2

    def ours(stage, offload, params=False, gpus=8, nodes=1):
        states = zero_state_bytes(P, L, "bfloat16", gpus * nodes, ZeroChoice(stage, offload, params))
        return states.gpu, states.cpu * gpus  # GPU, CPU per node

    def close(a, b):  # the estimators truncate to int
        return abs(a - b) <= 2

    # ZeRO-2: GPU 2P + 18P/N exactly; with offload GPU 2P; CPU per node 16P (<= 4 GPUs: max(4*GPUs, 16)
    # is their model-loading term above that) + the e-byte partition buffer
    cpu, gpu = zero2(P, 8, 1, cpu_offload=False, additional_buffer_factor=1)
    assert close(ours(2, False)[0], gpu)
    cpu, gpu = zero2(P, 4, 1, cpu_offload=True, additional_buffer_factor=1)
    assert close(ours(2, True, gpus=4)[0], gpu)
    assert close(ours(2, True, gpus=4)[1], cpu + e * P)
    # ZeRO-1: DeepSpeed applies the ZeRO-2 estimate; ZeRO-1 keeps the full e-byte gradients
    cpu, gpu = zero2(P, 8, 1, cpu_offload=False, additional_buffer_factor=1)
    assert close(ours(1, False)[0], gpu + e * P * (1 - 1 / 8))
    # ZeRO-3 over 2 nodes x 4 GPUs (CPU is per node: 1/nodes), models built inside zero.Init
    for offload, params, gpu_extra in ((False, False, 2 * P / 8), (True, False, 0), (True, True, 0)):
        cpu, gpu, largest = zero3(P, L, 4, 2, cpu_offload=offload, cpu_offload_params=params, zero_init=True,
                                  additional_buffer_factor=1)
        gpu_ours, cpu_ours = ours(3, offload, params, gpus=4, nodes=2)
        assert close(gpu_ours, gpu + gpu_extra), (offload, params)
        if offload:
            assert close(cpu_ours, cpu + e * P / 2), (offload, params)
        else:  # their figure is the zero.Init load-time buffer (4 * L * GPUs per node), not a model state
            assert cpu_ours == 0 and close(cpu, 4 * L * 4)
    # the ZeRO paper's K=12 partitioning plus the step's fp32 gradient partition (4/N), bf16:
    for stage, per_param in ((1, 2 + 2 + 16 / 8), (2, 2 + 18 / 8), (3, 20 / 8)):
        assert zero_state_bytes(P, 0, "bfloat16", 8, ZeroChoice(stage, False)).gpu == pytest.approx(P * per_param)
    # fp32: 4-byte params and gradients; ZeRO-3 without offload shares the master with the parameter partition
    for stage, per_param in ((1, 4 + 4 + 16 / 8), (2, 4 + 20 / 8), (3, 20 / 8)):
        assert zero_state_bytes(P, 0, "float32", 8, ZeroChoice(stage, False)).gpu == pytest.approx(P * per_param)


HF_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 250, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def deepspeed_config(tmp_path, teacher_dir: bool = True) -> Config:
    """small_config's models as HF directories (config.json only, no weights: the planner reads no weights)
    under the DeepSpeed engine: TP=PP=1, DP=8, ground truth, ZeRO-2 (the default)."""
    cfg = small_config()
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.optimizer.use_distributed_optimizer = False
    cfg.mgsr.data_schedule = "ground_truth"
    cfg.deepspeed.enabled = True
    cfg.schedule.global_batch_size = 16
    for name, layers in (("student", 4), ("teacher", 8)):
        folder = tmp_path / name
        if name == "student" or teacher_dir:
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({**HF_LLAMA, "num_hidden_layers": layers}))
        getattr(cfg, name).load = str(folder)
    return cfg


def test_deepspeed_plan_reads_config_json_and_counts_like_the_hf_model(tmp_path):
    """The HF model's parameter count and largest module (DeepSpeed's own model_to_params on the
    transformers model built from the same config.json) equal the planner's; the rows by hand."""
    import transformers

    from mgsr_megatron import planner

    deepspeed_estimators()
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = deepspeed_config(tmp_path)
    cfg.student.num_layers = 99  # config.json wins over the config's fields when the directory has one
    p = plan(cfg, 8, 1.0)
    assert (p.tp, p.pp, p.dp, p.num_micro, p.zero.choice) == (1, 1, 8, 1, planner.ZeroChoice(2, False))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_LLAMA))
    total, largest = model_to_params(hf)
    student = p.stages[0]
    assert student.student_params == p.zero.student_params == total  # vocab 250: no padding in HF models
    shape = planner.hf_model_shape(cfg.student, "student")
    assert planner.largest_module_params(shape) == largest == 250 * 64 and shape.num_layers == 4
    choice = planner.ZeroChoice(2, False)
    assert student.student_states == planner.zero_state_bytes(total, largest, "bfloat16", 8, choice).gpu \
        == total * (2 + 18 / 8)
    teacher_params = p.zero.teacher_params
    assert student.teacher_weights == 2 * teacher_params  # replicated bf16
    assert planner.zero_teacher_bytes(teacher_params, largest, "bfloat16", 8, True, False).gpu == \
        2 * teacher_params / 8 + 2 * largest
    # TP=1, PP=1 rows: activations of 4 layers + the embedding mask, one micro-batch's logits (V = 250)
    assert student.activations == 4 * layer_activation_bytes(shape, 1, 2, 32) + 32 * 2 * 64
    assert student.student_logits == student.teacher_logits == 2 * 32 * 250 * 2
    assert student.kv_cache == student.scoring_logits == 0


def test_deepspeed_plan_prints_the_zero_rows(tmp_path, capsys):
    import yaml

    cfg = deepspeed_config(tmp_path)
    cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer, cfg.deepspeed.teacher_zero3 = 3, True, True
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"student": vars(cfg.student), "teacher": vars(cfg.teacher),
                                    "deepspeed": vars(cfg.deepspeed), "mgsr": {"data_schedule": "ground_truth"},
                                    "schedule": {"global_batch_size": 16, "micro_batch_size": 2, "seq_length": 32}}))
    run_plan(Namespace(config=str(path), nodes=2, gpus_per_node=4, gpu_memory_gib=1.0), [])
    out = capsys.readouterr().out
    assert "world 8: DeepSpeed engine, DP=8 (TP=PP=1), ZeRO-3 + optimizer offload" in out
    assert "teacher weights (ZeRO-3 partitioned)" in out and "CPU memory per node (4 ranks, offload)" in out
    rows = [line for line in out.splitlines() if line.lstrip(" *").startswith("ZeRO-")]
    assert [row.lstrip(" *").split("  ")[0] for row in rows] == [
        "ZeRO-1", "ZeRO-1 + optimizer offload", "ZeRO-2", "ZeRO-2 + optimizer offload", "ZeRO-3",
        "ZeRO-3 + optimizer offload", "ZeRO-3 + optimizer and param offload"]
    assert [row for row in rows if row.startswith(" *")] == [rows[5]] and all(row.endswith("fits") for row in rows)
    assert "FITS" in out and "largest micro-batch that fits" in out and "recomputation" not in out.split("HF")[1]


@pytest.mark.parametrize("change,message", [
    (dict(offload_params=True), "deepspeed.offload_params=true needs deepspeed.zero_stage=3 (got 2)"),
    (dict(tp=2), "the deepspeed engine is data-parallel only: parallel.tensor_model_parallel_size=2"),
    (dict(no_teacher_dir=True, teacher_defaults=True), "teacher.load="),
    (dict(global_batch=12), "global_batch_size=12 is not a multiple of micro_batch_size*DP = 2*8 = 16"),
])
def test_deepspeed_bad_input_is_one_line(tmp_path, change, message):
    from mgsr_megatron.config import Config as Fresh

    cfg = deepspeed_config(tmp_path, teacher_dir=not change.get("no_teacher_dir"))
    cfg.deepspeed.offload_params = change.get("offload_params", False)
    cfg.parallel.tensor_model_parallel_size = change.get("tp", 1)
    cfg.schedule.global_batch_size = change.get("global_batch", 16)
    if change.get("teacher_defaults"):  # neither a config.json nor model fields
        cfg.teacher = dataclasses.replace(Fresh().teacher, load=cfg.teacher.load)
    with pytest.raises(UserError) as info:
        plan(cfg, 8, 80)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_deepspeed_plan_uses_the_config_fields_without_a_directory(tmp_path):
    """No teacher directory: the teacher's model fields (8 layers of small_config) give its shape."""
    cfg = deepspeed_config(tmp_path, teacher_dir=False)
    (tmp_path / "with_dir").mkdir()
    with_dir = plan(deepspeed_config(tmp_path / "with_dir"), 8, 1.0)
    assert plan(cfg, 8, 1.0).zero.teacher_params == with_dir.zero.teacher_params
