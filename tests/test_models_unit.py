import pytest
import torch

from mgsr_megatron.config import ModelConfig
from mgsr_megatron.errors import UserError
from mgsr_megatron.models import mask_padded_logits, padded_vocab_size, resolve
from mgsr_megatron.models.builder import check_same_vocab


def test_padded_vocab_is_tp_independent():
    assert padded_vocab_size(50257, 128, 1) == padded_vocab_size(50257, 128, 8) == 50304
    with pytest.raises(UserError, match="padded vocabulary 384 .* not divisible by TP=256"):
        padded_vocab_size(300, 128, 256)


def test_mask_padded_logits_shard():
    shard = torch.zeros(2, 3, 4)  # TP rank 1 of 2 over V_padded=8 holds ids 4..7
    masked = mask_padded_logits(shard, vocab_size=6, tp_rank=1)
    assert torch.isinf(masked[..., 2:]).all() and (masked[..., :2] == 0).all()
    assert mask_padded_logits(shard, vocab_size=6, tp_rank=0) is shard


def test_resolve_defaults():
    llama = resolve(ModelConfig(arch="llama", hidden_size=96))
    assert llama.ffn_hidden_size == 256 and llama.tie_embeddings is False and llama.num_query_groups == 4
    gpt2 = resolve(ModelConfig(arch="gpt2", hidden_size=96))
    assert gpt2.ffn_hidden_size == 384 and gpt2.tie_embeddings is True


@pytest.mark.parametrize("fields,message", [
    ({"arch": "bert"}, "model arch 'bert' is not supported \\(supported: llama, gpt2, opt\\)"),
    ({"params_dtype": "fp8"}, "params_dtype 'fp8'"),
    ({"num_attention_heads": 4, "num_query_groups": 3}, "not a multiple of num_query_groups=3"),
    ({"arch": "gpt2", "num_query_groups": 2}, "only supported for arch llama"),
])
def test_resolve_errors(fields, message):
    with pytest.raises(UserError, match=message):
        resolve(ModelConfig(**fields))


def test_teacher_student_vocab_must_match():
    with pytest.raises(UserError, match="teacher vocab_size=512 differs from student vocab_size=500"):
        check_same_vocab(ModelConfig(vocab_size=512), ModelConfig(vocab_size=500))
