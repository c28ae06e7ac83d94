"""When the API leaves Redis alone for a while: after a slow failure only (redis_gate.py)."""

from __future__ import annotations

import pytest
import redis.exceptions

from api.storage.redis_gate import RedisGate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("cluster", "error", "closes"),
    [
        (False, redis.exceptions.TimeoutError(), True),
        (False, redis.exceptions.ConnectionError(), False),  # refused at once: costs nothing
        (True, redis.exceptions.ConnectionError(), True),  # refused after the client's retries
        (True, redis.exceptions.ClusterDownError("CLUSTERDOWN"), True),
        (False, redis.exceptions.ResponseError("WRONGTYPE"), False),
    ],
    ids=["timeout", "refused", "cluster-refused", "cluster-down", "response-error"],
)
def test_the_gate_closes_after_slow_failures_only(
    cluster: bool, error: Exception, closes: bool
) -> None:
    clock = Clock()
    gate = RedisGate(cluster=cluster, clock=clock)
    gate.failed(error)
    assert gate.open is not closes
    clock.now += gate.pause_seconds
    assert gate.open  # and Redis is tried again after the pause
