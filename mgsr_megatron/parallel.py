"""Process-group start-up under torchrun, SLURM (direct srun) or MPI; Megatron parallel_state; seeds.

Rank discovery order (first match wins):
  1. torchrun / torch.distributed.launch: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
     (Under `srun torchrun ...` the SLURM_* variables describe the launcher task, not the worker.)
  2. SLURM direct mode (one task per rank): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the
     first host of SLURM_JOB_NODELIST, the port derived from SLURM_JOB_ID unless MASTER_PORT is set.
  3. MPI: OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK} (Open MPI) or PMI_RANK / PMI_SIZE / MPI_LOCALRANKID
     (MPICH, Intel MPI); the master address and port are broadcast from rank 0 through mpi4py.
  4. Nothing set: a single process.
"""

from __future__ import annotations

import datetime
import os
import random
import re
import socket
import time
from dataclasses import dataclass

import torch

from mgsr_megatron import platform
from mgsr_megatron.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | mpi | single


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: 'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1']."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
            else:
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _int_env(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _port_from_job(env) -> int:
    if "MASTER_PORT" in env:
        return _int_env(env, "MASTER_PORT")
    if "SLURM_JOB_ID" in env:
        return 20000 + _int_env(env, "SLURM_JOB_ID") % 20000
    return 29500


def discover_env(env=None, mpi_bcast=None) -> DistEnv:
    """Pure function of the environment (plus an optional mpi4py broadcast for MPI launches)."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in env]
        if missing:
            raise UserError(f"torchrun-style launch is missing rendezvous variable(s): {', '.join(missing)}")
        return DistEnv(_int_env(env, "RANK"), _int_env(env, "WORLD_SIZE"),
                       _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       env["MASTER_ADDR"], _int_env(env, "MASTER_PORT"), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _int_env(env, "SLURM_NTASKS") > 1:
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])[0]
        else:
            raise UserError("SLURM launch is missing SLURM_JOB_NODELIST (needed for the master address); "
                            "set MASTER_ADDR explicitly")
        return DistEnv(_int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS"),
                       _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                       addr, _port_from_job(env), "slurm")
    for rank_var, size_var, local_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                           "OMPI_COMM_WORLD_LOCAL_RANK"),
                                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")):
        if rank_var in env and size_var in env:
            rank, size = _int_env(env, rank_var), _int_env(env, size_var)
            local = _int_env(env, local_var) if local_var in env else 0
            if "MASTER_ADDR" in env:
                addr, port = env["MASTER_ADDR"], _port_from_job(env)
            else:
                bcast = mpi_bcast or _mpi_bcast
                addr, port = bcast((_this_host(), _free_port()) if rank == 0 else None)
            return DistEnv(rank, size, local, addr, port, "mpi")
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def _this_host() -> str:
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_bcast(obj):
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("MPI launch detected (OMPI_*/PMI_* set) but mpi4py is not installed; "
                        "install mpi4py or set MASTER_ADDR and MASTER_PORT") from None
    return MPI.COMM_WORLD.bcast(obj, root=0)


# --------------------------------------------------------------------------------------------------
# Layout: pure functions, checked before anything is allocated.

def parallel_groups(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Rank lists Megatron's parallel_state builds (order tp-dp-pp): TP innermost, PP outermost."""
    dp = world_size // (tp * pp)
    rank = lambda t, d, p: t + tp * (d + dp * p)
    return {
        "tp": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
    }


def validate_layout(world_size: int, tp: int, pp: int, models: dict | None = None) -> None:
    """One-line errors for layouts that cannot work. `models` maps a name to a ModelConfig."""
    if tp < 1 or pp < 1:
        raise UserError(f"tensor/pipeline parallel sizes must be >= 1 (got TP={tp}, PP={pp})")
    if world_size % (tp * pp):
        raise UserError(f"world size {world_size} is not a multiple of TP*PP = {tp}*{pp} = {tp * pp}")
    for name, m in (models or {}).items():
        groups = m.num_query_groups or m.num_attention_heads
        ffn = m.ffn_hidden_size
        if m.num_attention_heads % tp:
            raise UserError(f"{name}: TP={tp} does not divide num_attention_heads={m.num_attention_heads}")
        if groups % tp:
            raise UserError(f"{name}: TP={tp} does not divide num_query_groups={groups}")
        if ffn is not None and ffn % tp:
            raise UserError(f"{name}: TP={tp} does not divide ffn_hidden_size={ffn}")
        if pp > m.num_layers:
            raise UserError(f"{name}: PP={pp} is larger than num_layers={m.num_layers}")
        if m.num_layers % pp:
            raise UserError(f"{name}: PP={pp} does not divide num_layers={m.num_layers}")


# --------------------------------------------------------------------------------------------------
# Start-up.

def wait_for_rendezvous(env: DistEnv, timeout_s: float) -> None:
    """Ranks other than 0 wait (bounded) until the master's store accepts connections, so an address
    that can never be reached is reported by name instead of hanging for the collective timeout."""
    if env.rank == 0 or env.world_size == 1:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise UserError(f"rank {env.rank} cannot reach the rendezvous at {env.master_addr}:{env.master_port} "
                                f"({env.launcher} launch) within {timeout_s:.0f} s: {exc.strerror or exc}; check "
                                f"MASTER_ADDR/MASTER_PORT (or the SLURM node list) and the firewall") from None
            time.sleep(0.5)


def init_distributed(env: DistEnv | None = None, timeout_minutes: int = 10,
                     rendezvous_timeout_s: float = 300.0) -> DistEnv:
    """torch.distributed start-up (idempotent). Activates the CPU adapter when CUDA is absent."""
    env = env or discover_env()
    platform.activate()
    if not torch.distributed.is_initialized():
        wait_for_rendezvous(env, rendezvous_timeout_s)
        platform.set_local_device(env.local_rank)
        torch.distributed.init_process_group(
            backend=platform.backend(), init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes))
    return env


