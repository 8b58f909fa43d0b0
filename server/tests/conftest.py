"""Fixtures that run real servers, stopped when the test is done."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from servers import RunningServer, start_cacheserver, start_memcached


@pytest.fixture
def cacheserver() -> Iterator[RunningServer]:
    server = start_cacheserver()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_cacheserver() -> Iterator[RunningServer]:
    server = start_cacheserver()
    yield server
    server.stop()


@pytest.fixture
def memcached() -> Iterator[RunningServer]:
    server = start_memcached()
    yield server
    server.stop()
