"""tessera.runtime.http_client.HttpClient against a real local HTTP server: a kept-alive client
reuses its connection, one made with `keep_alive=False` opens and closes one per request."""

from __future__ import annotations

import pytest
from aiohttp import web

from tessera.runtime.http_client import HttpClient


@pytest.mark.parametrize(("keep_alive", "connections"), [(True, 1), (False, 3)])
async def test_a_client_keeps_its_connection_only_if_told_to(
    keep_alive: bool, connections: int
) -> None:
    peers: set[object] = set()

    async def hello(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = HttpClient(f"http://127.0.0.1:{port}", timeout_seconds=5, keep_alive=keep_alive)
    try:
        for _ in range(3):
            reply = await client.request("GET", "/hello")
            assert reply.json() == {"ok": True}
    finally:
        await client.close()
        await runner.cleanup()
    assert len(peers) == connections
