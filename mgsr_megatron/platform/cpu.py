"""The one place that adapts Megatron-Core 0.16.1's hard-coded CUDA calls to the CPU.

Megatron-Core assumes CUDA in ~570 places (`device="cuda"` in the pipeline schedules and masks,
`torch.cuda.current_device()` for buffers, the CUDA RNG tracker, `torch.cuda.synchronize` in p2p
and inference communication). Without CUDA, `activate()` installs four things, once per process
(and, through `keep_freed_memory()`, sets the CPU heap up the way CUDA's caching allocator works):

1. `CudaToCpuMode`, a `TorchFunctionMode` that rewrites any `device` argument naming CUDA to the
   CPU, turns `Tensor.cuda()` into a no-op and answers `Tensor.type()` of floating tensors with the
   CUDA type name (Megatron's optimizers accept only `torch.cuda.{Float,Half,BFloat16}Tensor`);
2. no-op stubs for the `torch.cuda` calls that only manage devices and streams
   (`current_device` answers "cpu" so `device=torch.cuda.current_device()` lands on the CPU);
3. a CPU RNG tracker in place of `CudaRNGStatesTracker` (same names, same seeding rule), and the
   "CUDA" RNG state that activation recomputation saves/restores mapped to the CPU generator's, and
   the mode re-entered in the backward functions that recompute the forward;
4. the distributed optimizer's gradient reduce-scatter (DDP grad buffers) as an all-reduce that keeps
   the local shard: the same summation as the plain optimizer's all-reduce, so both optimizers give
   bit-identical gradients on gloo (gloo's own reduce-scatter sums in another order).

`suspended()` runs a block of this project's own code without the mode: the lean decoding loop, whose few
rows make every torch call short enough that the mode's Python handler is ~10% of it.

It is never active on a CUDA machine. `check_megatron_compat()` verifies the Megatron functions
this module relies on still exist, so an upgrade fails loudly in the tests instead of silently.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_MODE: TorchFunctionMode | None = None
_KEEPING_FREED_MEMORY = False


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placement requests of Megatron-Core to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_CUDA_TYPE_NAMES = {f"torch.{n}Tensor": f"torch.cuda.{n}Tensor" for n in ("Float", "Half", "BFloat16")}


def reduce_scatter_via_all_reduce(output, input, op=None, group=None, async_op=False):
    """`dist.reduce_scatter_tensor` for gloo: all-reduce the whole buffer, keep this rank's shard.

    Megatron's DDP passes a shard view of `input` as `output` (then nothing is copied); synchronous
    also when `async_op` is asked (a handle of None is what Megatron expects after a coalesced call)."""
    import torch.distributed as dist

    dist.all_reduce(input, op=dist.ReduceOp.SUM if op is None else op, group=group)
    shard = input.view(-1).chunk(dist.get_world_size(group))[dist.get_rank(group)]
    if output.data_ptr() != shard.data_ptr():
        output.copy_(shard.view_as(output))
    return None


def _install_rng_state_calls() -> None:
    """Activation recomputation saves and restores the "CUDA" RNG state around the recomputed forward;
    on CPU that state is the CPU generator's, which the same code restores itself."""
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None


def _install_recompute_mode() -> None:
    """Activation recomputation re-runs Megatron's forward inside the backward pass. `backward()` itself
    goes through this mode's handler, and a mode is inactive inside its own handler, so the recomputed
    forward would meet `device="cuda"` (the causal mask) unadapted: the recomputing backward functions
    re-enter the mode."""
    from megatron.core.tensor_parallel import random as mp_random

    for name in ("CheckpointFunction", "CheckpointWithoutOutputFunction"):
        cls = getattr(mp_random, name, None)
        if cls is None or getattr(cls, "mgsr_cpu_mode", False):
            continue

        def backward(ctx, *grads, _original=cls.backward):
            with _MODE:
                return _original(ctx, *grads)

        cls.backward = staticmethod(backward)
        cls.mgsr_cpu_mode = True


def _install_collectives() -> None:
    from megatron.core.distributed import param_and_grad_buffer

    param_and_grad_buffer.dist_reduce_scatter_func = reduce_scatter_via_all_reduce


