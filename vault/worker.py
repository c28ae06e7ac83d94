"""`python -m vault worker` (`tessera vault worker`): the vault's periodic jobs.

A job is a name, an interval and an async function of a `WorkerContext`; `jobs()` lists them.
Several workers may run (Kubernetes keeps two): a job runs in one of them at a time and once per
interval across all of them, because a worker runs a job only after claiming it in the
`worker_jobs` table (one conditional UPSERT: due, and nobody holds an unexpired lease). A worker
that dies mid-run lets its lease expire, and another takes the job then. Jobs still make their
own writes safe to repeat or to race (the retention sweep claims tokens with SKIP LOCKED), since
a lease can expire under a job that overruns it.

SIGTERM or SIGINT: the running job is told (`ctx.stopping`) and stops after its current batch;
the worker exits. The heartbeat file (`TESSERA_VAULT_WORKER_HEARTBEAT_PATH`) is touched after
every poll and every batch, so a liveness probe can tell a stuck worker from a busy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tessera.runtime.db import create_pool
from tessera.runtime.logging import get_logger
from tessera.runtime.redis_client import RedisClient
from tessera.runtime.redis_client import connect as connect_redis
from vault.audit import AuditLog
from vault.keys import KeyRepository, KeyService
from vault.kms.base import KeyManagementService
from vault.settings import VaultWorkerSettings

log = get_logger("tessera.vault.worker")


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class JobResult:
    """What a run did: a count for the log, and a few JSON-ready facts."""

    done: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerContext:
    """What every job is given. `now()` is the clock a job judges by (injectable in tests)."""

    settings: VaultWorkerSettings
    pool: Any
    redis: RedisClient
    kms: KeyManagementService
    keys: KeyService
    audit: AuditLog
    http: httpx.AsyncClient
    clock: Callable[[], datetime.datetime] = utcnow
    #: Set on SIGTERM: a long job checks it between batches and returns early.
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def now(self) -> datetime.datetime:
        return self.clock()

    @property
    def stopping(self) -> bool:
        return self.stop.is_set()

    async def beat(self) -> None:
        """Touch the heartbeat file (jobs call it between batches: busy is not stuck)."""
        path = self.settings.worker_heartbeat_path
        if path:
            try:
                await asyncio.to_thread(Path(path).touch)
            except OSError as exc:
                log.warning("heartbeat_failed", error=type(exc).__name__)


@dataclass(frozen=True)
class Job:
    name: str
    interval_seconds: float
    run: Callable[[WorkerContext], Awaitable[JobResult]]
    #: How long a claim holds before another worker may take the job (a crashed holder).
    lease_seconds: float = 900.0


def jobs(settings: VaultWorkerSettings) -> tuple[Job, ...]:
    """Every job, registered here, one line each."""
    from vault import retention, watchdog

    # The watch over the payment page and the audit chains first: quick, and what alerts hang on.
    return (
        Job("scripts", settings.scripts_check_interval_seconds, watchdog.check_scripts),
        Job(
            "audit_verify",
            settings.audit_verify_interval_seconds,
            watchdog.verify_audit_chain,
            lease_seconds=3600.0,  # a long log takes a while to walk
        ),
        Job("retention", settings.retention_interval_seconds, retention.sweep),
    )


#: A worker that fails a job tries again after this long (or its interval, if shorter).
RETRY_SECONDS = 60.0

_CLAIM = """
INSERT INTO worker_jobs AS j (name, next_run_at, locked_until, locked_by, last_started_at)
VALUES ($1, now() + make_interval(secs => $2), now() + make_interval(secs => $3), $4, now())
ON CONFLICT (name) DO UPDATE
SET next_run_at = EXCLUDED.next_run_at, locked_until = EXCLUDED.locked_until,
    locked_by = EXCLUDED.locked_by, last_started_at = EXCLUDED.last_started_at
WHERE j.next_run_at <= now() AND j.locked_until <= now()
RETURNING j.name
"""
_RELEASE = """
UPDATE worker_jobs
SET locked_until = now(), last_finished_at = now(), last_outcome = $3,
    next_run_at = CASE WHEN $3 = 'failed'
                       THEN least(next_run_at, now() + make_interval(secs => $4))
                       ELSE next_run_at END
WHERE name = $1 AND locked_by = $2
"""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def claim(pool: Any, job: Job, holder: str) -> bool:
    """Whether this worker now holds `job` (it was due and nobody held it)."""
    name = await pool.fetchval(
        _CLAIM, job.name, float(job.interval_seconds), float(job.lease_seconds), holder
    )
    return name is not None


async def run_job(ctx: WorkerContext, job: Job) -> JobResult | None:
    """Run `job` now, whatever its schedule (tests, `--once`); None if it failed."""
    try:
        result = await job.run(ctx)
    except Exception:
        log.exception("job_failed", job=job.name)
        return None
    log.info("job_done", job=job.name, done=result.done, **result.detail)
    return result


async def run_due(ctx: WorkerContext, registry: tuple[Job, ...], holder: str) -> int:
    """One poll: every job that is due and free runs here; returns how many ran."""
    ran = 0
    for job in registry:
        if ctx.stopping:
            break
        try:
            if not await claim(ctx.pool, job, holder):
                continue
        except Exception:
            log.exception("job_claim_failed", job=job.name)
            continue
        result = await run_job(ctx, job)
        ran += 1
        outcome = "ok" if result is not None else "failed"
        retry = min(RETRY_SECONDS, job.interval_seconds)
        try:
            await ctx.pool.execute(_RELEASE, job.name, holder, outcome, float(retry))
        except Exception:  # the lease expires by itself
            log.exception("job_release_failed", job=job.name)
        await ctx.beat()
    return ran


@contextlib.asynccontextmanager
async def open_context(
    settings: VaultWorkerSettings,
    stop: asyncio.Event,
    kms: KeyManagementService | None = None,
    clock: Callable[[], datetime.datetime] = utcnow,
) -> Any:
    """The pool, Redis, KMS, key service and audit log a worker's jobs share."""
    from vault.app import open_kms

    pool = await create_pool(
        settings.database_url, min_size=1, max_size=4, wait_seconds=settings.db_timeout_seconds
    )
    redis = connect_redis(settings.redis_url, socket_timeout=2)
    own_kms = kms is None
    kms = kms or await open_kms(settings)
    http = httpx.AsyncClient(timeout=10.0, follow_redirects=False)
    try:
        keys = KeyService(kms, KeyRepository(pool))
        audit = await _audit_log(keys, pool, stop, settings.worker_poll_seconds)
        yield WorkerContext(settings, pool, redis, kms, keys, audit, http, clock, stop)
    finally:
        await http.aclose()
        if own_kms:
            await kms.close()
        await redis.aclose()
        await pool.close()


async def _audit_log(keys: KeyService, pool: Any, stop: asyncio.Event, wait: float) -> AuditLog:
    """The audit key needs the schema and the KMS: a worker started first waits for both."""
    while True:
        try:
            return AuditLog(pool, await keys.audit_key())
        except Exception as exc:
            if stop.is_set():
                raise
            log.warning("audit_key_unavailable", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(wait, 1.0))


async def run(settings: VaultWorkerSettings, stop: asyncio.Event) -> None:
    registry = jobs(settings)
    holder = worker_id()
    async with open_context(settings, stop) as ctx:
        log.info("worker_started", jobs=[job.name for job in registry], holder=holder)
        while not stop.is_set():
            await run_due(ctx, registry, holder)
            await ctx.beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.worker_poll_seconds)
    log.info("worker_stopped")


async def run_once(settings: VaultWorkerSettings, names: list[str]) -> dict[str, Any]:
    """`worker --once NAME`: run the named jobs now, here, ignoring their schedule."""
    registry = {job.name: job for job in jobs(settings)}
    unknown = [name for name in names if name not in registry]
    if unknown:
        known = ", ".join(registry)
        raise SystemExit(f"tessera vault worker: no job {', '.join(unknown)} (jobs: {known})")
    results: dict[str, Any] = {}
    async with open_context(settings, asyncio.Event()) as ctx:
        for name in names:
            result = await run_job(ctx, registry[name])
            results[name] = None if result is None else {"done": result.done, **result.detail}
    return results


def main(settings: VaultWorkerSettings) -> None:
    """Run until SIGTERM or SIGINT; the batch in progress finishes first."""
    import uvloop

    async def start() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    uvloop.run(start())
