"""A short soak: training the demo model keeps memory, caches, threads and groups flat.

The CI version of ``tools/soak.py`` (``nox -s soak`` runs 2000 steps on 4 ranks):
200 steps on 2 ranks, the same checks (NOTE [what flat means] in tools/soak.py) on
every rank.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dispatch_shard.testing import get_pool

SOAK = Path(__file__).resolve().parents[1] / "tools" / "soak.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SOAK.exists(), reason="needs the checkout's tools/soak.py"),
]


def soak_module() -> ModuleType:
    """tools/soak.py, imported by path (tools/ is not a package)."""
    module = sys.modules.get("soak")
    if module is None:
        spec = importlib.util.spec_from_file_location("soak", SOAK)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["soak"] = module
        spec.loader.exec_module(module)
    return module


def _soak_on_rank(rank: int, world_size: int) -> None:
    soak = soak_module()
    result = soak.soak_rank(rank=rank, world_size=world_size, steps=200, sample_every=25,
                            warmup=100)
    problems = soak.check([result])
    assert problems == [], "\n".join([*problems, soak.table([result])])


def test_training_stays_flat() -> None:
    """On 2 fresh rank processes, as ``nox -s soak`` runs: the pool's long-lived workers
    carry what a thousand earlier tests left in the library's bounded caches. The strict
    counts once moved by one at the last sample (after the whole suite, and in CI): the
    soak itself kept step 1's ``full_tensor()`` of the loss, with its graph and the loss
    it holds, until the last step replaced it; it now reads the loss as a float."""
    pool = get_pool(2)
    pool.stop()  # the next run starts new processes
    pool.run((__name__, "_soak_on_rank"), timeout_s=180.0)
