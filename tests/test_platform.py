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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adapter is only active without CUDA")
def test_adapter_suspended_inside_the_block_only_and_only_when_innermost():
    platform.activate()
    with platform.without_adapter():
        with pytest.raises((AssertionError, RuntimeError)):  # torch itself: not compiled with CUDA
            torch.zeros(1, device="cuda")
        with platform.without_adapter():  # nested: nothing more to suspend
            assert torch.overrides._get_current_function_mode() is not cpu._MODE
    assert torch.zeros(1, device="cuda").device.type == "cpu"
    with pytest.raises(ValueError), platform.without_adapter():
        raise ValueError  # an exception inside: the adapter comes back all the same
    assert torch.zeros(1, device="cuda").device.type == "cpu"
    with torch.device("cpu"), platform.without_adapter():  # a mode entered after the adapter's: it stays
        assert torch.zeros(1, device="cuda").device.type == "cpu"


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


FRESH_BUFFER_FAULTS = """
import resource, torch
from mgsr_megatron import platform
platform.keep_freed_host_memory()
def faults_of_fresh_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(sum([faults_of_fresh_buffer() for _ in range(16)][-4:]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU heap only")
def test_freed_cpu_memory_is_reused_without_page_faults():
    """A fresh 64 MiB buffer after the last one was freed, 16 times: glibc's default unmaps each and the next
    faults in all 16384 of its 4 KiB pages again; kept in the heap, the last four fault none (the first
    ones grow the heap: glibc cannot place an aligned block in a freed one of the same size until freed
    neighbours merge). A user's own glibc malloc setting wins: the default behaviour comes back. Huge
    pages off, so that the count is pages."""
    import os
    import subprocess
    import sys

    def faults(**env):
        run = subprocess.run([sys.executable, "-c", FRESH_BUFFER_FAULTS], capture_output=True, text=True, check=True,
                             env={**os.environ, "THP_MEM_ALLOC_ENABLE": "0", **env})
        return int(run.stdout.split()[-1])

    assert faults() < 100
    assert faults(MALLOC_MMAP_THRESHOLD_=str(2**20)) >= 4 * 16000
