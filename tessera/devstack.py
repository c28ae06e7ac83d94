"""The local stack behind `make run`, `make up`, `make down` and `make test`.

It makes sure Postgres and Redis answer (starting private instances under `.run/` from the
machine's binaries when the configured ones do not), creates the databases and roles, applies
migrations, starts every service, seeds a demo merchant and prints where everything is.
Development only: production runs each piece on its own platform (see deploy/).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

from tessera.dbsetup import default_databases, ensure_roles_and_databases, service_dsn

ROOT = Path(os.environ.get("TESSERA_ROOT", Path.cwd()))
RUN = ROOT / ".run"
LOGS = RUN / "logs"
PIDS = RUN / "pids"

DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"


class StackError(Exception):
    """Set-up cannot go on; the message says what to do."""


def say(message: str) -> None:
    print(f"tessera dev: {message}", flush=True)


# --- configuration -------------------------------------------------------------------------


@dataclass
class StackConfig:
    pg_admin_url: str
    redis_url: str
    api_port: int
    vault_port: int
    psp_a_port: int
    psp_b_port: int = 8202
    demo_port: int = 8300
    host: str = "127.0.0.1"

    @property
    def demo_origin(self) -> str:
        return f"http://{self.host}:{self.demo_port}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StackConfig:
        env = dict(os.environ if env is None else env)
        return cls(
            pg_admin_url=env.get("TESSERA_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL),
            redis_url=env.get("TESSERA_REDIS_URL", DEFAULT_REDIS_URL).rstrip("/"),
            api_port=int(env.get("TESSERA_API_PORT", "8000")),
            vault_port=int(env.get("TESSERA_VAULT_PORT", "8100")),
            psp_a_port=int(env.get("TESSERA_PSP_A_PORT", "8201")),
            psp_b_port=int(env.get("TESSERA_PSP_B_PORT", "8202")),
            demo_port=int(env.get("TESSERA_DEMO_PORT", "8300")),
        )

    def redis_db(self, index: int) -> str:
        return f"{self.redis_url}/{index}"


def dev_secrets() -> dict[str, str]:
    """Random development credentials, made once and kept in `.run/dev.env` (git-ignored)."""
    path = RUN / "dev.env"
    if path.exists():
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return {k: v for k, v in pairs}
    service_token = secrets.token_urlsafe(32)
    values = {
        "TESSERA_VAULT_ADMIN_TOKEN": secrets.token_urlsafe(32),
        "TESSERA_VAULT_SERVICE_TOKEN": service_token,
        "TESSERA_API_VAULT_SERVICE_TOKEN": service_token,
    }
    RUN.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    return values


def service_env(config: StackConfig) -> dict[str, str]:
    """The environment every service process of the stack gets (explicit settings win)."""
    env = dict(os.environ)
    defaults = {
        "TESSERA_MODE": "development",
        "TESSERA_API_HOST": config.host,
        "TESSERA_API_PORT": str(config.api_port),
        "TESSERA_API_DATABASE_URL": service_dsn(config.pg_admin_url, "tessera_api", "tessera_api"),
        "TESSERA_API_MIGRATION_URL": service_dsn(
            config.pg_admin_url, "tessera_api_owner", "tessera_api"
        ),
        "TESSERA_API_REDIS_URL": config.redis_db(0),
        "TESSERA_API_VAULT_URL": f"http://{config.host}:{config.vault_port}",
        "TESSERA_API_PSP_A_URL": f"http://{config.host}:{config.psp_a_port}",
        "TESSERA_API_PSP_B_URL": f"http://{config.host}:{config.psp_b_port}",
        # The demo shows a card update within seconds (production reads the lists every 5 min).
        "TESSERA_API_CARD_UPDATE_POLL_SECONDS": "5",
        "TESSERA_PSP_B_HOST": config.host,
        "TESSERA_PSP_B_PORT": str(config.psp_b_port),
        "TESSERA_PSP_B_NOTIFY_URL": f"http://{config.host}:{config.api_port}/v1/notifications/psp_b",
        "TESSERA_VAULT_HOST": config.host,
        "TESSERA_VAULT_PORT": str(config.vault_port),
        "TESSERA_VAULT_DATABASE_URL": service_dsn(
            config.pg_admin_url, "tessera_vault", "tessera_vault"
        ),
        "TESSERA_VAULT_MIGRATION_URL": service_dsn(
            config.pg_admin_url, "tessera_vault_owner", "tessera_vault"
        ),
        "TESSERA_VAULT_REDIS_URL": config.redis_db(1),
        "TESSERA_VAULT_FORWARD_DESTINATIONS": json.dumps(
            {
                "psp_a": {
                    "url": f"http://{config.host}:{config.psp_a_port}",
                    "paths": ["/v1/authorizations"],
                    "card_update_paths": ["/v1/account_updates/card"],
                },
                "psp_b": {
                    "url": f"http://{config.host}:{config.psp_b_port}",
                    "paths": ["/v1/payments"],
                    "card_update_paths": ["/v1/cardUpdates/details"],
                },
            }
        ),
        "TESSERA_PSP_A_HOST": config.host,
        "TESSERA_PSP_A_PORT": str(config.psp_a_port),
        **dev_secrets(),
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


# --- Postgres and Redis --------------------------------------------------------------------


def _find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


async def _pg_answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (TimeoutError, OSError):
        return False
    except asyncpg.PostgresError as exc:
        raise StackError(f"Postgres at {_where(dsn)} answered but refused us: {exc}") from None
    await conn.close()
    return True


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def _run_as_args() -> list[str]:
    """Postgres refuses to run as root: when we are root, run it as `postgres` (or nobody)."""
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"]
    raise StackError("running as root and no unprivileged user to run Postgres as")


def _make_traversable(path: Path) -> None:
    """Let the unprivileged Postgres user reach `path`: add only the search bit (o+x) to the
    folders above it that lack it (a clone in a 0700 temp folder, say); nothing becomes
    listable or readable."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & 0o001:
            say(f"allowing the postgres user to traverse {folder} (chmod o+x)")
            folder.chmod(mode | 0o001)


