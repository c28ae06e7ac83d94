"""Redis skipped for a while after it timed out: in the API it is only ever a cache.

Every Redis call of the API — the replay cache, the router's auth-rate window, the processors'
circuit breakers — already carries on without Redis. But each one waits out its own time-out
(2 s) when Redis does not answer, and a payment makes six of them: with Redis unreachable behind
a silent network (packets dropped, not refused) every payment took 12 s, past clients' own
time-outs (tests/test_chaos_network.py). After a time-out, every Redis caller of the process
skips Redis for `PAUSE_SECONDS`; the first call after that tries again. A refused connection
fails at once and costs nothing, so it does not close the gate.

With a Redis Cluster, "the cluster is down" (CLUSTERDOWN, or no node serving a slot while a dead
node's slots are re-assigned) closes it too, and so does a refused connection: the cluster
client retries each such call with pauses for 2-3 s before giving up (a dead node's connection
is refused on every retry), so without the gate a payment would wait that out six times.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions

PAUSE_SECONDS = 5.0


@dataclass
class RedisGate:
    pause_seconds: float = PAUSE_SECONDS
    #: The client is a cluster client, whose connection errors come after its retries.
    cluster: bool = False
    clock: Callable[[], float] = time.monotonic
    _closed_until: float = 0.0

    @property
    def open(self) -> bool:
        """Whether to try Redis now."""
        return self.clock() >= self._closed_until

    def failed(self, exc: Exception) -> None:
        """A Redis call failed with `exc`: after a time-out (or the cluster saying it cannot
        serve), skip Redis for a while."""
        slow = (
            redis.exceptions.TimeoutError
            | redis.exceptions.ClusterDownError
            | redis.exceptions.RedisClusterException
        )
        if isinstance(exc, slow) or (
            self.cluster and isinstance(exc, redis.exceptions.ConnectionError)
        ):
            self._closed_until = self.clock() + self.pause_seconds
