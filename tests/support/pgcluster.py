"""Private Postgres clusters for the storage chaos campaigns: a primary, standbys made with
`pg_basebackup -R`, and the faults done to them (`pg_ctl stop -m immediate`, SIGKILL of every
server process, `pg_ctl promote`).

Each cluster lives in its own temporary directory owned by the `postgres` user (Postgres refuses
to run as root) and listens on a free loopback port with trust authentication, like the private
cluster `tessera dev` starts (`tessera.devstack`, whose binary lookup and run-as rules this
reuses). Nothing here touches the machine's own server on 5432.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from tessera.dbsetup import ServiceDatabase, ensure_roles_and_databases, service_dsn
from tessera.devstack import _find_binary, _run_as_args
from tessera.runtime.migrations import migrate
from tests.support.processes import free_port

#: Settings every private cluster starts with. `fsync=off`: these campaigns kill processes,
#: never the machine, so the page cache survives every fault and fsync would only cost time.
BASE_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "fsync": "off",
    "wal_level": "replica",
    "max_wal_senders": "8",
    "max_replication_slots": "8",
    "hot_standby": "on",
    "wal_keep_size": "256MB",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}


def _binary(name: str) -> str:
    found = _find_binary(name)
    if found is None:
        raise RuntimeError(
            f"{name} not found: install postgresql (Debian: apt-get install postgresql)"
        )
    return found


def _owner() -> tuple[int, int] | None:
    """The uid and gid Postgres runs as when we are root (None: as ourselves)."""
    run_as = _run_as_args()
    if not run_as:
        return None
    entry = pwd.getpwnam(run_as[2])
    return entry.pw_uid, entry.pw_gid


def _chown_tree(path: Path) -> None:
    owner = _owner()
    if owner is None:
        return
    for item in [path, *path.rglob("*")]:
        os.chown(item, *owner)


@dataclass
class PgCluster:
    """One Postgres server: its data directory, port and log, and what can be done to it."""

    base: Path
    port: int
    name: str
    #: Extra `-c name=value` settings given on every start.
    options: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.base / "postgres.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    # -- life cycle ------------------------------------------------------------------------

    @classmethod
    def initialise(cls, name: str = "primary", root: Path | None = None) -> PgCluster:
        """initdb a new cluster in a new temporary directory (not started)."""
        base = Path(tempfile.mkdtemp(prefix=f"tessera-pg-{name}-", dir=root))
        base.chmod(0o755)
        cluster = cls(base, free_port(), name)
        cluster.log_path.touch()
        _chown_tree(base)
        cluster._run(
            _binary("initdb"), "-D", str(cluster.data), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--no-instructions",
        )  # fmt: skip
        with (cluster.data / "postgresql.conf").open("a") as conf:
            for key, value in BASE_SETTINGS.items():
                conf.write(f"{key} = {value}\n")
            conf.write(f"unix_socket_directories = '{cluster.base}'\n")
        return cluster

    def standby(self, name: str = "standby", port: int | None = None) -> PgCluster:
        """A streaming standby of this (running) cluster: `pg_basebackup -R` writes its
        `standby.signal` and `primary_conninfo` (with `application_name=<name>`, the name
        `synchronous_standby_names` refers to). Not started. `port`: one chosen beforehand (a
        DSN may name the standby before it exists)."""
        base = Path(tempfile.mkdtemp(prefix=f"tessera-pg-{name}-", dir=self.base.parent))
        base.chmod(0o755)
        standby = PgCluster(base, port or free_port(), name)
        standby.log_path.touch()
        _chown_tree(base)
        conninfo = f"host=127.0.0.1 port={self.port} user=postgres application_name={name}"
        standby._run(
            _binary("pg_basebackup"), "-D", str(standby.data), "-d", conninfo, "-R",
            "-X", "stream", "--checkpoint=fast",
        )  # fmt: skip
        with (standby.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"unix_socket_directories = '{standby.base}'\n")
        return standby

    def start(self, timeout: float = 60) -> PgCluster:
        settings = {"port": str(self.port), **self.options}
        options = " ".join(f"-c {key}={value}" for key, value in settings.items())
        self._run(
            _binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options,
            "-w", "-t", str(int(timeout)), "start",
        )  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m <mode>`; `immediate` is the crash: no checkpoint, every backend
        dropped at once, crash recovery at the next start."""
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> list[int]:
        """SIGKILL the postmaster and every process it started, at once: the machine is gone.
        Returns the pids killed."""
        postmaster = self.pid()
        if postmaster is None:
            return []
        pids = [postmaster, *_children(postmaster)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.05)
        return pids

    def promote(self) -> None:
        """`pg_ctl promote -w`: the standby leaves recovery and takes writes."""
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-w", "promote")

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and _alive(pid)

    def pid(self) -> int | None:
        try:
            first = (self.data / "postmaster.pid").read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        return int(first) if first.strip().isdigit() else None

    def remove(self) -> None:
        """Stop it if it still runs and delete its directory."""
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    # -- SQL -------------------------------------------------------------------------------

    def sql(self, query: str, *args: Any, database: str = "postgres") -> Any:
        """One statement as the superuser; returns its rows."""

        async def run() -> Any:
            conn = await asyncpg.connect(self.admin_url, database=database, timeout=10)
            try:
                return await conn.fetch(query, *args)
            finally:
                await conn.close()

        return asyncio.run(run())

    def configure(self, **settings: str) -> None:
        """ALTER SYSTEM each setting and reload (e.g. `synchronous_standby_names`)."""
        for key, value in settings.items():
            self.sql(f"ALTER SYSTEM SET {key} = '{value}'")
        self.sql("SELECT pg_reload_conf()")

    def wait_for_standby(self, name: str, state: str = "streaming", timeout: float = 30) -> None:
        """Until the primary reports `name` connected and streaming (or `sync` state)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.sql(
                "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = $1",
                name,
            )
            if rows and (rows[0]["state"] == state or rows[0]["sync_state"] == state):
                return
            time.sleep(0.1)
        raise AssertionError(f"standby {name} not {state} after {timeout}s; see {self.log_path}")

    def in_recovery(self) -> bool:
        return bool(self.sql("SELECT pg_is_in_recovery() AS r")[0]["r"])

    def _run(self, *argv: str, check: bool = True) -> None:
        result = subprocess.run(
            [*_run_as_args(), *argv], capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({result.returncode}): {result.stderr[-2000:]}"
            )


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- the services' databases on private clusters ---------------------------------------------

API_DB = ServiceDatabase("api", "tessera_api")
VAULT_DB = ServiceDatabase("vault", "tessera_vault")


def prepare_databases(cluster: PgCluster, databases: Iterable[ServiceDatabase]) -> None:
    """Roles, databases and migrations, as `make setup` makes them, on a private cluster."""
    wanted = list(databases)

    async def prepare() -> None:
        await ensure_roles_and_databases(cluster.admin_url, wanted)
        for db in wanted:
            owner_url = service_dsn(cluster.admin_url, db.owner, db.database)
            await migrate(owner_url, f"{db.service}.migrations")

    asyncio.run(prepare())


def multi_host_dsn(ports: Iterable[int], role: str, database: str, **params: str) -> str:
    """`postgresql://role@h1:p1,h2:p2/db?target_session_attrs=read-write&...`: libpq's (and
    asyncpg's) multi-host form; a client tries each host in turn and keeps the first one whose
    session matches."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    query = "&".join(
        f"{k}={v}" for k, v in {"target_session_attrs": "read-write", **params}.items()
    )
    return f"postgresql://{role}@{hosts}/{database}?{query}"


def service_env(
    api: str | Iterable[int], vault: str | Iterable[int] | None = None
) -> dict[str, str]:
    """The services' database settings on private clusters: one cluster's admin URL, or the
    ports of a primary and its standbys for a multi-host DSN (failover)."""
    env = {}
    for db, where in ((API_DB, api), (VAULT_DB, vault if vault is not None else api)):
        prefix = f"TESSERA_{db.service.upper()}_"
        if isinstance(where, str):
            env[prefix + "DATABASE_URL"] = service_dsn(where, db.runtime, db.database)
            env[prefix + "MIGRATION_URL"] = service_dsn(where, db.owner, db.database)
        else:
            ports = list(where)
            env[prefix + "DATABASE_URL"] = multi_host_dsn(ports, db.runtime, db.database)
            env[prefix + "MIGRATION_URL"] = multi_host_dsn(ports, db.owner, db.database)
    return env
