"""Teacher/student GPTModels give the same logits at every TP/PP layout (world size 4)."""

import torch
import torch.distributed as dist

from mgsr_megatron import parallel
from mgsr_megatron.models import build_model, mask_padded_logits
from mgsr_megatron.models.pipeline import forward_logits
from mgsr_megatron.models.state_dict import gather_full_state_dict, load_full_state_dict
from tests.dist.common import LAYOUTS, assert_close, broadcast_from_last_stage, gather_vocab, tiny
from tests.dist.harness import dist_check


def _logits_at_every_layout(cfg):
    tokens = torch.Generator().manual_seed(0)
    micro_batches = [torch.randint(0, cfg.vocab_size, (2, 12), generator=tokens) for _ in range(2)]
    results = {}
    full = None
    for tp, pp in LAYOUTS:
        parallel.initialize_model_parallel(tp, pp, seed=7, models={"model": cfg})
        model = build_model(cfg)
        if full is None:
            full = gather_full_state_dict(model)  # the TP1/PP1 weights
        else:
            load_full_state_dict(model, full)
            # the round trip must give back exactly the weights we loaded
            again = gather_full_state_dict(model)
            assert again.keys() == full.keys(), sorted(set(again) ^ set(full))
            for key in full:
                assert torch.equal(again[key], full[key]), key
        outputs = forward_logits(model, micro_batches)
        logits = None
        if outputs is not None:
            logits = torch.stack([gather_vocab(out) for out in outputs])
        logits = broadcast_from_last_stage(logits, (2, 2, 12, model.vocab_size))
        results[(tp, pp)] = mask_padded_logits(logits, cfg.vocab_size)
    return results


def _check_identical(arch):
    results = _logits_at_every_layout(tiny(arch))
    reference = results[(1, 1)]
    assert torch.isinf(reference[..., 250:]).all() and torch.isfinite(reference[..., :250]).all()
    for layout, logits in results.items():
        assert_close(logits[..., :250], reference[..., :250], 1e-5, f"{tiny(arch).arch} TP,PP={layout}")


@dist_check(world_size=4)
def llama_gqa_logits_identical_tp_pp():
    _check_identical("llama")


@dist_check(world_size=4)
def gpt2_logits_identical_tp_pp():
    _check_identical("gpt2")


@dist_check(world_size=4)
def opt_logits_identical_tp_pp():
    _check_identical("opt")


@dist_check(world_size=4)
def parallel_groups_match_megatron():
    from megatron.core import parallel_state

    parallel.initialize_model_parallel(2, 2)
    expected = parallel.parallel_groups(4, 2, 2)
    rank = dist.get_rank()
    for kind, getter in (("tp", parallel_state.get_tensor_model_parallel_group),
                         ("dp", parallel_state.get_data_parallel_group),
                         ("pp", parallel_state.get_pipeline_model_parallel_group)):
        actual = dist.get_process_group_ranks(getter())
        mine = next(g for g in expected[kind] if rank in g)
        assert actual == mine, f"{kind}: Megatron {actual} vs parallel_groups {mine}"


@dist_check(world_size=4)
def teacher_is_frozen_in_student_groups():
    from mgsr_megatron.models import build_teacher

    parallel.initialize_model_parallel(2, 2, models={"m": tiny("llama")})
    teacher = build_teacher(tiny("llama", num_layers=2, hidden_size=32))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