class _NullStream:
    # a class, not a lambda: libraries annotate with `torch.cuda.Stream | None` (transformers 5)
    def __init__(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait_stream(self, _stream):
        pass

    def wait_event(self, _event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, _stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, _stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, _other):
        return 0.0


def _cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Megatron's RNG tracker over the CPU generator: `fork(name)` swaps the CPU RNG state."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = _cpu_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def model_parallel_cpu_manual_seed(seed: int) -> None:
    """CPU twin of `model_parallel_cuda_manual_seed`: the same three named states and offsets."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    install_rng_tracker()
    tracker = mp_random._CUDA_RNG_STATE_TRACKER
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(seed)
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def _install_cuda_stubs() -> None:
    stubs = {
        "current_device": lambda: "cpu",
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "current_stream": lambda *a, **k: _NullStream(),
        "default_stream": lambda *a, **k: _NullStream(),
        "Stream": _NullStream,
        "Event": _NullEvent,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_device": lambda *a, **k: None,
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "manual_seed": lambda seed: None,
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
    }
    for name, stub in stubs.items():
        setattr(torch.cuda, name, stub)


def check_megatron_compat() -> None:
    """Fail loudly if Megatron-Core no longer has what this adapter replaces."""
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.tensor_parallel import random as mp_random

    if not hasattr(param_and_grad_buffer, "dist_reduce_scatter_func"):
        raise RuntimeError("mgsr_megatron.platform.cpu supports megatron-core 0.16.1: "
                           "param_and_grad_buffer.dist_reduce_scatter_func is gone; update the CPU adapter")
    required = ["CudaRNGStatesTracker", "_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
                "_MODEL_PARALLEL_RNG_TRACKER_NAME", "_DATA_PARALLEL_RNG_TRACKER_NAME",
                "_EXPERT_PARALLEL_RNG_TRACKER_NAME", "get_cuda_rng_tracker", "_get_cuda_rng_state",
                "_set_cuda_rng_state"]
    missing = [name for name in required if not hasattr(mp_random, name)]
    if missing:
        import megatron.core

        raise RuntimeError(
            f"mgsr_megatron.platform.cpu supports megatron-core 0.16.1; megatron-core "
            f"{megatron.core.__version__} lacks {missing}: update the CPU adapter"
        )


def activate() -> None:
    """Install the adapter (idempotent). Only called when CUDA is absent."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return
    assert not torch.cuda.is_available(), "the CPU adapter must not be used on a CUDA machine"
    check_megatron_compat()
    _install_cuda_stubs()
    install_rng_tracker()
    _install_collectives()
    _install_rng_state_calls()
    _install_recompute_mode()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    keep_freed_memory()
    _ACTIVE = True


def keep_freed_memory() -> None:
    """Keep the memory of freed CPU tensors in the process for the next step, as CUDA's caching allocator
    keeps freed GPU memory (idempotent; glibc only, elsewhere nothing changes).

    glibc's malloc serves every block above its mmap threshold (32 MiB at most) with a mapping of its own
    and unmaps it on free, so each step's fresh [tokens, V] logits, probabilities and gradients fault in
    again page by page: the kernel zeroes every page and, on a VM that hands freed memory back to its
    host, first gets it back. That cost is the machine's, not the arithmetic's, and the MGSR step, with
    more such buffers than its baseline, paid more of it: tools/bench_step.py on a 2-core VM spent 5.2 s
    of an 8.5 s MGSR step in the kernel (2.9 s of the baseline's 6.9 s), and 0.1 s in both with these
    settings. With M_MMAP_MAX 0 every block comes from the heap, where freed blocks are reused, and the
    largest trim threshold keeps the heap's top. The process's resident memory then stays at its peak
    plus the heap's fragmentation (+21% on that bench, steady after the first step), as a GPU's reserved
    memory does. Transparent huge pages are left off: their 2 MiB alignment made that heap keep growing.
    A user who set glibc's own malloc variables keeps them."""
    global _KEEPING_FREED_MEMORY
    if _KEEPING_FREED_MEMORY:
        return
    _KEEPING_FREED_MEMORY = True
    user_set = any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ)
    if user_set or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):  # not glibc (musl, macOS): its allocator, its defaults
        return
    import ctypes

    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def is_active() -> bool:
    return _ACTIVE


@contextlib.contextmanager
def suspended():
    """Run the block without `CudaToCpuMode`: only for code that never reaches Megatron-Core's CUDA calls
    (generation/generator.py's decoding loop over the lean stage), where the mode's Python handler on every
    torch call costs ~10% of a decode step (bench_step's student, 8 rows). Nothing changes when the adapter is
    not active, or when another mode was entered after it (the mode is then not the innermost and stays)."""
    if _MODE is None or torch.overrides._get_current_function_mode() is not _MODE:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield
