"""Service processes forked from a warm parent, for tests that start dozens of them.

`python -m api serve` spends about 1.5 s of CPU importing third-party packages (litestar, redis,
aiohttp, ...) before it runs a line of Tessera. A campaign that kills a process at every step
pays that for each kill. Here the standard library's fork server imports those packages once;
each service process is forked from it and then runs exactly what `python -m api serve` runs,
with its own environment, so Tessera's modules (and `TESSERA_FAILPOINTS`, read at import) are
loaded fresh in every process. The processes are as real as any: own address space, own
sockets, killed by real signals.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import httpx

from tests.support.processes import ROOT, ServiceProcess

#: Imported once by the fork server: third-party only. Nothing of Tessera's may be here, since
#: its modules read the environment (failpoints) when they are imported.
PRELOAD = [
    "argparse",
    "aiohttp",
    "asyncpg",
    "cachetools",
    "cryptography.hazmat.primitives.ciphers.aead",
    "httpx",
    "litestar",
    "litestar._kwargs",
    "litestar._openapi.plugin",
    "msgspec",
    "polyfactory.factories",  # litestar imports these (and faker, pydantic) on building an app
    "prometheus_client",
    "pydantic",
    "redis.asyncio",
    "structlog",
    "uvicorn",
    "uvloop",
]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)
_FORKING = threading.Lock()


def _run(module: str, args: list[str], env: dict[str, str], log_path: str) -> None:
    """In the forked child: the service's output to its log, its environment, then the
    module's `__main__`, as `python -m module args...` would run it."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


@dataclass
class WarmProcess(ServiceProcess):
    """A `ServiceProcess` forked from the warm fork server instead of exec'd afresh."""

    child: BaseProcess | None = None

    def start(self, ready_path: str = "/readyz", timeout: float = 20) -> WarmProcess:
        env = {**os.environ, **self.env}
        self.log_path.touch()
        child = _CONTEXT.Process(
            target=_run, args=(self.module, self.args, env, str(self.log_path)), daemon=False
        )
        with _FORKING:
            child.start()
        self.child = child
        if not ready_path:
            return self
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1) as http:  # one client: each httpx.get costs ~40 ms of CPU
            while time.monotonic() < deadline:
                if not child.is_alive():
                    raise RuntimeError(f"{self.module} exited early:\n{self.output()}")
                try:
                    if http.get(self.url + ready_path).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.module} was not ready in {timeout}s:\n{self.output()}")

    def exit_code(self, timeout: float) -> int | None:
        """The exit code once it ended (a negative signal number if killed), or None."""
        assert self.child is not None
        self.child.join(timeout)
        return self.child.exitcode

    def stop(self, timeout: float = 20) -> int:
        assert self.child is not None
        if self.child.is_alive() and self.child.pid is not None:
            os.kill(self.child.pid, signal.SIGTERM)
            self.child.join(timeout)
            if self.child.is_alive():
                self.child.kill()
                self.child.join()
        return self.child.exitcode or 0
