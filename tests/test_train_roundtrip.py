"""HF -> Megatron -> short `mgsr train` -> HF: the exported student loads in transformers and gives the
trained Megatron student's logits (issue 4's round trip through training)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

MEGATRON_LOGITS = """
import sys, torch
from mgsr_megatron import parallel
from mgsr_megatron.models import build_model, mask_padded_logits
from mgsr_megatron.models.checkpoint import load_model, read_model_config
if __name__ == "__main__":
    parallel.init_distributed(); parallel.initialize_model_parallel(1, 1)
    cfg = read_model_config(sys.argv[1]); model = build_model(cfg); load_model(model, sys.argv[1]); model.eval()
    tokens = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    torch.save(logits[..., :cfg.vocab_size].clone(), sys.argv[3])
"""


def run(cmd, **kw):
    result = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900, **kw)
    assert result.returncode == 0, (cmd, result.stdout[-2000:], result.stderr[-4000:])
    return result


def test_hf_to_megatron_train_and_back(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mgsr_megatron.training.smoke import build_files

    data = tmp_path / "data"
    data.mkdir()
    build_files(data)  # tokenizer with 256 pieces + preprocessed rows
    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=False)
    LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "hf_init")
    convert = [sys.executable, "tools/convert_checkpoint.py"]
    run(convert + ["import", "--hf-path", str(tmp_path / "hf_init"), "--megatron-path", str(tmp_path / "mg_init"),
                   "--no-progress"])
    student = yaml.safe_load((tmp_path / "mg_init" / "model_config.yaml").read_text())
    config = {
        "student": {**student, "load": str(tmp_path / "mg_init")}, "teacher": student,
        "data": {"train_path": str(data / "data.train"), "tokenizer": str(data / "tok.model")},
        "mgsr": {"w_dac": 0.0, "w_span": 0.0, "data_schedule": "ground_truth"},
        "schedule": {"train_iters": 5, "global_batch_size": 4, "micro_batch_size": 2, "seq_length": 40,
                     "lr_warmup_iters": 1, "eval_interval": 0},
        "optimizer": {"lr": 0.01},
        "checkpoint": {"save": str(tmp_path / "run" / "checkpoints")},
        "logging": {"output_dir": str(tmp_path / "run"), "progress_bar": False, "tensorboard": False},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    run([sys.executable, "-m", "mgsr_megatron", "train", "--config", str(tmp_path / "train.yaml")])
    run(convert + ["export", "--megatron-path", str(tmp_path / "run" / "checkpoints"),
                   "--hf-path", str(tmp_path / "hf_trained"), "--no-progress"])

    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    script = tmp_path / "megatron_logits.py"
    script.write_text(MEGATRON_LOGITS)
    run([sys.executable, str(script), str(tmp_path / "run" / "checkpoints"), str(tmp_path / "tokens.pt"),
         str(tmp_path / "megatron_logits.pt")])
    megatron_logits = torch.load(tmp_path / "megatron_logits.pt")

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_trained").eval()
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_init").eval()
    with torch.no_grad():
        hf_logits = trained(tokens).logits
        initial_logits = initial(tokens).logits
    assert (hf_logits - megatron_logits).abs().max() < 1e-4
    assert (initial_logits - megatron_logits).abs().max() > 1e-2  # training changed the student
