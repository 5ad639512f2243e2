"""`mgsr demo`: the main job on the embedded default, on 2 CPU cores with no downloads.

  1. (one process) build the embedded instruction corpus, train a SentencePiece tokenizer on it and
     preprocess it into Megatron indexed files: all rows for the teacher; for the students a small
     labelled subset plus the remaining rows as prompts without responses;
  2. (torchrun, 2 processes) train the teacher (data parallel; reused by a later demo with the same
     settings, keyed by their hash); let it answer the prompts without responses once (greedy: SeqKD's
     data, made once instead of on every step) and write its top-K distributions over the labelled and
     teacher-labelled rows (`mgsr cache-teacher`'s cache: ground-truth steps run no teacher forward);
     then, for every training seed, the students from the same initialisation with the same number of
     steps: plain SFT on the labelled subset (the baseline: it has no teacher) and MGSR (SFT + DAC-KL +
     span on the labelled and teacher-labelled rows, SCRG samples on all prompts after a warm start)
     data parallel over the processes (DP=2: on 2 cores the fastest layout, SCRG's decode passes
     need no collectives; the same code runs the students at any TP/PP, tests/dist);
  3. evaluate teacher and students on held-out prompts (ROUGE-L, exact match; overall and per task
     family; each student's score is the mean over sampling seeds, reported as the mean and spread over
     training seeds), print a table, write `demo_report.json` and a plot.

With `--ablation` it also trains the baselines and the paper's component ladder at the same steps:
SeqKD with the teacher sampling on every step, SFT on the teacher's labels (offline SeqKD), KD (forward
KL), GKD (on-policy JSD), + DAC-KL, + span, on-policy without SCRG, + SCRG = MGSR.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

from mgsr_megatron.config import Config, ModelConfig, apply_dict, parse_overrides
from mgsr_megatron.data.demo_corpus import FAMILIES
from mgsr_megatron.errors import UserError

DEMO_TEMPLATE = "{instruction}\n"


def default_config(output_dir: Path) -> Config:
    """The embedded default: sizes measured to fit the 10-minute budget on 2 cores."""
    cfg = Config()
    cfg.teacher = ModelConfig(arch="llama", num_layers=4, hidden_size=256, num_attention_heads=4,
                              vocab_size=512, max_position_embeddings=64)
    cfg.student = ModelConfig(arch="llama", num_layers=2, hidden_size=128, num_attention_heads=4,
                              vocab_size=512, max_position_embeddings=64)
    cfg.parallel.tensor_model_parallel_size = 1
    data = output_dir / "data"
    cfg.data.tokenizer = str(data / "tokenizer.model")
    cfg.data.train_path = str(data / "student.train")
    cfg.data.format = "prompt_response"
    cfg.data.prompt_template = DEMO_TEMPLATE
    cfg.data.max_prompt_length = 24
    cfg.data.max_length = 40
    cfg.schedule.seq_length = 40
    cfg.schedule.micro_batch_size = 16  # run_pipeline: global batch / DP, one generation call per SCRG step
    cfg.schedule.global_batch_size = 32
    # 600 steps: at 200 (and 400) the student is step-limited and SFT on all 4,000 labels scores BELOW
    # SFT on the 400 labelled rows, so no teacher can pay through the other prompts (docs/quality.md §8)
    cfg.schedule.train_iters = 600
    cfg.schedule.lr_warmup_iters = 20
    cfg.schedule.eval_interval = 0
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.min_lr = 3e-4
    cfg.optimizer.weight_decay = 0.0
    cfg.mgsr.max_new_tokens = 16
    cfg.mgsr.data_schedule = "on_policy"
    cfg.mgsr.on_policy_lambda = 0.25  # SCRG steps cost ~6 ground-truth steps on 2 cores
    cfg.mgsr.k_band = 64
    cfg.mgsr.k_feat = 32
    cfg.logging.progress_bar = True
    cfg.logging.log_interval = 50
    cfg.logging.tensorboard = True
    cfg.checkpoint.save_interval = 0
    cfg.checkpoint.keep_last = 1
    return cfg


# The teacher recipe was measured (docs/quality.md): lr 3e-3 left the 4x256 teacher barely better than a
# student trained on a tenth of its data; lr 1e-3 for 600 steps gives it something to teach.
DEMO_SETTINGS = {"teacher_iters": 600, "teacher_lr": 1e-3, "teacher_min_lr": 1e-4, "labelled_fraction": 0.05,
                 "n_train": 4000, "n_eval": 240, "eval_seeds": (10, 20, 30), "eval_max_new_tokens": 16,
                 "train_seeds": (1, 2), "families": FAMILIES, "teacher_cache": True,
                 "students": None}


# ----------------------------------------------------------------------------------------- step 1
def prepare_data(out: Path, settings: dict) -> None:
    """Corpus, tokenizer and indexed files (single process; skipped when already complete)."""
    from mgsr_megatron.config import DataConfig
    from mgsr_megatron.data.demo_corpus import write_demo_corpus
    from mgsr_megatron.data.preprocess import PreprocessOptions, preprocess

    data = out / "data"
    key = json.dumps({k: list(settings[k]) if k == "families" else settings[k]
                      for k in ("n_train", "n_eval", "labelled_fraction", "families")}, sort_keys=True)
    if (data / "student.train.json").is_file() and (data / "teacher.train.json").is_file() \
            and (data / "key.json").is_file() and (data / "key.json").read_text() == key:
        return
    paths = write_demo_corpus(data / "corpus", n_train=settings["n_train"], n_eval=settings["n_eval"],
                              labelled_fraction=settings["labelled_fraction"], families=tuple(settings["families"]))
    _train_tokenizer(paths["train"], data / "tokenizer.model")
    data_cfg = DataConfig(format="prompt_response", prompt_template=DEMO_TEMPLATE, max_prompt_length=24,
                          max_length=40, valid_fraction=0.0)
    tokenizer = str(data / "tokenizer.model")
    quiet = PreprocessOptions(workers=1, progress=False)
    preprocess([paths["train"]], str(data / "teacher"), tokenizer, data_cfg, options=quiet)
    preprocess([paths["train_labelled"], paths["train_prompts"]], str(data / "student"), tokenizer, data_cfg,
               prompts_only=True, options=quiet)
    (data / "key.json").write_text(key)


def _train_tokenizer(corpus: Path, model_path: Path) -> None:
    import subprocess

    tool = Path(__file__).resolve().parent.parent / "tools" / "train_tokenizer.py"
    subprocess.run([sys.executable, str(tool), "--input", str(corpus), "--output", str(model_path),
                    "--vocab-size", "512"], check=True, stdout=subprocess.DEVNULL)


# ----------------------------------------------------------------------------------------- step 2/3
def _variant(base: Config, out: Path, name: str, **mgsr) -> Config:
    cfg = copy.deepcopy(base)
    for key, value in mgsr.items():
        setattr(cfg.mgsr, key, value)
    cfg.logging.output_dir = str(out / name)
    cfg.checkpoint.save = str(out / name / "checkpoints")
    return cfg


SFT = dict(w_dac=0.0, w_span=0.0, data_schedule="ground_truth")
# The component ladder of the paper's ablation plus the baselines of its peers; every variant trains
# for the same steps from the same initialisation (per training seed). The ladder starts from the
# teacher's labels of the unlabelled prompts (SeqKD's data made once) and adds one part at a time.
ABLATION = {
    "seqkd_online": dict(data_schedule="seqkd", dac_mode="off", w_span=0.0),  # teacher samples every step
    "teacher_labels_sft": SFT,  # SFT on the labelled rows + the teacher's greedy answers (offline SeqKD)
    "kd_forward_kl": dict(data_schedule="ground_truth", dac_mode="off", w_span=0.0),
    "gkd_jsd": dict(data_schedule="on_policy", scrg_rounds=0, dac_mode="off", kd_divergence="jsd", kd_beta=0.5,
                    w_span=0.0),
    "kd_dac_kl": dict(data_schedule="ground_truth", w_span=0.0),
    "kd_dac_kl_span": dict(data_schedule="ground_truth"),
    "on_policy_no_scrg": dict(scrg_rounds=0),  # MGSR's sampling without the teacher's correction
}
ABLATION_ORDER = ("sft_student", "seqkd_online", "teacher_labels_sft", "kd_forward_kl", "gkd_jsd", "kd_dac_kl",
                  "kd_dac_kl_span", "on_policy_no_scrg", "mgsr_student")


def student_variants(base: Config, out: Path, ablation: bool, distill_data: Path, teacher_cache: Path | None,
                     only: tuple[str, ...] | None = None):
    """Every student of the run, {name: Config}. SFT has no teacher: it trains on the labelled rows alone.
    Every student with a teacher trains on `distill_data` (the labelled rows plus the teacher's answers to
    the other prompts, label_prompts) and reads the teacher's distributions on those rows from
    `teacher_cache` where its loss allows (DAC-KL's top-K band; the full-vocabulary divergences run the
    teacher); the online SeqKD baseline samples the teacher on every step instead. `only`: a subset of the
    names (mgsr demo --students)."""
    names = {"sft_student": SFT, "mgsr_student": {}}
    if ablation:
        names.update(ABLATION)
    variants = {}
    for name in (n for n in ABLATION_ORDER if n in names and (only is None or n in only)):
        cfg = variants[name] = _variant(base, out, name, **names[name])
        if name == "sft_student":
            continue
        cfg.data.train_path = str(distill_data)
        if teacher_cache is not None and cfg.mgsr.dac_mode != "off" and cfg.mgsr.data_schedule != "seqkd" \
                and (cfg.mgsr.w_dac or cfg.mgsr.w_span):
            cfg.teacher.cache = str(teacher_cache)
    return variants


def _params(model) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    count = torch.tensor(float(sum(p.numel() for p in model.parameters())))
    dist.all_reduce(count, group=parallel_state.get_model_parallel_group())
    return int(count.item())


def _train_and_evaluate(cfg: Config, eval_items, tokenizer, settings: dict) -> dict:
    from mgsr_megatron.evaluation.evaluate import evaluate
    from mgsr_megatron.training.run import train

    start = time.time()
    _, trainer = train(cfg)
    seconds = time.time() - start
    result = evaluate(trainer.student, eval_items, tokenizer, vocab_size=cfg.student.vocab_size,
                      max_new_tokens=settings["eval_max_new_tokens"], seeds=settings["eval_seeds"])
    result.update(params=_params(trainer.student), train_seconds=round(seconds, 1),
                  eval_seconds=round(time.time() - start - seconds, 1), steps=cfg.schedule.train_iters)
    return result


def over_training_seeds(runs: list[dict]) -> dict:
    """One model's result over training seeds: the mean of every score, `*_std` = the spread (population
    standard deviation) over the training seeds, `eval_*_std` = the mean spread over evaluation seeds."""
    import statistics

    scores = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not k.endswith("_std")]
    result = {k: statistics.fmean(run[k] for run in runs) for k in scores}
    for key in ("rouge_l", "exact_match"):
        result[f"{key}_std"] = statistics.pstdev(run[key] for run in runs) if len(runs) > 1 else 0.0
        result[f"eval_{key}_std"] = statistics.fmean(run[f"{key}_std"] for run in runs)
    result.update(params=runs[0]["params"], train_seeds=len(runs), examples=runs[0].get("examples", {}),
                  per_seed=[{k: run[k] for k in ("train_seed", "rouge_l", "exact_match", "train_seconds")}
                            for run in runs])
    return result


def teacher_key(base: Config, settings: dict) -> str:
    """What the teacher's checkpoint depends on: a later demo with the same key reuses it."""
    import dataclasses
    import hashlib

    keys = ("teacher_iters", "teacher_lr", "teacher_min_lr", "n_train", "n_eval", "families")
    payload = {"model": dataclasses.asdict(base.teacher), "settings": {k: str(settings[k]) for k in keys},
               "schedule": [base.schedule.global_batch_size, base.schedule.seq_length, base.parallel.seed]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train_teacher(base: Config, out: Path, settings: dict, eval_items, tokenizer) -> tuple[Path, dict]:
    """The teacher's checkpoint and evaluation: trained (DP over every rank), or reused when
    `teacher/key.json` records the same settings (the first demo pays for it, later ones do not)."""
    import torch.distributed as dist

    teacher_cfg = _variant(base, out, "teacher", **SFT)
    teacher_cfg.student = copy.deepcopy(base.teacher)  # the teacher is trained as a "student" of SFT
    teacher_cfg.data.train_path = str(out / "data" / "teacher.train")
    teacher_cfg.parallel.tensor_model_parallel_size = 1  # data parallel: the fastest layout on 2 cores
    teacher_cfg.schedule.micro_batch_size = max(1, base.schedule.global_batch_size // dist.get_world_size())
    teacher_cfg.schedule.train_iters = settings["teacher_iters"]
    teacher_cfg.optimizer.lr, teacher_cfg.optimizer.min_lr = settings["teacher_lr"], settings["teacher_min_lr"]
    record = out / "teacher" / "key.json"
    key = teacher_key(base, settings)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") == key and (Path(teacher_cfg.checkpoint.save) / "latest").exists():
            return Path(teacher_cfg.checkpoint.save), dict(saved["result"], reused=True)
    result = _train_and_evaluate(teacher_cfg, eval_items, tokenizer, settings)
    if dist.get_rank() == 0:
        tmp = record.with_suffix(".partial")
        tmp.write_text(json.dumps({"key": key, "result": result}))
        tmp.replace(record)
    dist.barrier()
    return Path(teacher_cfg.checkpoint.save), result


def label_prompts(base: Config, out: Path, teacher_dir: Path, tokenizer) -> Path:
    """The students' distillation data: the labelled rows plus, for every prompt without a response, the
    teacher's greedy answer (SeqKD's data, generated once, not on every step), preprocessed as
    `data/distill.train`. Reused while `data/distill_key.json` holds the teacher's key. Collective."""
    import torch.distributed as dist

    from mgsr_megatron.data.indexed import PromptDataset
    from mgsr_megatron.data.preprocess import PreprocessOptions, preprocess
    from mgsr_megatron.evaluation.evaluate import answers_per_seed
    from mgsr_megatron.generation import SamplingOptions
    from mgsr_megatron.inference import load_inference_model
    from mgsr_megatron.models.checkpoint import read_model_config, resolve_checkpoint

    data = out / "data"
    prefix, record = data / "distill", data / "distill_key.json"
    key = (out / "teacher" / "key.json").read_text()
    if record.is_file() and record.read_text() == key and Path(f"{prefix}.train.json").is_file():
        return Path(f"{prefix}.train")
    corpus = data / "corpus"
    prompts = PromptDataset.from_jsonl(corpus / "train_prompts.jsonl", tokenizer, base.data)
    directory = resolve_checkpoint(teacher_dir)
    teacher = load_inference_model(base, directory, read_model_config(directory))
    greedy = SamplingOptions(max_new_tokens=base.mgsr.max_new_tokens, eos_id=tokenizer.eos_id, greedy=True)
    answers = answers_per_seed(teacher, prompts, tokenizer, [greedy], vocab_size=base.teacher.vocab_size,
                               batch_size=64)[0]
    del teacher
    if dist.get_rank() == 0:
        raw = [json.loads(line) for line in (corpus / "train_prompts.jsonl").read_text().splitlines()]
        labelled = (corpus / "train_labelled.jsonl").read_text().splitlines()
        rows = [json.dumps(dict(row, response=answers[i].strip())) for i, row in enumerate(raw) if answers[i].strip()]
        (corpus / "train_teacher_labels.jsonl").write_text("\n".join(labelled + rows) + "\n")
        print(f"teacher labels: {len(rows)} of {len(raw)} prompts answered (greedy; empty answers left out)")
        data_cfg = copy.deepcopy(base.data)
        data_cfg.valid_fraction = 0.0
        preprocess([corpus / "train_teacher_labels.jsonl"], str(prefix), base.data.tokenizer, data_cfg,
                   options=PreprocessOptions(workers=1, progress=False))
        record.write_text(key)
    dist.barrier()
    return Path(f"{prefix}.train")


def cache_teacher(base: Config, out: Path, teacher_dir: Path, distill_data: Path) -> Path:
    """The teacher's top-K distributions over `distill_data`, written once (training/teacher_cache.py) so
    that the students' ground-truth steps run no teacher forward. Reused while the cache's manifest
    matches (the same teacher checkpoint, data and tokenizer: check_cache_config). Collective."""
    from mgsr_megatron.training.teacher_cache import check_cache_config, needed_k, teacher_fingerprint, write_cache

    cfg = copy.deepcopy(base)
    cfg.teacher.load = str(teacher_dir)
    cfg.data.train_path = str(distill_data)
    cfg.mgsr.data_schedule = "ground_truth"
    directory = out / "data" / "distill_cache"
    cfg.teacher.cache = str(directory)
    try:
        manifest = check_cache_config(cfg)
        if manifest.get("teacher") == teacher_fingerprint(str(teacher_dir)):
            return directory
    except UserError:
        pass  # absent or written for something else: write it again
    write_cache(cfg, directory, top_k=needed_k(cfg.mgsr))
    return directory


def run_pipeline(base: Config, out: Path, settings: dict, ablation: bool) -> dict:
    import torch.distributed as dist

    from mgsr_megatron import parallel
    from mgsr_megatron.data.indexed import PromptDataset
    from mgsr_megatron.data.tokenizer import load_tokenizer

    started = time.time()
    parallel.init_distributed()
    rank0 = dist.get_rank() == 0
    tokenizer = load_tokenizer(base.data.tokenizer)
    eval_items = PromptDataset.from_jsonl(out / "data" / "corpus" / "eval.jsonl", tokenizer, base.data)

    teacher_dir, teacher_result = train_teacher(base, out, settings, eval_items, tokenizer)
    report = {"teacher": teacher_result}
    distill_data = label_prompts(base, out, teacher_dir, tokenizer)
    teacher_cache = cache_teacher(base, out, teacher_dir, distill_data) if settings["teacher_cache"] else None
    base = copy.deepcopy(base)
    base.teacher.load = str(teacher_dir)
    base.schedule.micro_batch_size = max(1, base.schedule.global_batch_size // dist.get_world_size())
    runs: dict[str, list[dict]] = {}
    for seed in settings["train_seeds"]:
        seeded = copy.deepcopy(base)
        seeded.parallel.seed = seed  # the student's initialisation, data order and sampling noise
        for name, cfg in student_variants(seeded, out / f"seed{seed}", ablation, distill_data,
                                          teacher_cache, settings["students"]).items():
            runs.setdefault(name, []).append(dict(_train_and_evaluate(cfg, eval_items, tokenizer, settings),
                                                  train_seed=seed))
    report.update({name: over_training_seeds(results) for name, results in runs.items()})
    report["seconds"] = round(time.time() - started, 1)
    report["layout"] = {"teacher": f"DP={dist.get_world_size()}",
                        "students": f"DP={dist.get_world_size()}"}
    report["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    if ablation:
        report["ablation"] = {name: {k: report[name][k] for k in ("rouge_l", "rouge_l_std", "exact_match",
                                                                  "exact_match_std", "train_seconds")}
                              for name in ABLATION_ORDER if name in report}
    if rank0:
        write_report(report, out, first_seed=settings["train_seeds"][0])
    parallel.destroy()
    return report


def write_report(report: dict, out: Path, first_seed: int) -> None:
    families = sorted(k.split("/", 1)[1] for k in report["teacher"] if k.startswith("rouge_l/"))
    models = [k for k in report if isinstance(report[k], dict) and "rouge_l" in report[k] and k != "ablation"]
    lines = [f"{'model':<18}{'params':>10}{'ROUGE-L':>9}{'+-':>6}{'EM':>7}{'+-':>6}{'train s':>9}  "
             + "  ".join(f"{f[:10]:>10}" for f in families)]
    for name in models:
        r = report[name]
        lines.append(f"{name:<18}{r['params']:>10,}{r['rouge_l']:>9.1f}{r['rouge_l_std']:>6.1f}"
                     f"{r['exact_match']:>7.1f}{r['exact_match_std']:>6.1f}{r['train_seconds']:>9.0f}  "
                     + "  ".join(f"{r['rouge_l/' + f]:>10.1f}" for f in families))
    table = "\n".join(lines)
    seeds = report["settings"]
    print("\n" + table + f"\n(students: mean and spread over training seeds {seeds['train_seeds']}, each "
          f"scored as the mean over sampling seeds {seeds['eval_seeds']}; teacher: spread over sampling seeds; "
          f"ROUGE-L per family on the right; total {report['seconds']:.0f} s)")
    (out / "demo_table.txt").write_text(table + "\n")
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    try:
        from mgsr_megatron.plotting import plot_runs

        plot_runs({name: out / f"seed{first_seed}" / name / "metrics.jsonl" for name in models if name != "teacher"},
                  out / "demo_curves.png")
    except ImportError:
        pass
    print(f"wrote {out / 'demo_report.json'}")


def run_demo(args, overrides: list[str]) -> None:
    from mgsr_megatron import launch

    out = Path(args.output_dir).resolve()
    settings = dict(DEMO_SETTINGS)
    if args.quick:
        settings.update(teacher_iters=60, n_train=600, n_eval=36, eval_seeds=(10,), labelled_fraction=0.25,
                        train_seeds=(1,))
    for key, value in (("teacher_iters", args.teacher_iters), ("n_eval", args.eval_prompts),
                       ("eval_seeds", tuple(args.seeds) if args.seeds else None),
                       ("train_seeds", tuple(args.train_seeds) if args.train_seeds else None)):
        if value is not None:
            settings[key] = value
    if args.students:
        unknown = sorted(set(args.students) - set(ABLATION_ORDER))
        if unknown:
            raise UserError(f"--students: unknown {', '.join(unknown)} (choose from {', '.join(ABLATION_ORDER)})")
        settings["students"] = tuple(args.students)
        args.ablation = True
    if not launch.already_distributed():
        prepare_data(out, settings)
        if args.nproc > 1:
            sys.exit(launch.relaunch_local(args.nproc, args.argv))
    base = default_config(out)
    if args.quick:
        base.schedule.train_iters = 30
    if args.student_iters:
        base.schedule.train_iters = args.student_iters
    # warm start (docs/quality.md): on-policy samples of a student that cannot answer yet cost it 3 points
    base.mgsr.sft_warmup_iters = base.schedule.train_iters // 2
    if overrides:
        apply_dict(base, parse_overrides(overrides), "command line")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_pipeline(base, out, settings, args.ablation)
