"""A private `redis-server` for the Redis chaos campaign: a free loopback port, no persistence
(no RDB, no AOF), so `kill -9` loses everything, as a cache node's death does. FLUSHALL and
CLIENT PAUSE are done here, never to the machine's shared Redis on 6379."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.processes import free_port


@dataclass
class RedisServer:
    port: int = field(default_factory=free_port)
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tessera-redis-")))
    process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def arguments(self) -> list[str]:
        """What this server adds to the command line (a cluster node: its cluster options)."""
        return []

    def start(self, timeout: float = 10) -> RedisServer:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server not found (Debian: apt-get install redis-server)")
        self.base.mkdir(parents=True, exist_ok=True)
        log = (self.base / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                server, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.base),
                "--save", "", "--appendonly", "no", "--daemonize", "no", *self.arguments(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.base / 'redis.log').read_text()}")
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not answer")

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    def kill(self) -> None:
        """kill -9: without persistence every key is gone."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def pause(self, seconds: float) -> None:
        """CLIENT PAUSE ALL: every client's commands wait (the server answers none) this long."""
        with self.client() as client:
            client.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")

    def keys(self, pattern: str, db: int = 0) -> list[bytes]:
        with self.client(db) as client:
            return list(client.scan_iter(match=pattern, count=1000))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)
