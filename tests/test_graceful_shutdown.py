"""SIGTERM lets in-flight requests finish before the process exits.

A request is held in flight by locking the table `/readyz` reads; the process gets SIGTERM
while the request waits, the lock is released, and the request must still succeed.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from tessera.dbsetup import ServiceDatabase
from tests.conftest import dsn, start_service


@pytest.mark.parametrize("module", ["api", "vault"])
async def test_in_flight_requests_finish_after_sigterm(
    module: str,
    databases: dict[str, ServiceDatabase],
    vault_env: dict[str, str],
    api_env: dict[str, str],
    tmp_path: Path,
) -> None:
    env = api_env if module == "api" else vault_env
    process = start_service(module, env, tmp_path)
    db = databases[module]
    locker = await asyncpg.connect(dsn(db.owner, db.database))
    result: dict[str, object] = {}

    def slow_request() -> None:
        try:
            result["response"] = httpx.get(process.url + "/readyz", timeout=15)
        except httpx.HTTPError as exc:
            result["error"] = exc

    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
            client = threading.Thread(target=slow_request)
            client.start()
            time.sleep(0.5)  # the request is now waiting on the lock
            assert process.process is not None
            process.process.terminate()
            time.sleep(0.5)
            assert process.process.poll() is None, "exited while a request was in flight"
        client.join(timeout=15)
    finally:
        await locker.close()
    exit_code = process.stop()
    response = result.get("response")
    assert isinstance(response, httpx.Response), result
    assert response.status_code == 200
    # uvicorn re-raises the SIGTERM once shutdown is complete, as process managers expect.
    assert exit_code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in process.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(process.url + "/healthz", timeout=2)


def _children(pid: int) -> set[int]:
    """Serving worker processes (not multiprocessing's resource tracker)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {
        int(p)
        for p in text.split()
        if b"multiprocessing.spawn" in Path(f"/proc/{p}/cmdline").read_bytes()
    }


@pytest.mark.parametrize("module", ["api", "vault"])
def test_a_service_runs_several_worker_processes_and_stops_them_all(
    module: str, api_env: dict[str, str], vault_env: dict[str, str], tmp_path: Path
) -> None:
    """`TESSERA_<SERVICE>_WORKERS=2`: a supervisor with two serving children on one port;
    SIGTERM to the supervisor stops both (what `make bench` measures)."""
    env = api_env if module == "api" else vault_env
    variable = f"TESSERA_{module.upper()}_WORKERS"
    process = start_service(module, {**env, variable: "2"}, tmp_path)
    assert process.process is not None
    supervisor = process.process.pid
    try:
        deadline = time.monotonic() + 20
        while len(_children(supervisor)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(supervisor)
        assert len(workers) == 2
        with httpx.Client(base_url=process.url) as client:
            for _ in range(20):
                assert client.get("/readyz").status_code == 200
    finally:
        exit_code = process.stop()
    assert exit_code in (0, -signal.SIGTERM)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived"
