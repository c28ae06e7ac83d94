"""A circuit breaker per processor, shared by every API process and worker through Redis.

Closed: calls go through; errors (a definite failure or an unknown outcome — declines are not
errors) are counted in 5-second buckets. When, over the last `window_seconds`, at least
`min_calls` calls were made and `error_rate` of them failed, the breaker opens for
`open_seconds`: the processor leaves the ranking. Then it is half-open: one probe call a second
may go; a success closes it, a failure opens it again. If Redis is down every breaker reads as
closed (the processors' own answers still protect the payment); after a Redis time-out it is not
asked for a while (`RedisGate`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from api.storage.redis_gate import RedisGate
from tessera.runtime.redis_client import REDIS_ERRORS, RedisClient

BUCKET_SECONDS = 5


@dataclass
class CircuitBreaker:
    redis: RedisClient
    window_seconds: int = 30
    min_calls: int = 10
    error_rate: float = 0.5
    open_seconds: float = 10.0
    clock: Any = time.time
    gate: RedisGate = field(default_factory=RedisGate)

    @staticmethod
    def _key(processor: str, suffix: str) -> str:
        return f"breaker:{{{processor}}}:{suffix}"

    async def is_open(self, processor: str) -> bool:
        if not self.gate.open:
            return False
        try:
            open_until = await self.redis.get(self._key(processor, "open_until"))
            if open_until is None:
                return False
            if self.clock() < float(open_until):
                return True
            # Half-open: one probe a second, shared by all processes.
            second = int(self.clock())
            probe = self._key(processor, f"probe:{second}")
            acquired = await self.redis.set(probe, b"1", nx=True, ex=2)
            return not acquired
        except REDIS_ERRORS as exc:
            self.gate.failed(exc)
            return False

    async def record(self, processor: str, ok: bool) -> None:
        if not self.gate.open:
            return
        now = self.clock()
        bucket = int(now // BUCKET_SECONDS)
        try:
            if ok:
                if await self.redis.get(self._key(processor, "open_until")) is not None:
                    await self._close(processor)
                    return
                key = self._key(processor, f"calls:{bucket}")
                pipe = self.redis.pipeline(transaction=False)
                pipe.hincrby(key, "n", 1)
                pipe.expire(key, self.window_seconds + BUCKET_SECONDS)
                await pipe.execute()
                return
            key = self._key(processor, f"calls:{bucket}")
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(key, "n", 1)
            pipe.hincrby(key, "errors", 1)
            pipe.expire(key, self.window_seconds + BUCKET_SECONDS)
            await pipe.execute()
            calls, errors = await self._window(processor, bucket)
            half_open = await self.redis.get(self._key(processor, "open_until")) is not None
            if half_open or (calls >= self.min_calls and errors / calls >= self.error_rate):
                await self.redis.set(
                    self._key(processor, "open_until"), str(now + self.open_seconds)
                )
        except REDIS_ERRORS as exc:
            self.gate.failed(exc)

    async def state(self, processor: str) -> str:
        if not self.gate.open:
            return "unknown"
        try:
            open_until = await self.redis.get(self._key(processor, "open_until"))
        except REDIS_ERRORS as exc:
            self.gate.failed(exc)
            return "unknown"
        if open_until is None:
            return "closed"
        return "open" if self.clock() < float(open_until) else "half_open"

    async def _window(self, processor: str, bucket: int) -> tuple[int, int]:
        count = self.window_seconds // BUCKET_SECONDS
        pipe = self.redis.pipeline(transaction=False)
        for i in range(count):
            pipe.hmget(self._key(processor, f"calls:{bucket - i}"), "n", "errors")
        calls = errors = 0
        for n, e in await pipe.execute():
            calls += int(n or 0)
            errors += int(e or 0)
        return calls, errors

    async def _close(self, processor: str) -> None:
        bucket = int(self.clock() // BUCKET_SECONDS)
        keys = [self._key(processor, f"calls:{bucket - i}") for i in range(10)]
        await self.redis.delete(self._key(processor, "open_until"), *keys)
