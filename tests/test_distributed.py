"""One pytest test per distributed check (see tests/dist/harness.py); checks share launches."""

import pytest

from tests.dist.harness import discover

CHECKS = sorted(discover().items(), key=lambda item: (item[1][0], item[0]))


@pytest.mark.parametrize("name,world_size", [(n, ws) for n, (ws, _) in CHECKS], ids=[n for n, _ in CHECKS])
def test_distributed(dist_results, name, world_size):
    results = dist_results.get(world_size)
    if name not in results:
        pytest.fail(f"check {name} did not report (crash or hang?). Launch log tail:\n"
                    f"{dist_results.logs.get(world_size, '')[-6000:]}")
    assert results[name]["ok"], results[name]["error"]
