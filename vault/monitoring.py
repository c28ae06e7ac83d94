"""Failures of the vault's critical security controls, made loud (PCI DSS v4.0.1 10.7.2).

Each kind of failure is a metric on the vault's /metrics (the registry of
`tessera.runtime.http.Metrics`; labels from small fixed sets; never card data) and a structured
log event, and deploy/prometheus/pci-alerts.yaml alerts on each:

- an audit record cannot be written (so its operation is refused): counter
  `tessera_vault_audit_write_failures_total`, event `audit.write_failed`;
- the KMS is unreachable or fails: counter `tessera_vault_kms_failures_total{operation,reason}`,
  event `kms.failed`;
- the audit chains do not verify: gauge `tessera_vault_audit_chain_broken` (0/1), event
  `audit.chain_broken`;
- the served payment page differs from the reviewed script inventory: gauge
  `tessera_vault_script_inventory_mismatches`, event `script_inventory.mismatch`.

The first two happen inside a vault process and are counted where they happen (`MonitoredKms`,
`AlarmedAuditLog`). The last two are verifications: the vault worker's scheduled jobs
(vault/watchdog.py) and the admin `GET /v1/audit/verify`. The worker has no listener, so each
verification's result is published in the vault's Redis (`vault:monitor:<check>`), and every
vault process copies the latest results into its gauges every `monitor_refresh_seconds`,
together with when they were made (`…_timestamp_seconds`): a worker that stopped verifying is an
alert as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from tessera.runtime.logging import get_logger
from vault.audit import AuditLog, AuditUnavailable, VerifyReport
from vault.kms.base import (
    KekVersion,
    KeyManagementService,
    KmsIntegrityError,
    KmsUnavailable,
    WrappedKey,
)

log = get_logger("tessera.vault.monitoring")

AUDIT_WRITE_FAILURES: Final = "tessera_vault_audit_write_failures_total"
KMS_FAILURES: Final = "tessera_vault_kms_failures_total"
AUDIT_CHAIN_BROKEN: Final = "tessera_vault_audit_chain_broken"
AUDIT_CHAIN_VERIFIED_AT: Final = "tessera_vault_audit_chain_verified_timestamp_seconds"
SCRIPT_MISMATCHES: Final = "tessera_vault_script_inventory_mismatches"
SCRIPTS_CHECKED_AT: Final = "tessera_vault_script_inventory_checked_timestamp_seconds"

#: The four kinds of failure PCI DSS 10.7.2 names for the vault, and the metric of each (the
#: alert rules and the assessor's kit check that every one has a rule).
FAILURE_METRICS: Final = {
    "audit_write": AUDIT_WRITE_FAILURES,
    "kms": KMS_FAILURES,
    "audit_chain": AUDIT_CHAIN_BROKEN,
    "script_inventory": SCRIPT_MISMATCHES,
}
#: Every series the vault exports for them (all present from start-up, at 0).
METRICS: Final = (*FAILURE_METRICS.values(), AUDIT_CHAIN_VERIFIED_AT, SCRIPTS_CHECKED_AT)
KMS_OPERATIONS: Final = ("wrap", "unwrap", "primary_version", "rotate", "versions")
KMS_REASONS: Final = ("unavailable", "integrity", "error")

#: The verifications whose latest result the gauges show (Redis key `vault:monitor:<check>`).
AUDIT_CHAIN: Final = "audit_chain"
SCRIPTS: Final = "scripts"
_KEY: Final = "vault:monitor:{}"


@dataclass(frozen=True)
class Verification:
    """One verification's outcome: when (Unix seconds), how many problems (0: healthy), by whom."""

    check: str
    checked_at: float
    problems: int
    by: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Verification:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            str(data["check"]), float(data["checked_at"]), int(data["problems"]), str(data["by"])
        )


async def publish(redis: Any, verification: Verification) -> None:
    """Make a verification's outcome the one every vault process shows."""
    await redis.set(_KEY.format(verification.check), verification.to_json())


async def latest(redis: Any, check: str) -> Verification | None:
    raw = await redis.get(_KEY.format(check))
    return None if raw is None else Verification.from_json(raw)


