import pytest
import torch

from mgsr_megatron import platform
from mgsr_megatron.platform import cpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adapter is only active without CUDA")
def test_cpu_adapter_maps_cuda_to_cpu():
    platform.activate()
    assert cpu.is_active() and platform.backend() == "gloo" and platform.device().type == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()  # stubbed: must not raise


def test_megatron_compat_check_fails_loudly(monkeypatch):
    from megatron.core.tensor_parallel import random as mp_random

    cpu.check_megatron_compat()  # passes on the pinned megatron-core 0.16.1
    monkeypatch.delattr(mp_random, "CudaRNGStatesTracker")
    with pytest.raises(RuntimeError, match="lacks \\['CudaRNGStatesTracker'\\]: update the CPU adapter"):
        cpu.check_megatron_compat()


def test_megatron_cuda_sites_still_exist():
    """The adapter targets these hard-coded CUDA uses; if an upgrade moves them, revisit platform/cpu.py."""
    import inspect

    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils

    assert 'device="cuda"' in inspect.getsource(schedules)
    assert 'device="cuda"' in inspect.getsource(utils.get_default_causal_mask)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tracker only")
def test_cpu_rng_tracker_forks_independent_streams():
    from megatron.core import tensor_parallel

    platform.activate()
    cpu.install_rng_tracker()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.add("a", 11)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with tracker.fork("a"):
        second = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(first, torch.rand(3)) and not torch.equal(first, second)
