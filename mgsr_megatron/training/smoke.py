"""A tiny end-to-end training setup for smoke runs (tools/gpu_check.py, the tests): a demo corpus, a
SentencePiece tokenizer of 256 pieces, indexed data, a (non-random) teacher checkpoint, and a config
with every MGSR component on.

    build_files(root); ensure_teacher(root); trainer = build_trainer(base_config(root))
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mgsr_megatron.config import Config, DataConfig, ModelConfig

TEMPLATE = "{instruction}\n"


def tiny_model_config(layers: int, hidden: int) -> ModelConfig:
    return ModelConfig(arch="llama", num_layers=layers, hidden_size=hidden, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=64, vocab_size=256, make_vocab_size_divisible_by=64,
                       max_position_embeddings=48)


def build_files(root: Path) -> None:
    """The corpus, tokenizer (root/tok.model) and indexed rows (root/data.*) under `root`."""
    from mgsr_megatron.data.demo_corpus import build_demo_corpus, write_demo_corpus
    from mgsr_megatron.data.preprocess import PreprocessOptions, preprocess
    from mgsr_megatron.data.tokenizer import train_sentencepiece

    corpus = build_demo_corpus(n_train=240, n_eval=12, labelled_fraction=0.5)
    paths = write_demo_corpus(root / "corpus", n_train=240, n_eval=12, labelled_fraction=0.5)
    texts = [row["prompt"] for row in corpus.train] + [row["response"] for row in corpus.train]
    train_sentencepiece(texts, root / "tok.model", vocab_size=256)
    data_cfg = DataConfig(format="prompt_response", prompt_template=TEMPLATE, max_prompt_length=24,
                          max_length=40, valid_fraction=0.0)
    preprocess([paths["train_labelled"], paths["train_prompts"]], str(root / "data"), str(root / "tok.model"),
               data_cfg, prompts_only=True, options=PreprocessOptions(workers=1, progress=False))


def base_config(root: Path, tp: int = 1, pp: int = 1) -> Config:
    """6 on-policy MGSR steps (SCRG, DAC-KL, span) of a 2x32 llama student from a 2x64 teacher."""
    cfg = Config()
    cfg.teacher, cfg.student = tiny_model_config(2, 64), tiny_model_config(2, 32)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.parallel.seed = 5
    cfg.data.tokenizer = str(root / "tok.model")
    cfg.data.train_path = str(root / "data.train")
    cfg.data.max_prompt_length = 24
    cfg.schedule.seq_length = 40
    cfg.schedule.micro_batch_size = 2
    cfg.schedule.global_batch_size = 8
    cfg.schedule.train_iters = 6
    cfg.schedule.lr_warmup_iters = 2
    cfg.optimizer.lr = 1e-2
    cfg.mgsr.max_new_tokens = 12
    cfg.mgsr.data_schedule = "on_policy"
    cfg.mgsr.k_band = 32
    cfg.mgsr.k_feat = 16
    cfg.mgsr.loss_chunk_tokens = 64
    cfg.teacher.load = str(root / "teacher")
    cfg.logging.output_dir = str(root / "logs")
    return cfg


def ensure_teacher(root: Path) -> None:
    """A teacher checkpoint whose weights are NOT the random init (the trainer refuses those)."""
    if (root / "teacher" / "model_config.yaml").is_file():
        return
    save_perturbed_teacher(base_config(root).teacher, root / "teacher")


def save_perturbed_teacher(model_cfg, directory: Path) -> None:
    """Build `model_cfg` at TP=PP=1, move every weight off its random init (small fixed noise) and save.
    Its provenance says it was trained (one step): a teacher without a training or import record is
    refused, and smoke runs want a usable teacher, not one that scores well."""
    from mgsr_megatron import parallel
    from mgsr_megatron.models import build_teacher
    from mgsr_megatron.models.checkpoint import provenance_of, save_model

    parallel.initialize_model_parallel(1, 1, seed=11)
    teacher = build_teacher(model_cfg)
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=noise))
    save_model(teacher, directory, copy.deepcopy(model_cfg),
               provenance=provenance_of(training={"iterations": 1, "final_loss": None}))