class Alarms:
    """The vault process's metrics for failed controls, and the log events that go with them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.audit_write_failures = Counter(
            AUDIT_WRITE_FAILURES.removesuffix("_total"),
            "Audit records that could not be written (each refused its operation).",
            registry=registry,
        )
        self.kms_failures = Counter(
            KMS_FAILURES.removesuffix("_total"),
            "KMS calls that failed: unavailable (after retries), integrity (an answer not "
            "trusted) or error.",
            ["operation", "reason"],
            registry=registry,
        )
        for operation in KMS_OPERATIONS:
            for reason in KMS_REASONS:
                self.kms_failures.labels(operation, reason)
        self.chain_broken = Gauge(
            AUDIT_CHAIN_BROKEN,
            "1 if the latest audit chain verification found a break, else 0.",
            registry=registry,
        )
        self.chain_verified_at = Gauge(
            AUDIT_CHAIN_VERIFIED_AT,
            "When the audit chains were last verified (Unix time; 0: not since Redis was empty).",
            registry=registry,
        )
        self.script_mismatches = Gauge(
            SCRIPT_MISMATCHES,
            "Differences between the served payment page and the script inventory, at the "
            "latest check.",
            registry=registry,
        )
        self.scripts_checked_at = Gauge(
            SCRIPTS_CHECKED_AT,
            "When the payment page was last compared with the script inventory (Unix time).",
            registry=registry,
        )

    def audit_write_failed(self, action: str, exc: BaseException) -> None:
        self.audit_write_failures.inc()
        cause = exc.__cause__ or exc
        log.error("audit.write_failed", action=action, error=type(cause).__name__)

    def kms_failed(self, operation: str, exc: BaseException) -> None:
        if isinstance(exc, KmsUnavailable):
            reason = "unavailable"
        elif isinstance(exc, KmsIntegrityError):
            reason = "integrity"
        else:
            reason = "error"
        self.kms_failures.labels(operation, reason).inc()
        log.error(
            "kms.failed",
            operation=operation,
            reason=reason,
            error=type(exc).__name__,
            code=str(getattr(exc, "code", "")),
        )

    def show(self, verification: Verification) -> None:
        if verification.check == AUDIT_CHAIN:
            self.chain_broken.set(1 if verification.problems else 0)
            self.chain_verified_at.set(verification.checked_at)
        elif verification.check == SCRIPTS:
            self.script_mismatches.set(verification.problems)
            self.scripts_checked_at.set(verification.checked_at)

    async def refresh(self, redis: Any) -> None:
        """Show the latest published verifications (made by the worker or another process)."""
        for check in (AUDIT_CHAIN, SCRIPTS):
            verification = await latest(redis, check)
            if verification is not None:
                self.show(verification)


async def follow(alarms: Alarms, redis: Any, every: float) -> None:
    """The vault process's loop: the gauges follow the published verifications."""
    while True:
        try:
            await alarms.refresh(redis)
        except Exception as exc:  # Redis down: the gauges keep their values and age
            log.warning("monitor_refresh_failed", error=type(exc).__name__)
        await asyncio.sleep(every)


async def chain_verified(
    report: VerifyReport, *, by: str, now: float, redis: Any, alarms: Alarms | None = None
) -> Verification:
    """After any verification of the audit chains: the alert event if one is broken, the gauge
    (in this process, if it has one, and, through Redis, in every vault process)."""
    if not report.ok:
        log.error(
            "audit.chain_broken",
            by=by,
            records=report.records,
            broken=[
                {"chain_id": b.chain_id, "seq": b.seq, "problem": str(b.problem)}
                for b in report.broken
            ],
        )
    verification = Verification(AUDIT_CHAIN, now, len(report.broken), by)
    if alarms is not None:
        alarms.show(verification)
    await publish_or_log(redis, verification)
    return verification


async def publish_or_log(redis: Any, verification: Verification) -> None:
    """Publish; if Redis is down, say so (the timestamp gauge then ages into an alert)."""
    try:
        await publish(redis, verification)
    except Exception as exc:
        log.error("monitor_publish_failed", check=verification.check, error=type(exc).__name__)


class MonitoredKms:
    """A `KeyManagementService` whose every failed call is counted and logged, then re-raised."""

    def __init__(self, inner: KeyManagementService, alarms: Alarms) -> None:
        self.inner = inner
        self._alarms = alarms

    async def wrap(self, plaintext: bytes, *, aad: bytes) -> WrappedKey:
        try:
            return await self.inner.wrap(plaintext, aad=aad)
        except Exception as exc:
            self._alarms.kms_failed("wrap", exc)
            raise

    async def unwrap(self, wrapped: WrappedKey, *, aad: bytes) -> bytes:
        try:
            return await self.inner.unwrap(wrapped, aad=aad)
        except Exception as exc:
            self._alarms.kms_failed("unwrap", exc)
            raise

    async def primary_version(self) -> str:
        try:
            return await self.inner.primary_version()
        except Exception as exc:
            self._alarms.kms_failed("primary_version", exc)
            raise

    async def rotate(self) -> str:
        try:
            return await self.inner.rotate()
        except Exception as exc:
            self._alarms.kms_failed("rotate", exc)
            raise

    async def versions(self) -> list[KekVersion]:
        try:
            return await self.inner.versions()
        except Exception as exc:
            self._alarms.kms_failed("versions", exc)
            raise

    async def close(self) -> None:
        await self.inner.close()

    @property
    def calls(self) -> int:
        return self.inner.calls


class AlarmedAuditLog(AuditLog):
    """The audit log, with each record it cannot write counted and logged (it still raises)."""

    def __init__(self, pool: Any, hmac_key: bytes, alarms: Alarms, *, timeout: float = 5.0) -> None:
        super().__init__(pool, hmac_key, timeout=timeout)
        self._alarms = alarms

    async def append(self, **record: Any) -> None:
        try:
            await super().append(**record)
        except AuditUnavailable as exc:
            self._alarms.audit_write_failed(str(record.get("action", "")), exc)
            raise


@contextlib.asynccontextmanager
async def following(alarms: Alarms, redis: Any, every: float) -> Any:
    """`follow` for the life of a vault process."""
    task = asyncio.create_task(follow(alarms, redis, every))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
