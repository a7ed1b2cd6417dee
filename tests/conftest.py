from __future__ import annotations

import pytest

from dispatch_shard.testing import shutdown_pools


@pytest.fixture(scope="session", autouse=True)
def _stop_rank_pools_at_exit() -> object:
    yield None
    shutdown_pools()
