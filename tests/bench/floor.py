"""The floor of any Python service here: a bare Litestar endpoint doing one durable INSERT on an
asyncpg pool, served exactly as the API is (uvicorn, uvloop, httptools, one process). Tessera's
payment rate is reported as a share of this one's request rate.

`python -m tests.bench.floor PORT DSN`
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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


def create_floor_app(dsn: str) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8)
        await app.state.pool.execute(TABLE)
        try:
            yield
        finally:
            await app.state.pool.close()

    @post("/floor", status_code=201)
    async def insert(request: Request[Any, Any, Any], data: Body) -> dict[str, str]:
        row_id = new_id("flr")
        await request.app.state.pool.execute(
            "INSERT INTO bench_floor (id, amount) VALUES ($1, $2)", row_id, data.amount
        )
        return {"id": row_id}

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar([insert, healthz], lifespan=[lifespan])


if __name__ == "__main__":
    port, dsn = int(sys.argv[1]), sys.argv[2]
    serve(
        create_floor_app(dsn),
        host="127.0.0.1",
        port=port,
        shutdown_timeout=5,
        log_level="warning",
    )