def _chown_for_postgres(path: Path) -> None:
    if os.geteuid() != 0:
        return
    user = _run_as_args()[2]
    entry = pwd.getpwnam(user)
    for item in [path, *path.rglob("*")]:
        os.chown(item, entry.pw_uid, entry.pw_gid)


def start_private_postgres(dsn: str, base: Path = RUN / "pg") -> None:
    """initdb + pg_ctl under `base`, listening where `dsn` points (trust auth on loopback)."""
    initdb, pg_ctl = _find_binary("initdb"), _find_binary("pg_ctl")
    if not initdb or not pg_ctl:
        raise StackError(
            f"nothing answers at {_where(dsn)} and no PostgreSQL binaries were found. "
            "Install them (Debian: `apt-get install postgresql postgresql-client`) or point "
            "TESSERA_PG_ADMIN_URL at a running server."
        )
    parts = urlsplit(dsn)
    data, sock = base / "data", base / "sock"
    base.mkdir(parents=True, exist_ok=True)
    sock.mkdir(exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    log_file = LOGS / "postgres.log"
    log_file.touch()
    if os.geteuid() == 0:
        _make_traversable(base)
        _make_traversable(LOGS)
    _chown_for_postgres(base)
    _chown_for_postgres(log_file)
    run_as = _run_as_args()
    superuser = parts.username or "postgres"
    if not (data / "PG_VERSION").exists():
        say(f"initialising a private Postgres cluster in {data}")
        subprocess.run(
            [*run_as, initdb, "-D", str(data), "-U", superuser, "--auth=trust", "-E", "UTF8"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    say(f"starting a private Postgres on {_where(dsn)} (log: {log_file})")
    options = (
        f"-p {parts.port or 5432} -c listen_addresses={parts.hostname} "
        f"-c unix_socket_directories={sock} -c max_connections=200"
    )
    subprocess.run(
        [*run_as, pg_ctl, "-D", str(data), "-l", str(log_file), "-o", options, "-w", "start"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (base / "started-by-tessera").write_text(str(data))


def stop_private_postgres(base: Path = RUN / "pg") -> None:
    marker = base / "started-by-tessera"
    pg_ctl = _find_binary("pg_ctl")
    if not marker.exists() or not pg_ctl:
        return
    say("stopping the private Postgres")
    subprocess.run(
        [*_run_as_args(), pg_ctl, "-D", str(base / "data"), "-m", "fast", "-w", "stop"],
        check=False,
        stdout=subprocess.DEVNULL,
    )
    marker.unlink(missing_ok=True)


def _redis_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 6379), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def start_private_redis(url: str, base: Path = RUN / "redis") -> None:
    server = shutil.which("redis-server")
    if not server:
        raise StackError(
            f"nothing answers at {_where(url)} and `redis-server` was not found. "
            "Install it (Debian: `apt-get install redis-server`) or point TESSERA_REDIS_URL "
            "at a running server."
        )
    parts = urlsplit(url)
    base.mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    say(f"starting a private Redis on {_where(url)} (log: {LOGS / 'redis.log'})")
    subprocess.run(
        [
            server,
            "--bind", parts.hostname or "127.0.0.1",
            "--port", str(parts.port or 6379),
            "--daemonize", "yes",
            "--dir", str(base),
            "--pidfile", str(base / "redis.pid"),
            "--logfile", str(LOGS / "redis.log"),
            "--save", "",
            "--appendonly", "no",
        ],
        check=True,
    )  # fmt: skip
    for _ in range(50):
        if _redis_answers(url):
            (base / "started-by-tessera").write_text(url)
            return
        time.sleep(0.1)
    raise StackError(f"the private Redis did not answer; see {LOGS / 'redis.log'}")


def stop_private_redis(base: Path = RUN / "redis") -> None:
    marker = base / "started-by-tessera"
    pid_file = base / "redis.pid"
    if not marker.exists():
        return
    say("stopping the private Redis")
    if pid_file.exists():
        _terminate(int(pid_file.read_text().strip()), timeout=10)
    marker.unlink(missing_ok=True)


def ensure_backing_services(config: StackConfig) -> None:
    if not asyncio.run(_pg_answers(config.pg_admin_url)):
        say(f"no Postgres answers at {_where(config.pg_admin_url)}")
        start_private_postgres(config.pg_admin_url)
        if not asyncio.run(_pg_answers(config.pg_admin_url)):
            raise StackError(f"the private Postgres did not answer; see {LOGS / 'postgres.log'}")
    if not _redis_answers(config.redis_url):
        say(f"no Redis answers at {_where(config.redis_url)}")
        start_private_redis(config.redis_url)


def setup(config: StackConfig) -> dict[str, str]:
    """Everything before the services start; returns the services' environment."""
    ensure_backing_services(config)
    asyncio.run(ensure_roles_and_databases(config.pg_admin_url, default_databases()))
    env = service_env(config)
    subprocess.run([sys.executable, "-m", "vault", "init-kms"], env=env, check=True)
    for service in ("vault", "api"):
        subprocess.run([sys.executable, "-m", service, "migrate"], env=env, check=True)
    return env


# --- the service processes -----------------------------------------------------------------


@dataclass
class Service:
    name: str
    argv: list[str]
    url: str
    probe: str

    @property
    def pid_file(self) -> Path:
        return PIDS / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return LOGS / f"{self.name}.log"


def services(config: StackConfig) -> list[Service]:
    base = f"http://{config.host}"
    py = sys.executable
    return [
        Service("vault", [py, "-m", "vault", "serve"], f"{base}:{config.vault_port}", "/readyz"),
        Service("psp-a", [py, "-m", "sandbox.psp_a"], f"{base}:{config.psp_a_port}", "/healthz"),
        Service("psp-b", [py, "-m", "sandbox.psp_b"], f"{base}:{config.psp_b_port}", "/healthz"),
        Service("api", [py, "-m", "api", "serve"], f"{base}:{config.api_port}", "/readyz"),
        Service("worker", [py, "-m", "api", "worker"], "", ""),
    ]


def vault_worker() -> Service:
    """The vault's worker, started once the demo merchant exists (`vault_worker_env`)."""
    return Service("vault-worker", [sys.executable, "-m", "vault", "worker"], "", "")


def vault_worker_env(
    config: StackConfig, env: dict[str, str], demo: dict[str, str]
) -> dict[str, str]:
    """Its payment-page check (vault/watchdog.py) fetches the card fields as the demo checkout
    does: with the demo merchant's publishable key and origin."""
    return {
        **env,
        "TESSERA_VAULT_SCRIPTS_CHECK_PUBLISHABLE_KEY": demo["publishable_key"],
        "TESSERA_VAULT_SCRIPTS_CHECK_ORIGIN": config.demo_origin,
    }


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_ready(service: Service, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(
                f"{service.name} exited with code {process.returncode}; see {service.log_file}"
            )
        if not service.probe:  # no HTTP port (the workers): alive for a second is ready
            if time.monotonic() > deadline - timeout + 1:
                return
        elif _answers(service.url + service.probe):
            return
        time.sleep(0.1)
    raise StackError(f"{service.name} did not answer {service.probe} in {timeout:.0f}s")


def _port_taken(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((parts.hostname or "127.0.0.1", parts.port or 80)) == 0


@dataclass
class Running:
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
        return iter(self.processes.items())


def start_services(config: StackConfig, env: dict[str, str], *, detach: bool) -> Running:
    LOGS.mkdir(parents=True, exist_ok=True)
    PIDS.mkdir(parents=True, exist_ok=True)
    running = Running()
    try:
        for service in services(config):
            start_one(service, env, running, detach=detach)
    except BaseException:
        stop_processes(running)
        raise
    return running


def start_one(service: Service, env: dict[str, str], running: Running, *, detach: bool) -> None:
    if service.url and _port_taken(service.url):
        raise StackError(f"{service.url} is already taken (another `make up`? run `make down`)")
    log = service.log_file.open("ab")
    process = subprocess.Popen(
        service.argv,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=detach,
    )
    running.processes[service.name] = process
    service.pid_file.write_text(str(process.pid))
    wait_until_ready(service, process, timeout=30)
    say(f"{service.name} ready" + (f" at {service.url}" if service.url else ""))


def demo_shop(config: StackConfig) -> Service:
    """The demo merchant's checkout (sandbox/merchant_demo), started once its keys exist."""
    argv = [sys.executable, "-m", "sandbox.merchant_demo"]
    return Service("shop", argv, config.demo_origin, "/healthz")


def demo_shop_env(config: StackConfig, env: dict[str, str], demo: dict[str, str]) -> dict[str, str]:
    return {
        **env,
        "TESSERA_DEMO_PORT": str(config.demo_port),
        "TESSERA_DEMO_API_URL": f"http://{config.host}:{config.api_port}",
        "TESSERA_DEMO_VAULT_URL": f"http://{config.host}:{config.vault_port}",
        "TESSERA_DEMO_PUBLISHABLE_KEY": demo["publishable_key"],
        "TESSERA_DEMO_SECRET_KEY": demo["secret_key"],
    }


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with _suppress_lookup():
        os.kill(pid, signal.SIGKILL)


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return kind is ProcessLookupError


def stop_processes(running: Running) -> None:
    for name, process in reversed(list(running)):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=25)
            except subprocess.TimeoutExpired:
                process.kill()
        (PIDS / f"{name}.pid").unlink(missing_ok=True)


def down() -> None:
    """Stop what `make up` started (by pid file) and the private Postgres/Redis, nothing else."""
    stopped = 0
    if PIDS.exists():
        for pid_file in sorted(PIDS.glob("*.pid")):
            pid = int(pid_file.read_text().strip() or 0)
            if pid > 0 and _is_ours(pid):
                _terminate(pid, timeout=25)
                stopped += 1
            pid_file.unlink(missing_ok=True)
    stop_private_redis()
    stop_private_postgres()
    say(f"stopped {stopped} service process(es)")


def _is_ours(pid: int) -> bool:
    """Only signal a pid that still runs one of our services (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    text = b" ".join(cmdline)
    markers = (b"-m vault", b"-m api", b"-m sandbox.psp", b"-m sandbox.merchant_demo")
    return any(marker in text for marker in markers)


# --- the demo merchant ---------------------------------------------------------------------


def seed_demo_merchant(env: dict[str, str], origin: str) -> dict[str, str]:
    """Create the demo merchant once; later runs reuse it (its keys are kept in .run/)."""
    path = RUN / "demo.json"
    if path.exists():
        demo: dict[str, str] = json.loads(path.read_text())
        if asyncio.run(_merchant_exists(env["TESSERA_API_DATABASE_URL"], demo["merchant_id"])):
            return demo
    result = subprocess.run(
        [
            sys.executable, "-m", "api", "merchants", "create",
            "--name", "Demo shop", "--origin", origin, "--json",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )  # fmt: skip
    demo = json.loads(result.stdout)
    path.write_text(json.dumps(demo, indent=2) + "\n")
    path.chmod(0o600)
    return demo


async def _merchant_exists(dsn: str, merchant_id: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM merchants WHERE id = $1", merchant_id))
    finally:
        await conn.close()


def banner(config: StackConfig, demo: dict[str, str]) -> str:
    host = config.host
    return "\n".join(
        [
            "",
            "Tessera is running (development mode)",
            f"  payment API    http://{host}:{config.api_port}   (OpenAPI: /schema)",
            f"  vault          http://{host}:{config.vault_port}",
            f"  PSP simulators http://{host}:{config.psp_a_port}   (psp_a)",
            f"                 http://{host}:{config.psp_b_port}   (psp_b)",
            "  worker         reconciler, completer, expiry, webhooks (no port)",
            "  vault worker   retention sweep, payment-page check, audit-chain check (no port)",
            f"  demo checkout  {config.demo_origin}/   <- open this first "
            "(test card 4242 4242 4242 4242)",
            f"  logs           {LOGS}/",
            "Demo merchant",
            f"  merchant id      {demo['merchant_id']}",
            f"  secret key       {demo['secret_key']}",
            f"  publishable key  {demo['publishable_key']}",
            "",
        ]
    )


# --- entry points --------------------------------------------------------------------------


def run(*, detach: bool) -> int:
    config = StackConfig.from_env()
    try:
        env = setup(config)
        running = start_services(config, env, detach=detach)
        try:
            demo = seed_demo_merchant(env, config.demo_origin)
            worker_env = vault_worker_env(config, env, demo)
            start_one(vault_worker(), worker_env, running, detach=detach)
            start_one(demo_shop(config), demo_shop_env(config, env, demo), running, detach=detach)
        except (subprocess.CalledProcessError, StackError):
            stop_processes(running)
            raise
    except StackError as exc:
        say(str(exc))
        return 1
    except subprocess.CalledProcessError as exc:
        say(f"a set-up step failed: {' '.join(map(str, exc.cmd[:4]))}: {exc.stderr or ''}")
        return 1
    print(banner(config, demo), flush=True)
    if detach:
        say("running in the background; `make down` stops it")
        return 0
    say("press Ctrl-C to stop (logs are in .run/logs/)")
    return _supervise(running)


def _supervise(running: Running) -> int:
    stop = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    code = 0
    tails = {name: (LOGS / f"{name}.log").open("rb") for name, _ in running}
    for handle in tails.values():
        handle.seek(0, os.SEEK_END)
    while not stop:
        for name, handle in tails.items():
            for line in handle.readlines():
                sys.stdout.write(f"{name:>6} | {line.decode(errors='replace')}")
        sys.stdout.flush()
        for name, process in running:
            if process.poll() is not None:
                say(f"{name} exited with code {process.returncode}; stopping the stack")
                stop, code = True, 1
        time.sleep(0.2)
    say("stopping")
    stop_processes(running)
    return code


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "run"
    if command == "run":
        return run(detach=False)
    if command == "up":
        return run(detach=True)
    if command == "down":
        down()
        return 0
    if command == "setup":
        try:
            setup(StackConfig.from_env())
        except StackError as exc:
            say(str(exc))
            return 1
        return 0
    say(f"unknown command {command!r}: use run, up, down or setup")
    return 2
