"""Run an ASGI app under uvicorn + uvloop, with graceful shutdown.

On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish (up to the
service's shutdown timeout), then runs the lifespan shutdown that closes the pools.
"""

from __future__ import annotations

from typing import Any

import uvicorn


def serve(
    app: Any,
    *,
    host: str,
    port: int,
    shutdown_timeout: float,
    log_level: str,
    keep_alive: int = 75,
) -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,
        log_level=log_level,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(shutdown_timeout),
        timeout_keep_alive=keep_alive,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise SystemExit(3)
