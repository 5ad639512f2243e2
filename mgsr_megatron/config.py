"""Every setting as a dataclass; YAML files plus `--section.field=value` command-line overrides.

    cfg = load_config("examples/tiny/config.yaml", ["--student.num_layers=4", "--tensor-model-parallel-size", "2"])

Unknown sections or fields and values of the wrong type raise `UserError` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NewType

import yaml

from mgsr_megatron.errors import UserError

# A registered model family's name (mgsr_megatron/architectures): checked against the live registry,
# so a family registered at run time (register_family) is accepted like the built-in ones.
FamilyName = NewType("FamilyName", str)


def family_names() -> tuple[str, ...]:
    """The registered model families (imported here, not at module level: the registry's family modules
    import this module)."""
    from mgsr_megatron.architectures import family_names as names

    return names()


def __getattr__(name: str):
    if name == "ARCHITECTURES":  # the registered family names, at the time of asking
        return family_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ModelConfig:
    """One GPTModel (teacher or student). `vocab_size` is the TRUE vocabulary size."""

    # a registered model family: llama (also Mistral/Qwen2 without sliding window), gpt2, opt
    arch: FamilyName = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int | None = None  # default: 4*hidden (gpt2/opt), 8/3*hidden rounded to 64 (llama)
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # GQA groups (llama); None = multi-head attention
    kv_channels: int | None = None  # head dim; default hidden/heads
    vocab_size: int = 512
    make_vocab_size_divisible_by: int = 128  # padded size is TP-independent (see models/builder.py)
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama-3 style scaling factor (None = off)
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool | None = None  # default per arch: gpt2/opt tied, llama untied
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # float32 | bfloat16 | float16
    load: str | None = None  # checkpoint directory to load weights from (required for the teacher)
    # teacher only: accept a checkpoint whose provenance.json records neither training nor an HF import
    # (train_iters 0, hand-made, older than the record); refused by default
    allow_untrained: bool = False
    # teacher only: a directory written by `mgsr cache-teacher` (training/teacher_cache.py); ground-truth
    # batches take the teacher's top-K distribution from it instead of a teacher forward
    cache: str | None = None
    # activation recomputation, as Megatron's TransformerConfig names it (student only; the teacher
    # runs forward-only): granularity None | full | selective (Megatron's default modules: core_attn);
    # method uniform | block and num_layers with full only
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    seed: int = 1234
    distributed_timeout_minutes: int = 10
    rendezvous_timeout_seconds: int = 300  # non-zero ranks give up (naming host:port) if the master never answers


@dataclass
class DataConfig:
    train_path: str | None = None  # JSONL or preprocessed prefix
    valid_path: str | None = None
    format: Literal["auto", "dolly", "alpaca", "prompt_response", "messages"] = "auto"
    tokenizer: str | None = None  # SentencePiece .model or HF tokenizer directory
    prompt_template: str = "{instruction}\n\n{input}\n\n### Response:\n"
    max_prompt_length: int = 256
    max_length: int = 512
    overlong_policy: Literal["drop", "truncate"] = "drop"  # drop | truncate
    span_extractor: str = "phrase"  # phrase | nltk | window:N | word
    valid_fraction: float = 0.05
    split_seed: int = 1234
    skip_bad_lines: bool = False


@dataclass
class MGSRConfig:
    w_sft: float = 1.0
    w_dac: float = 1.0
    w_span: float = 1.0
    temperature: float = 1.0
    # DAC-KL (method.md §2)
    dac_mode: Literal["learned", "fixed", "off"] = "learned"  # learned | fixed | off
    # the token-level divergence when dac_mode is off (the baselines: GKD uses jsd with beta 0.5)
    kd_divergence: Literal["forward_kl", "reverse_kl", "symmetric_kl", "jsd", "tvd", "skew_forward_kl",
                           "skew_reverse_kl"] = "forward_kl"
    kd_beta: float = 0.5  # JSD's beta (GKD)
    kd_alpha: float = 0.1  # skew KL's alpha (DistiLLM)
    band_norm: Literal["tail_bucket", "renormalize"] = "tail_bucket"  # tail_bucket | renormalize
    k_feat: int = 64
    k_band: int = 256
    rho: float = 0.8
    kappa: float = 0.01
    clipnet_hidden: int = 128
    fixed_l: float = 0.0
    fixed_u: float = 0.95
    # span loss (method.md §3)
    span_distance: Literal["kl_normalised", "l1", "l2"] = "kl_normalised"  # kl_normalised | l1 | l2
    # SCRG (method.md §1)
    scrg_rounds: int = 1
    scrg_divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"  # forward_kl | reverse_kl | jsd
    scrg_delta: float = 0.0
    scrg_teacher_token: Literal["greedy", "sampled"] = "greedy"  # greedy | sampled
    # the training step reuses the teacher logits of SCRG's last detection pass for rows the correction
    # left unchanged (docs/generation.md); false: one teacher forward over every generated row, as before
    reuse_scrg_teacher_logits: bool = True
    max_new_tokens: int = 256
    # micro-batches generated in one call (SCRG or the teacher's samples); 0: all of the step's on this DP
    # rank. Decoding reads the weights once per token for every row of a call; the planner counts the
    # KV caches and logits of that many rows
    generation_micro_batches: int = 0
    # data schedule
    data_schedule: Literal["off_policy", "on_policy", "ground_truth", "seqkd"] = "off_policy"
    replay_capacity: int = 1000
    init_threshold: float = 0.0
    loss_eps: float = 0.1
    on_policy_lambda: float = 0.5
    sft_on_generated: bool = False
    sft_warmup_iters: int = 0  # warm start: the first N steps train on ground truth only (no generation)
    loss_chunk_tokens: int = 1024


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False  # Megatron's DistributedOptimizer (main weights + Adam sharded over DP)
    grad_reduce_in_fp32: bool = True  # DDP gradient buffer and DP reduction in fp32 (bf16/fp16 students)
    overlap_grad_reduce: bool = False  # overlap the DP gradient reduction with the backward pass
    overlap_param_gather: bool = False  # distributed optimizer: overlap the parameter all-gather with forward
    # fp16 loss scaling (Megatron's names): a constant loss_scale, or dynamic from initial_loss_scale
    loss_scale: float | None = None
    initial_loss_scale: float | None = None
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2


@dataclass
class ScheduleConfig:
    train_iters: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 2
    seq_length: int = 512
    lr_warmup_iters: int = 10
    lr_decay_style: Literal["cosine", "constant"] = "cosine"
    eval_interval: int = 50  # validation loss (+ ROUGE-L on eval_prompts) every N steps; 0 = off
    eval_iters: int = 10  # validation micro-batches per evaluation
    eval_prompts: int = 64  # held-out prompts generated and scored (ROUGE-L, EM) per evaluation; 0 = off
    eval_max_new_tokens: int = 64
    max_nan_steps: int = 5


@dataclass
class CheckpointConfig:
    save: str | None = None
    save_interval: int = 100
    resume: str = "none"  # none | auto | <path>
    keep_last: int = 2
    verify: bool = False  # --verify-checkpoint: check every loaded file's SHA-256 against its manifest.json


@dataclass
class LoggingConfig:
    log_interval: int = 10
    output_dir: str = "runs/default"
    tensorboard: bool = True
    progress_bar: bool = True
    # per-phase step times (metrics time/<phase>, tools/bench_step.py): synchronises the device at every
    # phase boundary and in the loss backward, which costs overlap on GPU, so off unless asked for
    time_phases: bool = False


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine (mgsr_megatron/deepspeed_engine/): Hugging Face teacher/student directories in
    teacher.load / student.load, data parallel under ZeRO. `mgsr train --deepspeed ds.json` sets enabled
    and config_json."""

    enabled: bool = False  # train with DeepSpeed instead of Megatron-Core
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False  # optimizer states and their update in CPU memory
    offload_params: bool = False  # parameters in CPU memory (zero_stage 3 only; a ZeRO-3 teacher's too)
    cpu_adam: bool = False  # DeepSpeedCPUAdam for offloaded states (compiled once; GPU machines), else torch AdamW
    teacher_zero3: bool = False  # partition the frozen teacher with ZeRO-3 inference (else replicated)
    config_json: str | None = None  # a DeepSpeed JSON: batch sizes, precision, stage must agree with this config
    export_dir: str | None = None  # after training: the student as a Hugging Face directory (safetensors)


