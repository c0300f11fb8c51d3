"""Shared fixtures: a real redis-server on a free port (per session), and a clean DB per test."""

from __future__ import annotations

import pytest

from tests.procs import start_redis


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("redis")
    proc, url = start_redis(tmp)
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()
