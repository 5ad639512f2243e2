"""Many distributed checks per torchrun launch (each launch costs 10-20 s of imports on 2 cores).

A check is a function in `tests/dist/check_*.py` decorated with `@dist_check(world_size=N)`. The
runner (`python -m tests.dist.runner`) starts one process group per world size, runs every registered check for that size in turn
(parallel_state is rebuilt by each check via `mgsr_megatron.parallel.initialize_model_parallel`),
and records pass/fail per check; `tests/test_distributed.py` turns each record into a pytest test.
A check fails if it raises on any rank.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path

REGISTRY: dict[str, tuple[int, object]] = {}
CHECK_DIR = Path(__file__).parent


def dist_check(world_size: int):
    def register(fn):
        REGISTRY[f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"] = (world_size, fn)
        return fn
    return register


def discover() -> dict[str, tuple[int, object]]:
    if str(CHECK_DIR.parent.parent) not in sys.path:
        sys.path.insert(0, str(CHECK_DIR.parent.parent))
    for path in sorted(CHECK_DIR.glob("check_*.py")):
        importlib.import_module(f"tests.dist.{path.stem}")
    return REGISTRY


def run(world_size: int, out: Path, only: list[str] | None = None) -> None:
    import torch.distributed as dist

    from mgsr_megatron import parallel

    parallel.init_distributed(timeout_minutes=3)
    rank = dist.get_rank()
    checks = {n: fn for n, (ws, fn) in discover().items()
              if ws == world_size and (not only or any(n.startswith(o) for o in only))}
    results = {}
    for name, fn in checks.items():
        start = time.time()
        try:
            fn()
            error = None
        except Exception:  # noqa: BLE001 - reported per check
            error = traceback.format_exc()
        errors = [None] * world_size
        dist.all_gather_object(errors, error)
        failed = {r: e for r, e in enumerate(errors) if e}
        results[name] = {"ok": not failed, "seconds": round(time.time() - start, 2),
                         "error": "\n".join(f"[rank {r}] {e}" for r, e in failed.items())}
        if rank == 0:
            print(f"{'PASS' if not failed else 'FAIL'} {name} ({results[name]['seconds']} s)", flush=True)
            out.write_text(json.dumps(results, indent=1))  # incremental: a hang keeps earlier results
    parallel.destroy()

