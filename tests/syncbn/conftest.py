"""Fixtures: pools of real gloo ranks (spawned processes), shared by the syncbn tests of a session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.syncbn.process_group_pool import ProcessGroupPool


def _pool(world_size: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroupPool]:
    pool = ProcessGroupPool(world_size, tmp_path_factory.mktemp(f"gloo{world_size}"))
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroupPool]:
    yield from _pool(1, tmp_path_factory)


@pytest.fixture(scope="session")
def pool2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroupPool]:
    yield from _pool(2, tmp_path_factory)


@pytest.fixture(scope="session")
def pool3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroupPool]:
    yield from _pool(3, tmp_path_factory)
