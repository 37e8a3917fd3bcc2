"""Shared fixtures of the service tests: one real local Ray for the whole session, and a PostgreSQL database.

`ray_cluster` starts an embedded Ray (`address="local"`, 4 logical CPUs, no dashboard) the first time a test asks
for it and shuts it down at the end of the session. Engine tests (training runs) and REST tests (a live server)
share it, so Ray starts once per session.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

#: Logical CPUs of the test cluster: enough for two 2-worker jobs, or one 4-worker job at 1 CPU each.
RAY_TEST_CPUS = 4


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A real local Ray with 4 logical CPUs for the whole session; yields `cluster_capacity()`."""
    import ray

    from service.engine.cluster import cluster_capacity, ensure_ray

    started_here = not ray.is_initialized()
    ensure_ray(None, num_cpus=RAY_TEST_CPUS, log_to_driver=False)
    yield cluster_capacity()
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def model_plugin() -> Iterator[str]:
    """The example plugin package (tests/fixtures/model_plugin) installed with pip; yields its model's name."""
    from tests.model_plugin import installed_model_plugin

    with installed_model_plugin() as name:
        yield name


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh database on the machine's real PostgreSQL for one test module, dropped afterwards."""
    from tests.service.conftest_api import postgres_database

    with postgres_database() as url:
        if url is None:
            pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (user postgres, database test)")
        yield url
