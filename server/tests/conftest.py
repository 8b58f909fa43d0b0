"""Fixtures that run real servers, stopped when the test is done."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from servers import RunningServer, start_cacheserver, start_memcached

# CI runs the same examples every time (a red run must be reproducible); a developer's run
# explores new ones and remembers failures in .hypothesis/.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


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
