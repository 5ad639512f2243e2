"""Device and backend choice, and the CPU adapter for Megatron-Core's hard-coded CUDA calls.

Everything device-specific lives in this package: the rest of the code asks `device()` and
`backend()` and never touches `torch.cuda` directly.

Public: device, backend, activate, keep_freed_host_memory, cuda_available, set_local_device, model_parallel_seed,
synchronize, peak_memory_bytes, bf16_supported, without_adapter (this file). cpu.py is the adapter `activate()`
installs.
"""

from __future__ import annotations

import contextlib

import torch

from mgsr_megatron.platform import cpu


def cuda_available() -> bool:
    return torch.cuda.is_available()


def backend() -> str:
    """Process-group backend: NCCL on CUDA, gloo on CPU."""
    return "nccl" if cuda_available() else "gloo"


def device() -> torch.device:
    """The device this rank computes on (the current CUDA device, else the CPU)."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_local_device(local_rank: int) -> None:
    """Bind this process to its GPU (no-op on CPU)."""
    if cuda_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())


def activate() -> None:
    """Make Megatron-Core usable on this machine: a no-op with CUDA, the CPU adapter without."""
    if not cuda_available():
        cpu.activate()


def keep_freed_host_memory() -> None:
    """Without CUDA, keep freed CPU tensor memory in the process for reuse (`cpu.keep_freed_memory`); for
    engines that do not `activate()` the Megatron adapter (DeepSpeed). A no-op with CUDA."""
    if not cuda_available():
        cpu.keep_freed_memory()


def without_adapter():
    """A context in which the CPU adapter's `CudaToCpuMode` is suspended (`cpu.suspended`), for this project's
    own hot loops that never reach Megatron-Core's CUDA calls; a null context with CUDA."""
    return contextlib.nullcontext() if cuda_available() else cpu.suspended()


def model_parallel_seed(seed: int) -> None:
    """Megatron's model-parallel RNG tracker seeding (CUDA generator on GPU, CPU generator otherwise)."""
    from megatron.core import tensor_parallel

    if cuda_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu.model_parallel_cpu_manual_seed(seed)


def synchronize() -> None:
    if cuda_available():
        torch.cuda.synchronize()


def peak_memory_bytes() -> int:
    """Peak bytes allocated on the GPU; on the CPU the process's peak resident set size."""
    if cuda_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bf16_supported() -> bool:
    return cuda_available() and torch.cuda.is_bf16_supported()


def device_rng_state():
    """Every local GPU's RNG state (None on the CPU), for a checkpoint."""
    return torch.cuda.get_rng_state_all() if cuda_available() else None


def set_device_rng_state(state) -> None:
    """Restore `device_rng_state()`'s result (nothing to do on the CPU or for a CPU-written state)."""
    if state is not None and cuda_available():
        torch.cuda.set_rng_state_all(state)
