"""Every example config loads, its parallel layout and batch settings work on its stated cluster, the
plan fits there, the sizes are the real Hugging Face ones, and its sbatch script has what SLURM needs."""

import re
from pathlib import Path

import pytest

from mgsr_megatron.config import load_config, validate
from mgsr_megatron.models.builder import resolve
from mgsr_megatron.parallel import validate_layout
from mgsr_megatron.planner import format_plan, plan, stage_params
from mgsr_megatron.training.trainer import validate_batch_layout

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PAIRS = ["gpt2_1.5b_to_0.1b", "opt_6.7b_to_1.3b", "openllama2_7b_to_3b", "llama2_13b_to_7b"]
# parameter counts of the Hugging Face checkpoints (teacher, student), to 3 significant digits
HF_PARAMS = {"gpt2_1.5b_to_0.1b": (1.56e9, 0.124e9), "opt_6.7b_to_1.3b": (6.66e9, 1.32e9),
             "openllama2_7b_to_3b": (6.74e9, 3.43e9), "llama2_13b_to_7b": (13.0e9, 6.74e9)}
# Hugging Face pairs under the DeepSpeed engine (deepspeed.enabled; model directories are placeholders, the
# config's model fields give the shapes)
HF_PAIRS = {"hf_llama2_13b_to_7b_zero3": "llama2_13b_to_7b"}  # -> the Megatron example of the same models


def stated_cluster(name: str) -> dict:
    text = (EXAMPLES / name / "config.yaml").read_text()
    match = re.search(r"^# cluster: (.*?)\s{2,}|^# cluster: (.*)$", text, re.M)
    fields = (match.group(1) or match.group(2)).split()
    return {k: float(v) if "." in v else int(v) for k, v in (f.split("=") for f in fields)}


def sbatch_script(name: str) -> Path:
    scripts = list((EXAMPLES / name).glob("*.sbatch"))
    assert len(scripts) == 1, scripts
    return scripts[0]


def sbatch_options(name: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", sbatch_script(name).read_text(), re.M))


@pytest.mark.parametrize("name", PAIRS + ["tiny"])
def test_layout_valid_on_stated_cluster(name):
    cfg = load_config(EXAMPLES / name / "config.yaml")
    cluster = stated_cluster(name)
    per_node = cluster["gpus_per_node"] or cluster["cpus_per_node"]
    world = cluster["nodes"] * per_node
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    validate_layout(world, tp, pp, {"student": resolve(cfg.student), "teacher": resolve(cfg.teacher)})
    dp = world // (tp * pp)
    assert validate_batch_layout(cfg, dp) >= 1
    assert cfg.data.max_prompt_length + cfg.mgsr.max_new_tokens <= cfg.schedule.seq_length
    assert cfg.teacher.load, "the teacher checkpoint directory must be set"
    options = sbatch_options(name)
    assert int(options["nodes"]) == cluster["nodes"]
    if cluster["gpus_per_node"]:
        assert int(options["gpus-per-node"]) == cluster["gpus_per_node"]
    else:
        assert "gpus-per-node" not in options and int(options["cpus-per-task"]) == cluster["cpus_per_node"]


@pytest.mark.parametrize("name", PAIRS)
def test_plan_fits_and_sizes_are_the_papers_models(name):
    cfg = load_config(EXAMPLES / name / "config.yaml")
    cluster = stated_cluster(name)
    p = plan(cfg, cluster["nodes"] * cluster["gpus_per_node"], cluster["gpu_memory_gib"])
    assert p.fits(), f"{name} does not fit its stated cluster"
    teacher, student = HF_PARAMS[name]
    assert stage_params(resolve(cfg.teacher), 1, 1, 0) == pytest.approx(teacher, rel=5e-3)
    assert stage_params(resolve(cfg.student), 1, 1, 0) == pytest.approx(student, rel=5e-3)
    assert cfg.teacher.vocab_size == cfg.student.vocab_size


@pytest.mark.parametrize("name", list(HF_PAIRS))
def test_deepspeed_example_validates_and_fits(name):
    """Loads, passes validate() (the DeepSpeed engine's own rules included), and `mgsr plan` fits its stated
    cluster with the Hugging Face models' parameter counts (no weights needed: the directories are placeholders)."""
    cfg = validate(load_config(EXAMPLES / name / "config.yaml"))
    assert cfg.deepspeed.enabled and cfg.mgsr.data_schedule == "ground_truth"
    assert cfg.teacher.load and cfg.student.load and cfg.deepspeed.export_dir
    cluster = stated_cluster(name)
    p = plan(cfg, cluster["nodes"] * cluster["gpus_per_node"], cluster["gpu_memory_gib"])
    assert p.fits(), f"{name} does not fit its stated cluster"
    assert (p.tp, p.pp, p.dp) == (1, 1, cluster["nodes"] * cluster["gpus_per_node"])
    teacher, student = HF_PARAMS[HF_PAIRS[name]]
    assert p.zero.teacher_params == pytest.approx(teacher, rel=5e-3)
    assert p.zero.student_params == pytest.approx(student, rel=5e-3)
    out = format_plan(cfg, p, cluster["nodes"], cluster["gpus_per_node"], name)
    assert "FITS" in out and "ZeRO-1" in out and "CPU memory per node" in out
    options = sbatch_options(name)
    assert int(options["nodes"]) == cluster["nodes"] and int(options["gpus-per-node"]) == cluster["gpus_per_node"]


@pytest.mark.parametrize("name", PAIRS + ["tiny"] + list(HF_PAIRS))
def test_sbatch_script(name):
    text = sbatch_script(name).read_text()
    options = sbatch_options(name)
    assert options["signal"] in ("B:USR1@120", "B:TERM@120")
    assert "requeue" in options and "time" in options and "ntasks-per-node" in options
    assert "source examples/slurm_launch.sh" in text and "mgsr_slurm_train" in text
    assert f"examples/{name}/config.yaml" in text
    launcher = (EXAMPLES / "slurm_launch.sh").read_text()
    for needed in ('scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1', "--rdzv-backend=c10d",
                   '--nnodes="$SLURM_NNODES"', "--resume auto", "scontrol requeue", "SLURM_JOB_ID % 20000",
                   "scancel --signal=USR1"):
        assert needed in launcher, needed
