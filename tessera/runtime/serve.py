"""Run an ASGI app under uvicorn + uvloop, with graceful shutdown.

On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish (up to the
service's shutdown timeout), then runs the lifespan shutdown that closes the pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess


def serve(
    app: Any,
    *,
    host: str,
    port: int,
    shutdown_timeout: float,
    log_level: str,
    keep_alive: int = 75,
    workers: int = 1,
    factory: str | None = None,
    extra_ports: Sequence[int] = (),
) -> None:
    """With `workers` > 1, uvicorn's supervisor starts that many processes, each building the
    app from `factory` ("module:function", called with no arguments) on the shared sockets.
    `extra_ports` are bound too, for the same app (the app tells its listeners apart by the
    local port of each connection)."""
    target: Any = app
    if workers > 1:
        if factory is None:
            raise ValueError("several workers need an app factory path")
        target = factory
    config = uvicorn.Config(
        target,
        factory=workers > 1,
        workers=workers,
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
    sockets = None
    if workers > 1 or extra_ports:
        sockets = []
        for each in (port, *extra_ports):
            config.port = each
            sockets.append(config.bind_socket())
    if workers > 1:
        Multiprocess(config, sockets=sockets or []).run()
        return
    server = uvicorn.Server(config)
    server.run(sockets)
    if not server.started:
        raise SystemExit(3)
