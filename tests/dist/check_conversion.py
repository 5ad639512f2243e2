"""HF -> Megatron conversion gives transformers' logits at TP=1, TP=2, PP=2, TP2xPP2; a model changed
and saved at TP2xPP2 exports to an HF directory with the Megatron logits (world size 4).

The reference is Hugging Face `transformers` itself (fp32, tolerance 1e-4).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from mgsr_megatron import parallel
from mgsr_megatron.models import build_model
from mgsr_megatron.models.checkpoint import load_model, read_model_config, save_model
from mgsr_megatron.models.pipeline import forward_logits
from tests.dist.common import LAYOUTS, assert_close, broadcast_from_last_stage, gather_vocab
from tests.dist.harness import dist_check

VOCAB = 250


@contextlib.contextmanager
def real_cuda_stream():
    """transformers' modules annotate with `torch.cuda.Stream | None` at import time, which fails
    once the CPU adapter has replaced `torch.cuda.Stream` by a function: put the class back while
    transformers imports (its models never touch CUDA on this machine)."""
    stub = torch.cuda.Stream
    torch.cuda.Stream = torch.cuda.streams.Stream
    try:
        yield
    finally:
        torch.cuda.Stream = stub


def tiny_hf_model(kind: str, seed: int = 0):
    """A tiny random transformers model (fp32, eval). kinds: llama_gqa, qwen2, mistral, llama3_rope, gpt2, opt."""
    with real_cuda_stream():
        return _tiny_hf_model(kind, seed)


def _tiny_hf_model(kind: str, seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=64)
    if kind in ("llama_gqa", "llama3_rope"):
        extra = {}
        if kind == "llama3_rope":
            extra = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         rope_theta=500000.0)
        config = tf.LlamaConfig(intermediate_size=96, num_key_value_heads=2, **common, **extra)
        model = tf.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = tf.Qwen2Config(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True,
                                rope_theta=1000000.0, **common)
        model = tf.Qwen2ForCausalLM(config)
        with torch.no_grad():  # random (not zero) QKV biases so the test sees their order
            for name, param in model.named_parameters():
                if name.endswith("_proj.bias"):
                    param.normal_(0, 0.5)
    elif kind == "mistral":
        config = tf.MistralConfig(intermediate_size=96, num_key_value_heads=2, sliding_window=None, **common)
        model = tf.MistralForCausalLM(config)
    elif kind == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(config)
    elif kind == "opt":
        config = tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                              ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0,
                              pad_token_id=1)
        model = tf.OPTForCausalLM(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # LayerNorm/RMSNorm weights start at exactly 1 and biases at 0: randomise
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def test_tokens():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 12), generator=gen) for _ in range(2)]


def hf_logits(model, micro_batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(tokens).logits.float() for tokens in micro_batches])


def _shared_tmpdir() -> Path:
    path = [tempfile.mkdtemp(prefix="mgsr_conv_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def on_rank0(fn):
    """Run fn on rank 0 only; every rank raises if it failed (so no rank waits in a collective)."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception:  # noqa: BLE001 - re-raised on every rank below
            import traceback

            error = traceback.format_exc()
    box = [result, error]
    dist.broadcast_object_list(box, src=0)
    if box[1]:
        raise RuntimeError(f"rank 0 failed:\n{box[1]}")
    return box[0]


def _megatron_logits(model, micro_batches, vocab):
    outputs = forward_logits(model, micro_batches)
    logits = None if outputs is None else torch.stack([gather_vocab(out) for out in outputs])
    logits = broadcast_from_last_stage(logits, (len(micro_batches), *micro_batches[0].shape, model.vocab_size))
    return logits[..., :vocab]


def _check_architecture_round_trip(kind: str):
    from mgsr_megatron.conversion import export_hf, import_hf

    parallel.initialize_model_parallel(1, 1)
    tmp = _shared_tmpdir()
    micro_batches = test_tokens()
    try:
        def convert():
            hf_model = tiny_hf_model(kind)
            with real_cuda_stream():
                hf_model.save_pretrained(tmp / "hf")
                reference = hf_logits(hf_model, micro_batches)
            import_hf(tmp / "hf", tmp / "megatron", tp=2, pp=2, progress=False)
            return reference

        reference = on_rank0(convert)
        cfg = read_model_config(tmp / "megatron")
        for tp, pp in LAYOUTS:
            parallel.initialize_model_parallel(tp, pp, models={"model": cfg})
            model = build_model(cfg)
            load_model(model, tmp / "megatron")
            logits = _megatron_logits(model, micro_batches, VOCAB)
            assert_close(logits, reference, 1e-4, f"{kind} Megatron TP={tp},PP={pp} vs transformers")

        # "Train" at TP2xPP2 (perturb every TP-sharded decoder weight; replicated ones would have to
        # change identically on both TP ranks), save, export, compare with Megatron.
        with torch.no_grad():
            gen = torch.Generator().manual_seed(100 + dist.get_rank())
            for name, param in model.named_parameters():
                if name.startswith("decoder.layers.") and getattr(param, "tensor_model_parallel", False):
                    param.add_(torch.randn(param.shape, generator=gen) * 0.02)
        trained = _megatron_logits(model, micro_batches, VOCAB)
        save_model(model, tmp / "trained", cfg)
        parallel.initialize_model_parallel(1, 1)

        def export():
            export_hf(tmp / "trained", tmp / "hf_trained", progress=False)
            with real_cuda_stream():
                from transformers import AutoModelForCausalLM

                exported = AutoModelForCausalLM.from_pretrained(tmp / "hf_trained").eval()
                exported_logits = hf_logits(exported, micro_batches)
            assert_close(exported_logits, trained, 1e-4, f"{kind} exported HF vs Megatron TP2xPP2 after an update")

        on_rank0(export)
        dist.barrier()
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)


@dist_check(world_size=4)
def conversion_llama_gqa_logits_tp_pp():
    _check_architecture_round_trip("llama_gqa")


@dist_check(world_size=4)
def conversion_qwen2_bias_tied_logits_tp_pp():
    _check_architecture_round_trip("qwen2")


@dist_check(world_size=4)
def conversion_gpt2_logits_tp_pp():
    _check_architecture_round_trip("gpt2")


@dist_check(world_size=4)
def conversion_opt_logits_tp_pp():
    _check_architecture_round_trip("opt")