@dataclass
class Config:
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(num_layers=4, hidden_size=128))
    student: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mgsr: MGSRConfig = field(default_factory=MGSRConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    @property
    def needs_teacher(self) -> bool:
        """Whether training loads the teacher: a KD term (DAC-KL or span) is on, or rows are generated."""
        return bool(self.mgsr.w_dac or self.mgsr.w_span or self.mgsr.data_schedule != "ground_truth")

    @property
    def loads_teacher(self) -> bool:
        """Whether training builds the teacher model: it is needed, and not every teacher distribution comes
        from teacher.cache (generating schedules still need the online teacher)."""
        return self.needs_teacher and not (self.teacher.cache and self.mgsr.data_schedule == "ground_truth")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Megatron-LM's familiar flags, mapped onto config keys.
MEGATRON_FLAGS = {
    "--tensor-model-parallel-size": "parallel.tensor_model_parallel_size",
    "--pipeline-model-parallel-size": "parallel.pipeline_model_parallel_size",
}


# Flags that take no value and set a boolean key.
SWITCH_FLAGS = {"--verify-checkpoint": "checkpoint.verify"}


def _coerce(value, annotation, key: str):
    """Check `value` against a field annotation (int|None, float, str, bool); ints are valid floats."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal or annotation is FamilyName:
        choices = family_names() if annotation is FamilyName else typing.get_args(annotation)
        if value not in choices or isinstance(value, bool):
            raise UserError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise UserError(f"config key '{key}': expected true/false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise UserError(f"config key '{key}': expected {annotation.__name__}, got {value!r}")
    return value


def _section_types(cls) -> dict:
    return typing.get_type_hints(cls)


def apply_dict(cfg: Config, data: dict, source: str) -> None:
    """Apply a nested mapping {section: {field: value}} to `cfg`, validating every key."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    sections = _section_types(Config)
    for section_name, values in data.items():
        if section_name not in sections:
            raise UserError(f"{source}: unknown config section '{section_name}' "
                            f"(known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise UserError(f"{source}: section '{section_name}' must be a mapping")
        section = getattr(cfg, section_name)
        fields = _section_types(type(section))
        for name, value in values.items():
            key = f"{section_name}.{name}"
            if name not in fields:
                raise UserError(f"{source}: unknown config key '{key}'")
            setattr(section, name, _coerce(value, fields[name], f"{source}: {key}" if source else key))


def parse_overrides(argv: list[str]) -> dict:
    """['--a.b=1', '--c.d', 'x', '--tensor-model-parallel-size', '2'] -> {'a': {'b': 1}, 'c': {'d': 'x'}, ...}."""
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in SWITCH_FLAGS:  # a flag without a value
            section, _, fieldname = SWITCH_FLAGS[arg].partition(".")
            out.setdefault(section, {})[fieldname] = True
            i += 1
            continue
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}' (overrides look like --section.field=value)")
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"flag '{arg}' needs a value")
            raw = argv[i + 1]
            i += 1
        i += 1
        key = MEGATRON_FLAGS.get("--" + name, name)
        if "." not in key:
            raise UserError(f"unknown flag '--{name}' (overrides look like --section.field=value)")
        section, _, fieldname = key.partition(".")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.setdefault(section, {})[fieldname] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        apply_dict(cfg, data, str(path))
    if overrides:
        apply_dict(cfg, parse_overrides(overrides), "command line")
    return cfg


