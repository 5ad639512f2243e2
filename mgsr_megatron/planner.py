"""`mgsr plan`: the per-GPU memory of a config on a cluster, whether it fits, and the largest micro-batch.

    mgsr plan --config examples/llama2_13b_to_7b/config.yaml --nodes 2 --gpus-per-node 8 --gpu-memory-gib 80

Everything is computed for one GPU of each pipeline stage (stages differ: the first holds the embedding
and the most micro-batches in flight, the last the output layer and the teacher logits); the worst stage
decides. Sizes in bytes; e = bytes per element of the model's params_dtype (2 for bf16).

Weights (per TP rank). Column/row-parallel matrices and column-parallel biases are split over TP; norms,
row-parallel biases and learned position embeddings are replicated (Megatron's layout). The pieces come
from the model's family (mgsr_megatron/architectures, ModelFamily.layer_params / norm_params /
position_params), derived from the same options the builder gives Megatron. Per layer, with q = a*d + 2*g*d:
  QKV h*q/t [+ q/t bias], output projection a*d*h/t [+ h bias], MLP (m*f*h + f*h)/t [+ m*f/t + h biases]
  (m = 2 for a gated/SwiGLU fc1, else 1), two norms of h (RMSNorm) or 2h (LayerNorm) each; so
  llama  h*q/t [+ q/t QKV bias] + a*d*h/t + 3*h*f/t (SwiGLU) + 2*h (RMSNorm)
  gpt2/opt  (3*h*h + 3*h)/t + h*h/t + h + (2*h*f + f)/t + h + 4*h (two LayerNorms)
  first stage: V_pad*h/t embedding (+ max_pos*h learned positions for gpt2/opt)
  last stage: final norm (h, or 2h for LayerNorm) + V_pad*h/t output layer (untied, or tied with PP > 1)

Student training states per parameter, Megatron mixed precision (what runs on CUDA): bf16/fp16 params
with fp32 gradients, fp32 master weights and Adam moments: 2 + 4 + 12 = 18 bytes; with the distributed
optimizer the 12 bytes of master weights and moments are sharded over DP: 6 + 12/DP (Megatron's
distributed-optimizer table). fp32 params: 4 + 4 + 8 = 16, distributed 8 + 8/DP.

Activations per transformer layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", eq. 2: s*b*h*(10 + 24/t + 5*a*s/(h*t)) for 16-bit GPT layers
without sequence parallelism), generalised to any element size e, GQA and FFN width/gating:
  replicated    s*b*h*(2e + 2e + 2)              two norm inputs, QKV and MLP inputs, two dropout masks
  attention     s*b*e*(2*a*d + 2*g*d)/t          Q, K, V and the output projection's input
  scores        b*a*s*s*(2e + 1)/t               softmax output, its dropout mask and dropout output
  MLP           s*b*f*e*2/t (GELU/ReLU) or s*b*f*e*4/t (SwiGLU: fc1's 2f output, silu(gate), fc2 input);
                the factor is the family's mlp_activation_factor
With e=2, g=a, f=4h and no gating this is exactly Korthikanti's formula. Activation recomputation as
the student's config sets it (model.recompute_granularity / recompute_method / recompute_num_layers,
Megatron's names, what the trainer passes to the TransformerConfig):
  full, uniform, n    each chunk of n layers keeps only its input (s*b*h*e), plus one chunk's full
                      activations (n layers, one micro-batch) while it is recomputed;
  full, block, n      the first n layers of the stage keep only their inputs, the others everything,
                      plus one layer's activations while it is recomputed;
  selective           Megatron's default module (core_attn): the scores term is recomputed (kept for
                      one layer at a time).
The "with full recomputation" rows are full/uniform/1.
The 1F1B pipeline schedule keeps min(PP - stage, micro-batches per step) micro-batches in flight on a
stage. The last stage adds the student's logits (b*s*V_pad/t*e) per micro-batch.

Teacher logits: the teacher's forward over all micro-batches of a step runs first and its vocab-parallel
logits stay on the last stage until the student's loss: n_micro*b*s*V_pad/t*e_teacher. The teacher's own
forward is no-grad (one layer's scores and MLP intermediate at a time).

SCRG generator (on-policy / off-policy schedules; the teacher generates in SeqKD): one generation call
covers r = min(mgsr.generation_micro_batches or n_micro, n_micro) * b rows; the generator's KV cache for
them, 2 * layers_on_stage * r * (max_prompt_length + max_new_tokens) * g/t * d * e, on SCRG steps plus the
teacher's (it scores with a KV cache, generation/teacher_scores.py), the no-grad teacher and student logits
of SCRG's scoring pass over [x; y] (r*s*V_pad/t*e each) and, with mgsr.reuse_scrg_teacher_logits, the
teacher logits of the step's other n_micro*b - r rows, kept for the loss.
Generation happens before the training forward/backward of the same step, so the peak is
    static (teacher weights + student states) + max(generation phase, training phase).
A GPU fits the plan if the peak is at most (1 - RESERVE_FRACTION) of its memory (CUDA context, NCCL
buffers and allocator fragmentation take the rest).

Teacher cache (teacher.cache, training/teacher_cache.py; Megatron engine only, the DeepSpeed engine refuses
it): the teacher is counted as training builds it, Config.loads_teacher. With ground-truth batches only it
is not loaded: no teacher weights, no teacher forward. Its distribution is not free, though: the trainer
expands each micro-batch's cached top-K into dense float32 vocab-parallel "logits" (TeacherCache.
dense_teacher_logits) and keeps all of the step's on the last stage, n_micro*b*s*V_pad/t*4 bytes (twice the
bf16 teacher's logits), and one expansion workspace of b*s*V_pad/t*4 (its `rows` tensor, at most one row
per token) takes the teacher forward's place. A generating schedule with a cache loads the teacher for
its generated batches and uses the cache on ground-truth ones: both are counted, the logits at 4 bytes.

DeepSpeed engine (deepspeed.enabled; deepspeed_engine/, data parallel only: TP = PP = 1, N = DP = world
size, one micro-batch in flight). Model shapes come from <student|teacher>.load/config.json when that
file exists (read with the converter's for_hf_config; no weights are needed), else from the config's
model fields; Hugging Face embeddings are not padded (V = config.json's vocab_size). P = parameters,
e = bytes of the params_dtype (bf16: 2), L = parameters of the largest module (the embedding or the output
matrix for every model here; max(V*h, h*f + f, QKV), an upper bound). Per GPU, per parameter, with
DeepSpeed's stage_1_and_2.py / stage3.py allocations (0.19.8; grad_accum_dtype = the model dtype):
  params     e (ZeRO-1/2) | e/N (ZeRO-3; 0 with offload_params: the partition lives in CPU memory)
  grads      e (ZeRO-1: the full gradients accumulate until the boundary) | e/N (ZeRO-2/3; 0 with
             offload_optimizer at ZeRO-2/3: the partition accumulates in CPU memory)
  optimizer  16/N: the fp32 gradient partition the step builds 4 + fp32 master 4 + Adam m, v 8 (the ZeRO
             paper's K = 12 plus the step's fp32 gradient); fp32 params: the same (stage_1_and_2 clones
             the master partition also in fp32), except ZeRO-3 without offload, which shares the master
             with the fp32 parameter partition (12/N); 0 with offload_optimizer
  ZeRO-3     + 2e*L: one module's parameters and their gradients gathered (DeepSpeed's estimator: 4*L)
So bf16: ZeRO-1 4 + 16/N, ZeRO-2 2 + 18/N, ZeRO-3 20/N + 4L/P. offload_optimizer moves (16 + e)/N per
parameter to CPU memory on each rank: the 16 above plus one e-byte partition buffer (ZeRO-1/2: the bf16
copy of the updated partition, param_buffer_of_bit16_for_cpu_offload_groups; ZeRO-3: the gradient
partition, grad_partitions_flat_buffer); offload_params moves the e/N parameter partition there. CPU
memory is reported per node (ranks per node x per rank).
Against DeepSpeed's estimators (estimate_zero2_model_states_mem_needs / estimate_zero3_..., called with
additional_buffer_factor=1, tests/test_planner.py): GPU equal for ZeRO-2, ZeRO-2 + offload, ZeRO-3 +
offload, ZeRO-3 + offload + offload_params; ZeRO-3 without offload is 2P/N higher (the step's fp32
gradient partition, which DeepSpeed's 18 bytes leave out); ZeRO-1 is e*P*(1 - 1/N) higher (DeepSpeed has
no ZeRO-1 estimate and applies ZeRO-2's, whose gradients are partitioned). CPU with offload: e*P/nodes
higher than the estimators' 16 (ZeRO-2) / 16 and 18 (ZeRO-3, zero_init) per parameter per node (the
e-byte buffer above); ZeRO-2's estimate takes max(4*GPUs, 16) and every non-offload estimate 4*P*GPUs per
node: the fp32 copy each process would hold while loading the model, a start-up peak the planner does not
plan (the engine loads bf16, ZeRO-3 streamed into zero.Init). Not counted (left to the reserve): the
reduce / all-gather buckets (reduce_bucket_size, 5e8 elements by default: up to 1 GiB in bf16) and
ZeRO-3's prefetch (stage3_prefetch_bucket_size, 5e7 elements).
The teacher (frozen, no optimizer): replicated P_t*e_t, or with teacher_zero3 P_t*e_t/N plus its largest
module gathered during the forward (L_t*e_t, one module at a time); with offload_params its partition is in
CPU memory (the engine's teacher_config offloads it too). Activations, student logits and the teacher's
forward workspace are the TP=1, PP=1 rows above (the engine refuses recompute_granularity: Hugging Face
models keep every activation, so no recomputation row); the teacher's logits are those of one micro-batch
(the engine runs the teacher per micro-batch, before the student's forward). The ZeRO rows of the output
show the student's states and the peak for each stage with and without optimizer offload (and ZeRO-3 with
parameter offload too), the rest as configured.

`--device cpu` plans one training process on CPU (the CPU adapter runs the same Megatron code, at the
same precision and with the same states, so every row above holds; --gpus-per-node then counts processes
and --gpu-memory-gib is the memory of one process). What a GPU's memory does not hold but a process's
resident set does, the interpreter, torch, Megatron and every module the trainer imports, the gloo
process groups and their threads, the data's tokenizer and indices, the allocator's arenas, is one
measured row, CPU_RUNTIME_BYTES (see there). The peak is then comparable with the peak RSS that
`mgsr train` logs on CPU (metrics.jsonl `mem_gib`, platform.peak_memory_bytes); tests/test_plan_cpu_rss.py
checks it for the tiny example within 15%.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mgsr_megatron.architectures import get_family
from mgsr_megatron.config import Config, ModelConfig, check_batch_layout, generation_groups, load_config, validate
from mgsr_megatron.errors import UserError

GIB = 1024 ** 3
RESERVE_FRACTION = 0.10
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# What one `mgsr train` process on CPU holds besides the planned rows: the peak RSS of the tiny example
# (examples/tiny/config.yaml: 2 processes, TP=2, its data and on-policy schedule, 2 ground-truth and 2
# SCRG steps) with student and teacher shrunk to 1 layer, hidden 16, minus this planner's rows for those
# minimal models (1.5 MiB of weights, states and activations), measured with
# `python -m tests.test_plan_cpu_rss runtime DIR` (after `... setup DIR`): 0.3867 GiB (396.0 MiB) - 1.5 MiB
# = 394.5 MiB, on torch 2.13 (CPU), Megatron-Core 0.16.1, Python 3.11, Linux x86-64. It moves with those
# versions and a little with the layout (each gloo process group has its threads); the planner adds it
# once per process.
CPU_RUNTIME_BYTES = int(394.5 * 2 ** 20)
DEVICES = ("gpu", "cpu")


def _resolved(model: ModelConfig) -> ModelConfig:
    from mgsr_megatron.models.builder import resolve

    return resolve(model)


def _head_dim(m: ModelConfig) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def layer_params(m: ModelConfig, tp: int) -> int:
    """Parameters of one transformer layer held by one TP rank (the family's formula)."""
    return get_family(m.arch).layer_params(m, tp)


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters of pipeline stage `stage` on one TP rank."""
    from mgsr_megatron.models.vocab import padded_vocab_size

    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    total = m.num_layers // pp * layer_params(m, tp)
    if stage == 0:
        total += vocab * m.hidden_size // tp
        total += get_family(m.arch).position_params(m)
    if stage == pp - 1:
        total += get_family(m.arch).norm_params(m.hidden_size)
        if not m.tie_embeddings or pp > 1:
            total += vocab * m.hidden_size // tp
    return total


def state_bytes_per_param(dtype: str, dp: int, distributed: bool) -> float:
    """Student weights + gradients + optimizer states per parameter (Megatron mixed precision)."""
    if DTYPE_BYTES[dtype] == 4:
        return 8 + 8 / dp if distributed else 16
    return 6 + 12 / dp if distributed else 18


def layer_activation_bytes(m: ModelConfig, tp: int, micro_batch: int, seq: int) -> int:
    """Korthikanti et al.'s per-layer activation bytes, generalised (see the module docstring)."""
    e = DTYPE_BYTES[m.params_dtype]
    s, b, h, f = seq, micro_batch, m.hidden_size, m.ffn_hidden_size
    a, g, d = m.num_attention_heads, m.num_query_groups, _head_dim(m)
    replicated = s * b * h * (2 * e + 2 * e + 2)
    attention = s * b * e * (2 * a * d + 2 * g * d) // tp
    scores = b * a * s * s * (2 * e + 1) // tp
    mlp = s * b * f * e * get_family(m.arch).mlp_activation_factor // tp
    return replicated + attention + scores + mlp


def layer_scores_bytes(m: ModelConfig, tp: int, micro_batch: int, seq: int) -> int:
    """The attention-scores part of a layer's activations (what selective recomputation drops)."""
    e = DTYPE_BYTES[m.params_dtype]
    return micro_batch * m.num_attention_heads * seq * seq * (2 * e + 1) // tp


class StageActivations(NamedTuple):
    """The activation sizes of one pipeline stage of the student, per micro-batch (bytes)."""

    layers: int  # transformer layers on the stage
    per_layer: int  # one layer's activations (layer_activation_bytes)
    layer_inputs: int  # one layer's input, what full recomputation keeps
    scores: int  # one layer's attention scores (layer_scores_bytes), what selective recomputation drops
    embedding_mask: int  # the embedding's dropout mask (first stage only, else 0)
    in_flight: int  # micro-batches the 1F1B schedule keeps in flight on the stage


def recomputed_activation_bytes(granularity: str | None, method: str | None, num_layers: int | None,
                                stage: StageActivations) -> int:
    """Activation bytes of one stage under Megatron's recomputation settings (module docstring)."""
    layers, per_layer, layer_inputs, scores, embedding_mask, in_flight = stage
    if granularity == "full" and layers:
        n = max(1, num_layers or 1)
        if method == "block":
            r = min(n, layers)
            return in_flight * ((layers - r) * per_layer + r * layer_inputs + embedding_mask) + per_layer
        chunks = -(-layers // n)
        return in_flight * (chunks * layer_inputs + embedding_mask) + min(n, layers) * per_layer
    if granularity == "selective":
        return in_flight * (layers * (per_layer - scores) + embedding_mask) + scores
    return in_flight * (layers * per_layer + embedding_mask)


def logits_bytes(m: ModelConfig, tp: int, rows: int, seq: int) -> int:
    from mgsr_megatron.models.vocab import padded_vocab_size

    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    return rows * seq * vocab // tp * DTYPE_BYTES[m.params_dtype]


def teacher_forward_bytes(teacher: ModelConfig, tp: int, micro_batch: int, seq: int) -> int:
    """The no-grad teacher forward's workspace: one layer's scores and MLP intermediate at a time."""
    e_t = DTYPE_BYTES[teacher.params_dtype]
    return micro_batch * teacher.num_attention_heads // tp * seq * seq * e_t \
        + seq * micro_batch * teacher.ffn_hidden_size // tp * e_t * get_family(teacher.arch).fc1_multiple


def cache_expansion_bytes(teacher: ModelConfig, tp: int, micro_batch: int, seq: int) -> int:
    """The workspace of expanding one micro-batch's cached top-K into dense fp32 logits (module docstring)."""
    return logits_bytes(teacher, tp, micro_batch, seq) // DTYPE_BYTES[teacher.params_dtype] * 4


def kv_cache_bytes(m: ModelConfig, tp: int, pp: int, micro_batch: int, length: int) -> int:
    return 2 * (m.num_layers // pp) * micro_batch * length * (m.num_query_groups // tp) * _head_dim(m) \
        * DTYPE_BYTES[m.params_dtype]


@dataclass
class StagePlan:
    stage: int
    teacher_weights: int
    student_params: int
    student_states: float  # weights + grads + optimizer, with the configured optimizer
    student_states_other: float  # ... with the other choice (distributed <-> not)
    activations: int  # as configured (student.recompute_*)
    activations_recompute: int  # full recomputation (uniform, 1 layer per chunk)
    student_logits: int
    teacher_logits: int
    teacher_forward: int
    kv_cache: int  # the generator's; on SCRG steps also the teacher's (generation/teacher_scores.py)
    scoring_logits: int
    in_flight: int
    # SCRG with mgsr.reuse_scrg_teacher_logits: the teacher logits of the step's other rows, held while the
    # last generation call runs (the loss takes them)
    scrg_kept_logits: int = 0
    runtime: int = 0  # the CPU process runtime (CPU_RUNTIME_BYTES) with --device cpu; 0 on GPU

    def peak(self, recompute: bool = False, other_optimizer: bool = False) -> float:
        static = self.runtime + self.teacher_weights \
            + (self.student_states_other if other_optimizer else self.student_states)
        training = self.teacher_logits + max(
            self.teacher_forward,
            (self.activations_recompute if recompute else self.activations) + self.student_logits)
        generation = self.kv_cache + self.scoring_logits + self.scrg_kept_logits
        return static + max(training, generation)


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    num_micro: int
    seq_length: int
    distributed_optimizer: bool
    uses_teacher: bool  # the teacher model is built (Config.loads_teacher)
    generator: str | None  # student | teacher | None
    stages: list[StagePlan]
    gpu_bytes: float
    device: str = "gpu"
    teacher_cached: bool = False  # ground-truth batches take the teacher's distribution from teacher.cache
    zero: ZeroPlan | None = None  # the DeepSpeed engine's rows (deepspeed.enabled), else None

    @property
    def usable_bytes(self) -> float:
        return self.gpu_bytes * (1 - RESERVE_FRACTION)

    def worst(self, **kw) -> StagePlan:
        return max(self.stages, key=lambda st: st.peak(**kw))

    def fits(self, **kw) -> bool:
        return self.worst(**kw).peak(**kw) <= self.usable_bytes


def check_layout(cfg: Config, world_size: int, micro_batch: int | None = None) -> int:
    """The checks a training launch would make before loading weights; returns DP."""
    from mgsr_megatron.models.vocab import padded_vocab_size

    if cfg.deepspeed.enabled:
        return check_deepspeed_layout(cfg, world_size, micro_batch)
    from mgsr_megatron.parallel import validate_layout

    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    models = {"student": _resolved(cfg.student), "teacher": _resolved(cfg.teacher)}
    validate_layout(world_size, tp, pp, models)
    from mgsr_megatron.training.optimizer import validate_settings

    validate_settings(cfg, tp, pp)  # precision / optimizer / recomputation settings, as training checks them
    for name, m in models.items():
        try:
            padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
        except UserError as exc:
            raise UserError(f"{name}: {exc}") from None
    dp = world_size // (tp * pp)
    check_batch_layout(cfg, dp, micro_batch, models=tuple(models))  # the trainer's own check
    return dp


def plan(cfg: Config, world_size: int, gpu_memory_gib: float = 80.0, micro_batch: int | None = None,
         device: str = "gpu") -> Plan:
    """The memory of one GPU (device="gpu") or of one CPU training process (device="cpu") per stage."""
    if device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)} (got {device!r})")
    if cfg.deepspeed.enabled:
        return plan_deepspeed(cfg, world_size, gpu_memory_gib, micro_batch, device)

    dp = check_layout(cfg, world_size, micro_batch)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    student, teacher = _resolved(cfg.student), _resolved(cfg.teacher)
    sched, mgsr = cfg.schedule, cfg.mgsr
    b = sched.micro_batch_size if micro_batch is None else micro_batch
    s = sched.seq_length
    num_micro = sched.global_batch_size // (b * dp)
    uses_teacher = cfg.loads_teacher  # not with teacher.cache and ground truth only (the trainer's rule)
    cached = bool(cfg.needs_teacher and cfg.teacher.cache)
    generator = None
    if uses_teacher and mgsr.data_schedule != "ground_truth":
        generator = "teacher" if mgsr.data_schedule == "seqkd" else "student"
    distributed = cfg.optimizer.use_distributed_optimizer
    stages = []
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        in_flight = min(pp - stage, num_micro)
        n_student = stage_params(student, tp, pp, stage)
        layers = student.num_layers // pp
        per_layer = layer_activation_bytes(student, tp, b, s)
        layer_inputs = s * b * student.hidden_size * DTYPE_BYTES[student.params_dtype]
        embedding_mask = s * b * student.hidden_size if first else 0  # embedding dropout mask (1 byte)
        scores = layer_scores_bytes(student, tp, b, s)
        sizes = StageActivations(layers, per_layer, layer_inputs, scores, embedding_mask, in_flight)
        activations = recomputed_activation_bytes(
            student.recompute_granularity, student.recompute_method, student.recompute_num_layers, sizes)
        recompute = recomputed_activation_bytes("full", "uniform", 1, sizes)
        teacher_forward = teacher_forward_bytes(teacher, tp, b, s) if uses_teacher else 0
        if cached and last:
            teacher_forward = max(teacher_forward, cache_expansion_bytes(teacher, tp, b, s))
        teacher_logits = 0
        if last and (uses_teacher or cached):  # the cache's dense logits are float32 (module docstring)
            teacher_logits = logits_bytes(teacher, tp, num_micro * b, s)
            if cached:
                teacher_logits = cache_expansion_bytes(teacher, tp, num_micro * b, s)
        kv, scoring, kept = 0, 0, 0
        if generator is not None:
            gen_model = teacher if generator == "teacher" else student
            length = min(cfg.data.max_prompt_length + mgsr.max_new_tokens, s)
            rows = len(generation_groups(num_micro, mgsr.generation_micro_batches)[0]) * b  # the largest call's
            kv = kv_cache_bytes(gen_model, tp, pp, rows, length)
            if generator == "student" and mgsr.scrg_rounds > 0:
                kv += kv_cache_bytes(teacher, tp, pp, rows, length)  # SCRG's teacher scores with a KV cache
                if last:
                    scoring = logits_bytes(student, tp, rows, length) + logits_bytes(teacher, tp, rows, length)
                    if mgsr.reuse_scrg_teacher_logits:
                        kept = logits_bytes(teacher, tp, num_micro * b - rows, length)
        stages.append(StagePlan(
            stage=stage,
            teacher_weights=stage_params(teacher, tp, pp, stage) * DTYPE_BYTES[teacher.params_dtype]
            if uses_teacher else 0,
            student_params=n_student,
            student_states=n_student * state_bytes_per_param(student.params_dtype, dp, distributed),
            student_states_other=n_student * state_bytes_per_param(student.params_dtype, dp, not distributed),
            activations=activations, activations_recompute=recompute,
            student_logits=in_flight * logits_bytes(student, tp, b, s) if last else 0,
            teacher_logits=teacher_logits,
            teacher_forward=teacher_forward, kv_cache=kv, scoring_logits=scoring, in_flight=in_flight,
            scrg_kept_logits=kept,
            runtime=CPU_RUNTIME_BYTES if device == "cpu" else 0))
    return Plan(world_size, tp, pp, dp, b, num_micro, s, distributed, uses_teacher, generator, stages,
                gpu_memory_gib * GIB, device, teacher_cached=cached)


# --------------------------------------------------------------------------------------------------
# The DeepSpeed engine (module docstring, "DeepSpeed engine")

SHAPE_FIELDS = ("arch", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size")


class ZeroChoice(NamedTuple):
    """How the student's model states are placed: ZeRO stage and what is offloaded to CPU memory."""

    stage: int
    offload_optimizer: bool
    offload_params: bool = False

    @property
    def name(self) -> str:
        offload = " + optimizer and param offload" if self.offload_params else \
            " + optimizer offload" if self.offload_optimizer else ""
        return f"ZeRO-{self.stage}{offload}"


# the rows `mgsr plan` shows for the student besides the configured one
ZERO_CHOICES = (ZeroChoice(1, False), ZeroChoice(1, True), ZeroChoice(2, False), ZeroChoice(2, True),
                ZeroChoice(3, False), ZeroChoice(3, True), ZeroChoice(3, True, True))


class ZeroStates(NamedTuple):
    gpu: float  # bytes on each GPU
    cpu: float  # bytes in CPU memory per rank (offload)


def largest_module_params(m: ModelConfig) -> int:
    """An upper bound of the parameters of one module of the HF model (what ZeRO-3 gathers at a time):
    the embedding / output matrix V*h, an MLP matrix h*f (+ bias), or a fused QKV h*(a*d + 2*g*d) (+ bias)."""
    qkv = m.num_attention_heads * _head_dim(m) + 2 * m.num_query_groups * _head_dim(m)
    return max(m.vocab_size * m.hidden_size, m.hidden_size * m.ffn_hidden_size + m.ffn_hidden_size,
               m.hidden_size * qkv + qkv)


def zero_state_bytes(n_params: int, largest: int, dtype: str, dp: int, choice: ZeroChoice) -> ZeroStates:
    """The student's params + grads + AdamW under ZeRO (module docstring): per GPU
    params e (ZeRO-1/2) or e/N (ZeRO-3, 0 offloaded), grads e (ZeRO-1) or e/N (0 offloaded at ZeRO-2/3),
    optimizer 16/N (fp32 step gradient 4 + master 4 + Adam 8; 12/N for fp32 at ZeRO-3 without offload;
    0 offloaded), + 2e*L at ZeRO-3. CPU per rank: (16 + e)/N with optimizer offload, + e/N with
    offload_params."""
    e = DTYPE_BYTES[dtype]
    stage, offload_optimizer, offload_params = choice
    params = e if stage < 3 else e / dp
    grads = e if stage == 1 else 0 if offload_optimizer else e / dp
    optimizer = (12 if e == 4 and stage == 3 else 16) / dp
    gpu, cpu = params + grads, 0.0
    if offload_optimizer:
        cpu += (16 + e) / dp  # the fp32 states and one e-byte partition buffer
    else:
        gpu += optimizer
    if offload_params:
        gpu, cpu = gpu - params, cpu + params
    gathered = 2 * e * largest if stage == 3 else 0
    return ZeroStates(n_params * gpu + gathered, n_params * cpu)


def zero_teacher_bytes(n_params: int, largest: int, dtype: str, dp: int, zero3: bool,
                       offload_params: bool) -> ZeroStates:
    """The frozen teacher: replicated P*e, or ZeRO-3 P*e/N (in CPU memory with offload_params) plus its
    largest module gathered during the forward (L*e)."""
    e = DTYPE_BYTES[dtype]
    if not zero3:
        return ZeroStates(n_params * e, 0.0)
    partition = n_params * e / dp
    return ZeroStates(largest * e, partition) if offload_params else ZeroStates(partition + largest * e, 0.0)


def _fields_left_at_defaults(model: ModelConfig, name: str) -> bool:
    default = getattr(Config(), name)
    return all(getattr(model, key) == getattr(default, key) for key in SHAPE_FIELDS)


def hf_model_shape(model: ModelConfig, name: str) -> ModelConfig:
    """The Hugging Face model's shape: `name`.load/config.json if it exists (no weights read), else the
    config's model fields; not vocab-padded (make_vocab_size_divisible_by=1, like the HF embedding)."""
    from mgsr_megatron.architectures import for_hf_config

    config_json = Path(model.load) / "config.json" if model.load else None
    if config_json is not None and config_json.is_file():
        try:
            hf = json.loads(config_json.read_text())
            found, vocab = for_hf_config(hf)[1], int(hf["vocab_size"])
        except UserError as exc:
            raise UserError(f"{name}.load={model.load}: {exc}") from None
        except (ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:  # JSON errors too
            raise UserError(f"{name}.load: {config_json}: not a Hugging Face config.json ({exc!r})") from None
        model = dataclasses.replace(found, load=model.load, params_dtype=model.params_dtype, vocab_size=vocab)
    elif _fields_left_at_defaults(model, name):
        raise UserError(f"{name}.load={model.load}: no config.json there and {name}.num_layers / hidden_size / ... "
                        f"are left at their defaults: point {name}.load at a Hugging Face directory or set "
                        f"{name}'s model fields for `mgsr plan`")
    return _resolved(dataclasses.replace(model, make_vocab_size_divisible_by=1))


def deepspeed_models(cfg: Config) -> dict[str, ModelConfig]:
    """{"student": shape, "teacher": shape (when the engine loads it)} for the DeepSpeed plan."""
    names = ("student", "teacher") if cfg.loads_teacher else ("student",)
    return {name: hf_model_shape(getattr(cfg, name), name) for name in names}


def check_deepspeed_layout(cfg: Config, world_size: int, micro_batch: int | None = None) -> int:
    """The DeepSpeed engine's own checks (TP = PP = 1, offload_params with ZeRO-3, ...) and the batch layout
    over DP = world size against the HF models' shapes; returns DP."""
    from mgsr_megatron.deepspeed_engine.settings import validate_settings

    validate_settings(cfg)
    models = deepspeed_models(cfg)
    check_batch_layout(dataclasses.replace(cfg, **models), world_size, micro_batch, models=tuple(models))
    return world_size


@dataclass
class ZeroPlan:
    """The DeepSpeed rows of a plan: model states as configured and for every ZERO_CHOICES row."""

    choice: ZeroChoice
    student: ZeroStates
    teacher: ZeroStates
    student_params: int
    teacher_params: int
    teacher_zero3: bool
    alternatives: dict  # ZeroChoice -> (student ZeroStates, teacher ZeroStates)

    def peak_with(self, stage: StagePlan, choice: ZeroChoice) -> float:
        """The GPU peak with the student's (and, through offload_params, a ZeRO-3 teacher's) states of `choice`."""
        student, teacher = self.alternatives[choice]
        return stage.peak() - self.student.gpu - self.teacher.gpu + student.gpu + teacher.gpu


def _zero_plan(cfg: Config, models: dict[str, ModelConfig], dp: int) -> ZeroPlan:
    ds, student = cfg.deepspeed, models["student"]
    teacher = models.get("teacher")
    n_student = stage_params(student, 1, 1, 0)
    n_teacher = stage_params(teacher, 1, 1, 0) if teacher else 0
    largest_t = largest_module_params(teacher) if teacher else 0

    def states(choice: ZeroChoice) -> tuple[ZeroStates, ZeroStates]:
        mine = zero_state_bytes(n_student, largest_module_params(student), student.params_dtype, dp, choice)
        theirs = zero_teacher_bytes(n_teacher, largest_t, teacher.params_dtype, dp, ds.teacher_zero3,
                                    choice.offload_params) if teacher else ZeroStates(0, 0.0)
        return mine, theirs

    choice = ZeroChoice(ds.zero_stage, ds.offload_optimizer, ds.offload_params)
    alternatives = {c: states(c) for c in dict.fromkeys(ZERO_CHOICES + (choice,))}
    return ZeroPlan(choice, *alternatives[choice], n_student, n_teacher, ds.teacher_zero3, alternatives)


def plan_deepspeed(cfg: Config, world_size: int, gpu_memory_gib: float, micro_batch: int | None,
                   device: str) -> Plan:
    """The memory of one GPU under the DeepSpeed engine (module docstring); one stage, TP = PP = 1."""
    dp = check_deepspeed_layout(cfg, world_size, micro_batch)
    models = deepspeed_models(cfg)
    student, teacher = models["student"], models.get("teacher")
    b = cfg.schedule.micro_batch_size if micro_batch is None else micro_batch
    s = cfg.schedule.seq_length
    zero = _zero_plan(cfg, models, dp)
    sizes = StageActivations(student.num_layers, layer_activation_bytes(student, 1, b, s),
                             s * b * student.hidden_size * DTYPE_BYTES[student.params_dtype],
                             layer_scores_bytes(student, 1, b, s), s * b * student.hidden_size, 1)
    activations = recomputed_activation_bytes(None, None, None, sizes)  # no recomputation under DeepSpeed
    stage = StagePlan(
        stage=0, teacher_weights=int(zero.teacher.gpu), student_params=zero.student_params,
        student_states=zero.student.gpu, student_states_other=zero.student.gpu, activations=activations,
        activations_recompute=activations, student_logits=logits_bytes(student, 1, b, s),
        teacher_logits=logits_bytes(teacher, 1, b, s) if teacher else 0,
        teacher_forward=teacher_forward_bytes(teacher, 1, b, s) if teacher else 0, kv_cache=0, scoring_logits=0,
        in_flight=1, runtime=CPU_RUNTIME_BYTES if device == "cpu" else 0)
    num_micro = cfg.schedule.global_batch_size // (b * dp)
    return Plan(world_size, 1, 1, dp, b, num_micro, s, False, teacher is not None, None, [stage],
                gpu_memory_gib * GIB, device, zero=zero)


def largest_micro_batch(cfg: Config, world_size: int, gpu_memory_gib: float, recompute: bool = False,
                        device: str = "gpu") -> int | None:
    """The largest micro-batch b with global_batch % (b*DP) == 0 whose plan fits (None if none does)."""
    dp = check_layout(cfg, world_size, 1)
    best = None
    for b in range(1, cfg.schedule.global_batch_size // dp + 1):
        if cfg.schedule.global_batch_size % (b * dp):
            continue
        if plan(cfg, world_size, gpu_memory_gib, micro_batch=b, device=device).fits(recompute=recompute):
            best = b
    return best


def _recompute_name(m: ModelConfig) -> str:
    if m.recompute_granularity is None:
        return "no recomputation"
    if m.recompute_granularity == "full":
        return f"full recompute ({m.recompute_method} {m.recompute_num_layers})"
    return "selective recompute"


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def _teacher_summary(cfg: Config, p: Plan) -> str:
    """The plan's teacher line: its size, or that it is not used / comes from teacher.cache."""
    size = f"{stage_params(_resolved(cfg.teacher), 1, 1, 0) / 1e9:.3f} B params ({cfg.teacher.params_dtype})"
    if p.teacher_cached and not p.uses_teacher:
        return f"not loaded: its distribution comes from teacher.cache {cfg.teacher.cache} (fp32 logits rebuilt)"
    if p.teacher_cached:
        return f"{size}, for generated batches; ground-truth batches from teacher.cache {cfg.teacher.cache}"
    return size if p.uses_teacher else "not used"


def format_plan(cfg: Config, p: Plan, nodes: int, gpus_per_node: int, config_name: str = "") -> str:
    if p.zero is not None:
        return format_zero_plan(cfg, p, nodes, gpus_per_node, config_name)
    worst = p.worst()
    opt_now = "distributed" if p.distributed_optimizer else "plain"
    opt_other = "plain" if p.distributed_optimizer else "distributed"
    unit = "CPU process(es)" if p.device == "cpu" else "GPU(s)"
    lines = [
        f"mgsr plan {config_name}: {nodes} node(s) x {gpus_per_node} {unit} of {p.gpu_bytes / GIB:g} GiB "
        f"= world {p.world_size}: TP={p.tp} PP={p.pp} DP={p.dp}",
        f"  batch: global {cfg.schedule.global_batch_size} = micro {p.micro_batch} x DP {p.dp} x "
        f"{p.num_micro} micro-batches/step; seq_length {p.seq_length}; generator: {p.generator or 'none'}",
        f"  student {stage_params(_resolved(cfg.student), 1, 1, 0) / 1e9:.3f} B params "
        f"({cfg.student.params_dtype}), teacher " + _teacher_summary(cfg, p),
        ("  per CPU process, GiB                          " if p.device == "cpu" else
         "  per GPU, GiB                                  ") + "".join(f"  stage {st.stage}" for st in p.stages),
    ]
    rows = [("CPU process runtime (measured constant)", lambda st: st.runtime)] if p.device == "cpu" else []
    rows += [
        ("teacher weights", lambda st: st.teacher_weights),
        (f"student weights+grads+Adam ({opt_now} opt.)", lambda st: st.student_states),
        (f"  (with the {opt_other} optimizer)", lambda st: st.student_states_other),
        (f"activations, {_recompute_name(cfg.student)}", lambda st: st.activations),
        ("  (with full recomputation)", lambda st: st.activations_recompute),
        ("student logits", lambda st: st.student_logits),
        ("teacher logits kept for the step", lambda st: st.teacher_logits),
        ("teacher forward workspace", lambda st: st.teacher_forward),
        ("KV caches (SCRG: student + teacher)", lambda st: st.kv_cache),
        ("SCRG scoring logits", lambda st: st.scoring_logits),
        ("SCRG teacher logits kept for the loss", lambda st: st.scrg_kept_logits),
        ("PEAK (as configured)", lambda st: st.peak()),
        ("  peak with full recomputation", lambda st: st.peak(recompute=True)),
        (f"  peak with the {opt_other} optimizer", lambda st: st.peak(other_optimizer=True)),
    ]
    for name, value in rows:
        lines.append(f"  {name:<44}" + "".join(f"  {_gib(value(st))}" for st in p.stages))
    usable = p.usable_bytes
    verdict = "FITS" if p.fits() else "DOES NOT FIT"
    lines.append(f"  {verdict}: worst stage {worst.stage} needs {worst.peak() / GIB:.2f} GiB of {usable / GIB:.2f} "
                 f"usable ({100 * (1 - RESERVE_FRACTION):.0f}% of {p.gpu_bytes / GIB:g} GiB)")
    best = largest_micro_batch(cfg, p.world_size, p.gpu_bytes / GIB, device=p.device)
    best_re = largest_micro_batch(cfg, p.world_size, p.gpu_bytes / GIB, recompute=True, device=p.device)
    lines.append(f"  largest micro-batch that fits (global batch divisible by micro x DP): "
                 f"{best if best else 'none'}; with full recomputation: {best_re if best_re else 'none'}")
    return "\n".join(lines)


def _zero_rows(p: Plan, gpus_per_node: int) -> list[str]:
    """One line per ZeRO choice: the student's states per GPU, the peak, CPU memory per node, fits."""
    zero, stage, usable = p.zero, p.stages[0], p.usable_bytes
    lines = [f"  {'ZeRO choices, GiB (* = configured)':<44}{'states/GPU':>12}{'peak/GPU':>10}{'CPU/node':>10}"]
    for choice, (student, teacher) in zero.alternatives.items():
        peak = zero.peak_with(stage, choice)
        mark = "*" if choice == zero.choice else " "
        cpu_node = (student.cpu + teacher.cpu) * gpus_per_node
        lines.append(f" {mark}{choice.name:<44}    {_gib(student.gpu)}  {_gib(peak)}  {_gib(cpu_node)}  "
                     f"{'fits' if peak <= usable else 'does not fit'}")
    return lines


def format_zero_plan(cfg: Config, p: Plan, nodes: int, gpus_per_node: int, config_name: str = "") -> str:
    """`mgsr plan`'s output for the DeepSpeed engine: one GPU (all are alike), CPU memory per node, ZeRO rows."""
    zero, stage = p.zero, p.stages[0]
    unit = "CPU process(es)" if p.device == "cpu" else "GPU(s)"
    teacher_mode = "ZeRO-3 partitioned" if zero.teacher_zero3 else "replicated"
    teacher = f"{zero.teacher_params / 1e9:.3f} B params ({cfg.teacher.params_dtype}, {teacher_mode})" \
        if p.uses_teacher else "not used"
    lines = [
        f"mgsr plan {config_name}: {nodes} node(s) x {gpus_per_node} {unit} of {p.gpu_bytes / GIB:g} GiB "
        f"= world {p.world_size}: DeepSpeed engine, DP={p.dp} (TP=PP=1), {zero.choice.name}",
        f"  batch: global {cfg.schedule.global_batch_size} = micro {p.micro_batch} x DP {p.dp} x "
        f"{p.num_micro} micro-batches/step; seq_length {p.seq_length}",
        f"  student {zero.student_params / 1e9:.3f} B params ({cfg.student.params_dtype}), teacher {teacher}",
        "  per CPU process, GiB" if p.device == "cpu" else "  per GPU, GiB",
    ]
    rows = [("CPU process runtime (measured constant)", stage.runtime)] if p.device == "cpu" else []
    rows += [
        (f"teacher weights ({teacher_mode})", stage.teacher_weights),
        (f"student weights+grads+Adam ({zero.choice.name})", stage.student_states),
        ("activations, no recomputation (HF model)", stage.activations),
        ("student logits", stage.student_logits),
        ("teacher logits (one micro-batch)", stage.teacher_logits),
        ("teacher forward workspace", stage.teacher_forward),
        ("PEAK (as configured)", stage.peak()),
    ]
    lines += [f"  {name:<58}{_gib(value)}" for name, value in rows]
    verdict = "FITS" if p.fits() else "DOES NOT FIT"
    lines.append(f"  {verdict}: {stage.peak() / GIB:.2f} GiB of {p.usable_bytes / GIB:.2f} usable "
                 f"({100 * (1 - RESERVE_FRACTION):.0f}% of {p.gpu_bytes / GIB:g} GiB)")
    per_node = gpus_per_node
    lines.append(f"  CPU memory per node ({per_node} ranks, offload): student states "
                 f"{zero.student.cpu * per_node / GIB:.2f} GiB, teacher {zero.teacher.cpu * per_node / GIB:.2f} GiB")
    lines += _zero_rows(p, gpus_per_node)
    best = largest_micro_batch(cfg, p.world_size, p.gpu_bytes / GIB, device=p.device)
    lines.append(f"  largest micro-batch that fits (global batch divisible by micro x DP): {best if best else 'none'}")
    return "\n".join(lines)


def run_plan(args, overrides: list[str]) -> None:
    """CLI entry: `mgsr plan --config F --nodes N --gpus-per-node G [--gpu-memory-gib M] [--device cpu]
    [--a.b=v ...]`."""
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserError(f"--nodes and --gpus-per-node must be >= 1 (got {args.nodes}, {args.gpus_per_node})")
    if args.gpu_memory_gib <= 0:
        raise UserError(f"--gpu-memory-gib must be positive (got {args.gpu_memory_gib})")
    cfg = validate(load_config(args.config, overrides))
    world = args.nodes * args.gpus_per_node
    p = plan(cfg, world, args.gpu_memory_gib, device=getattr(args, "device", "gpu"))
    print(format_plan(cfg, p, args.nodes, args.gpus_per_node, args.config))


__all__ = ["CPU_RUNTIME_BYTES", "plan", "largest_micro_batch", "format_plan", "run_plan", "layer_params",
           "stage_params", "layer_activation_bytes", "state_bytes_per_param", "kv_cache_bytes", "check_layout",
           "ZeroChoice", "ZeroStates", "zero_state_bytes", "zero_teacher_bytes", "largest_module_params",
           "hf_model_shape", "plan_deepspeed", "format_zero_plan"]