def initialize_model_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, models: dict | None = None) -> None:
    """Validate the layout, (re)build Megatron's TP/PP/DP groups and seed every rank deterministically."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        init_distributed()
    validate_layout(torch.distributed.get_world_size(), tp, pp, models)
    destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Megatron's rule: each pipeline stage gets its own seed (+100*pp_rank), TP ranks differ only in
    the tracker's model-parallel state; data-parallel replicas share all of it."""
    from megatron.core import parallel_state

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    platform.model_parallel_seed(stage_seed)


def destroy_model_parallel() -> None:
    """Megatron's destroy_model_parallel() only forgets its ~25 process groups; each gloo group keeps
    its threads (about 50 per layout here), so a process that changes layouts (tests, the demo) would
    pile them up. Destroy the groups themselves too."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return
    groups = {}
    for value in vars(parallel_state).values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, torch.distributed.ProcessGroup) and item != torch.distributed.group.WORLD:
                groups[id(item)] = item
    parallel_state.destroy_model_parallel()
    for group in groups.values():
        try:
            torch.distributed.destroy_process_group(group)
        except ValueError:  # a group this rank is not part of / already released
            pass


def destroy() -> None:
    destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _replica_layout():
    """(DP rank, DP size, DP group) of this process: Megatron's data-parallel group once parallel_state is
    initialised; otherwise every rank of torch.distributed is a replica (the DeepSpeed engine: TP = PP = 1,
    the world group); (0, 1, None) in a process without torch.distributed."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_group())
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), None
    return 0, 1, None


def replica_blocks(count: int, block_size: int, *, pad: bool = False) -> list[range]:
    """The blocks of rows this data-parallel replica handles when `count` rows are processed
    `block_size` at a time: block k (rows [k*block_size, (k+1)*block_size)) goes to replica k % DP.
    `pad=True` appends empty ranges (range(count, count)) so that every replica gets the same number of
    blocks, ceil(blocks / DP): callers whose replicas must run in lockstep (ZeRO-3 generation) take an
    empty block as "join my peers' passes".

    Generation seeds each block by its first GLOBAL row and the sampler's noise is keyed by the row's
    place in its block, so a sampled answer depends only on (seed, row), never on the DP size."""
    dp_rank, dp_size, _ = _replica_layout()
    starts = range(0, count, block_size)
    mine = [range(start, min(start + block_size, count)) for start in starts[dp_rank::dp_size]]
    rounds = -(-len(starts) // dp_size)
    return mine + [range(count, count)] * (rounds - len(mine) if pad else 0)


def gather_over_replicas(local: list) -> list:
    """The concatenation of every data-parallel replica's `local` list (collective over the DP group;
    the world group outside Megatron, `local` itself in a single process)."""
    import torch.distributed as dist

    _, dp_size, group = _replica_layout()
    if dp_size == 1:
        return list(local)
    parts = [None] * dp_size
    dist.all_gather_object(parts, local, group=group)
    return [item for part in parts for item in part]