# --------------------------------------------------------------------------------------------------
# Whole-config validation: called by train, plan, generate and eval right after load_config, before
# any process group, data or model exists. Enum fields are `Literal` types (and `arch`, a registered
# FamilyName) checked by `_coerce`.

def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _at_least(cfg, key: str, minimum, optional: bool = False) -> None:
    section, _, name = key.partition(".")
    value = getattr(getattr(cfg, section), name)
    if value is None and optional:
        return
    _check(value is not None and value >= minimum, f"config key '{key}': must be >= {minimum}, got {value!r}")


def _in_range(cfg, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    section, _, name = key.partition(".")
    value = getattr(getattr(cfg, section), name)
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    _check(ok, f"config key '{key}': must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
               f", got {value!r}")


def check_apart_from_models(cfg: Config, key: str, output: str) -> None:
    """An output directory (config `key`) may not equal, contain or lie inside teacher.load or
    student.load: writing there would overwrite or mix with a model's files."""
    out = Path(output).resolve()
    for name in ("teacher", "student"):
        load = getattr(cfg, name).load
        if load:
            source = Path(load).resolve()
            _check(not (out == source or source.is_relative_to(out) or out.is_relative_to(source)),
                   f"{key}={output} overlaps {name}.load={load}: writing there would overwrite or mix with "
                   f"the {name}'s files; choose another directory")


def validate(cfg: Config) -> Config:
    """Every setting that can be checked without files or processes: positive sizes, ranges,
    divisibility, batch layout, paths that must not overlap. Raises UserError naming the key."""
    for name in ("teacher", "student"):
        model = getattr(cfg, name)
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings",
                    "make_vocab_size_divisible_by"):
            _at_least(cfg, f"{name}.{key}", 1)
        for key in ("ffn_hidden_size", "num_query_groups", "kv_channels"):
            _at_least(cfg, f"{name}.{key}", 1, optional=True)
        _in_range(cfg, f"{name}.norm_epsilon", 0.0, 1.0, low_open=True)
        _in_range(cfg, f"{name}.rope_theta", 0.0, float("inf"), low_open=True)
        if model.kv_channels is None:
            _check(model.hidden_size % model.num_attention_heads == 0,
                   f"{name}.hidden_size={model.hidden_size} is not divisible by "
                   f"{name}.num_attention_heads={model.num_attention_heads}")
        _check(model.arch in family_names(),
               f"config key '{name}.arch': {model.arch!r} is not one of {', '.join(family_names())}")
        from mgsr_megatron.architectures import get_family

        get_family(model.arch).check_config(model, name)  # the family's own checks (llama: rope head dim)
        if model.num_query_groups is not None:
            _check(model.num_attention_heads % model.num_query_groups == 0,
                   f"{name}.num_attention_heads={model.num_attention_heads} is not divisible by "
                   f"{name}.num_query_groups={model.num_query_groups}")
    for key in ("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                "parallel.distributed_timeout_minutes", "parallel.rendezvous_timeout_seconds",
                "schedule.global_batch_size", "schedule.micro_batch_size", "schedule.seq_length",
                "schedule.eval_max_new_tokens", "data.max_prompt_length", "data.max_length",
                "mgsr.k_feat", "mgsr.k_band", "mgsr.clipnet_hidden", "mgsr.max_new_tokens",
                "mgsr.loss_chunk_tokens", "logging.log_interval"):
        _at_least(cfg, key, 1)
    for key in ("schedule.train_iters", "schedule.lr_warmup_iters", "schedule.eval_interval",
                "schedule.eval_iters", "schedule.eval_prompts", "schedule.max_nan_steps",
                "checkpoint.save_interval", "checkpoint.keep_last", "mgsr.scrg_rounds", "mgsr.replay_capacity",
                "mgsr.generation_micro_batches",
                "mgsr.sft_warmup_iters", "mgsr.w_sft", "mgsr.w_dac", "mgsr.w_span", "mgsr.kappa",
                "optimizer.lr", "optimizer.min_lr", "optimizer.weight_decay", "optimizer.clip_grad"):
        _at_least(cfg, key, 0)
    sched = cfg.schedule
    _check(sched.global_batch_size % sched.micro_batch_size == 0,
           f"schedule.global_batch_size={sched.global_batch_size} is not a multiple of "
           f"schedule.micro_batch_size={sched.micro_batch_size}")
    _check(cfg.data.max_prompt_length <= cfg.data.max_length,
           f"data.max_prompt_length={cfg.data.max_prompt_length} exceeds data.max_length={cfg.data.max_length}")
    _in_range(cfg, "data.valid_fraction", 0.0, 1.0, high_open=True)
    extractor = cfg.data.span_extractor
    if extractor.startswith("window:"):
        size = extractor.partition(":")[2]
        _check(size.isdigit() and int(size) >= 1,
               f"config key 'data.span_extractor': window size must be an integer >= 1, got {extractor!r}")
    else:
        _check(extractor in ("phrase", "nltk", "word"),
               f"config key 'data.span_extractor': {extractor!r} is not one of phrase, nltk, word, window:N")
    _in_range(cfg, "mgsr.temperature", 0.0, float("inf"), low_open=True)
    _in_range(cfg, "mgsr.rho", 0.0, 1.0, low_open=True)
    _in_range(cfg, "mgsr.fixed_l", 0.0, 1.0)
    _in_range(cfg, "mgsr.fixed_u", 0.0, 1.0)
    _check(cfg.mgsr.fixed_l < cfg.mgsr.fixed_u,
           f"mgsr.fixed_l={cfg.mgsr.fixed_l} must be below mgsr.fixed_u={cfg.mgsr.fixed_u}")
    _in_range(cfg, "mgsr.on_policy_lambda", 0.0, 1.0)
    _in_range(cfg, "mgsr.kd_beta", 0.0, 1.0)
    _in_range(cfg, "mgsr.kd_alpha", 0.0, 1.0)
    _in_range(cfg, "optimizer.adam_beta1", 0.0, 1.0, high_open=True)
    _in_range(cfg, "optimizer.adam_beta2", 0.0, 1.0, high_open=True)
    _in_range(cfg, "optimizer.adam_eps", 0.0, 1.0, low_open=True)
    _check(bool(cfg.checkpoint.resume), "config key 'checkpoint.resume': expected none, auto or a directory")
    if cfg.checkpoint.save:
        check_apart_from_models(cfg, "checkpoint.save", cfg.checkpoint.save)
    if cfg.deepspeed.enabled:  # the DeepSpeed engine's own rules (TP=PP=1, HF directories, its JSON, ...)
        from mgsr_megatron.deepspeed_engine.settings import validate_settings

        validate_settings(cfg)
    # the manifest, before any model; the deepspeed engine checks it in resolve_models, where its data.tokenizer
    # (possibly the student directory's) is known
    if (cfg.teacher.cache is not None or cfg.student.cache is not None) and not cfg.deepspeed.enabled:
        from mgsr_megatron.training.teacher_cache import check_cache_config

        check_cache_config(cfg)
    return cfg


def check_batch_layout(cfg: Config, dp_size: int, micro_batch: int | None = None,
                       models: tuple[str, ...] = ("teacher", "student")) -> int:
    """The batch layout checks a training launch makes, shared by the trainer and `mgsr plan`: the global
    batch splits into micro-batches of `micro_batch` (default schedule.micro_batch_size) over `dp_size`
    data-parallel ranks, and schedule.seq_length fits each of `models` (config sections, checked in that
    order). Returns the number of micro-batches per step on each DP rank."""
    sched = cfg.schedule
    b = sched.micro_batch_size if micro_batch is None else micro_batch
    per_step = b * dp_size
    _check(sched.global_batch_size % per_step == 0,
           f"schedule.global_batch_size={sched.global_batch_size} is not a multiple of "
           f"micro_batch_size*DP = {b}*{dp_size} = {per_step}")
    for name in models:
        limit = getattr(cfg, name).max_position_embeddings
        _check(sched.seq_length <= limit,
               f"schedule.seq_length={sched.seq_length} exceeds {name}.max_position_embeddings={limit}")
    return sched.global_batch_size // per_step


def generation_groups(num_micro: int, per_call: int) -> list[range]:
    """The step's micro-batches (0..num_micro-1) in consecutive groups of `per_call`, one generation call
    each (mgsr.generation_micro_batches; 0: one group of all)."""
    per_call = per_call or num_micro
    return [range(start, min(start + per_call, num_micro)) for start in range(0, num_micro, per_call)]
