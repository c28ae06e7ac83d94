"""The floor of any Python service here: a bare Litestar endpoint doing one durable INSERT on an
asyncpg pool, served exactly as the API is (uvicorn, uvloop, httptools, one process). Tessera's
payment rate is reported as a share of this one's request rate.

The same app chained three times is the floor of Tessera's *shape*: a payment must cross the API
(one durable write), the vault (one durable write: the audit record) and a PSP, each hop a Python
HTTP service on the same two cores. No implementation of that shape can beat the chain's rate, so
it says how far any goal above it is out of reach on this machine.

`python -m tests.bench.floor PORT DSN|- [NEXT_URL]`: `-` writes nothing; NEXT_URL forwards each
request there (aiohttp, one kept-alive pool, as the API calls the vault) after the INSERT.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import msgspec
from litestar import Litestar, Request, get, post

from core.ids import new_id
from tessera.runtime.serve import serve

TABLE = (
    "CREATE TABLE IF NOT EXISTS bench_floor (id text PRIMARY KEY, amount bigint NOT NULL, "
    "created_at timestamptz NOT NULL DEFAULT now())"
)


class Body(msgspec.Struct):
    amount: int


def create_floor_app(dsn: str | None, next_url: str | None = None) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.pool = None
        app.state.session = None
        if dsn:
            app.state.pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8)
            await app.state.pool.execute(TABLE)
        if next_url:
            app.state.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
            )
        try:
            yield
        finally:
            if app.state.session is not None:
                await app.state.session.close()
            if app.state.pool is not None:
                await app.state.pool.close()

    @post("/floor", status_code=201)
    async def insert(request: Request[Any, Any, Any], data: Body) -> dict[str, str]:
        row_id = new_id("flr")
        if request.app.state.pool is not None:
            await request.app.state.pool.execute(
                "INSERT INTO bench_floor (id, amount) VALUES ($1, $2)", row_id, data.amount
            )
        if next_url:
            payload = msgspec.json.encode(data)
            headers = {"content-type": "application/json"}
            async with request.app.state.session.post(
                next_url, data=payload, headers=headers
            ) as answer:
                await answer.read()
                if answer.status != 201:
                    raise RuntimeError(f"next hop answered {answer.status}")
        return {"id": row_id}

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar([insert, healthz], lifespan=[lifespan])


if __name__ == "__main__":
    port, dsn = int(sys.argv[1]), sys.argv[2]
    serve(
        create_floor_app(None if dsn == "-" else dsn, sys.argv[3] if len(sys.argv) > 3 else None),
        host="127.0.0.1",
        port=port,
        shutdown_timeout=5,
        log_level="warning",
    )
