"""The vault worker's watch over two critical controls (PCI DSS 11.6.1, 10.3.4 and 10.7.2).

- `scripts`, every `TESSERA_VAULT_SCRIPTS_CHECK_INTERVAL_SECONDS` (5 minutes): the payment page
  and its scripts, fetched from the vault's public origin as browsers fetch them, compared with
  the reviewed inventory (`vault.elements.integrity`).
- `audit_verify`, every `TESSERA_VAULT_AUDIT_VERIFY_INTERVAL_SECONDS` (an hour): every audit
  chain walked and every hash recomputed (`vault.audit.verify`).

Each one publishes its outcome for the vault's gauges (`vault.monitoring`, where the alert rules
read it), logs every problem as an alert event (`script_inventory.mismatch`,
`audit.chain_broken`) and leaves an audit record (actors `worker:scripts` and
`worker:audit_verify`) that the assessor's kit reads to tell when the check last ran.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from core.redaction import redact
from tessera.runtime.logging import get_logger
from vault import monitoring
from vault.audit import AuditUnavailable, verify
from vault.elements import integrity
from vault.elements.inventory import committed

if TYPE_CHECKING:
    from vault.worker import JobResult, WorkerContext

log = get_logger("tessera.vault.watchdog")

SCRIPTS_ACTOR = "worker:scripts"
SCRIPTS_ACTION = "scripts.check"
AUDIT_VERIFY_ACTOR = "worker:audit_verify"
AUDIT_VERIFY_ACTION = "audit.verify"


async def _record(ctx: WorkerContext, actor: str, action: str, outcome: str, detail: Any) -> None:
    """The run's audit record; one that cannot be written fails the run, loudly."""
    try:
        await ctx.audit.append(
            actor=actor, action=action, outcome=outcome, request_id=None, detail=detail
        )
    except AuditUnavailable as exc:
        log.error("audit.write_failed", action=action, error=type(exc.__cause__ or exc).__name__)
        raise


def _fit(value: str) -> str:
    """A served value for the audit record: what an edge sent may be anything, so it is cut
    short, and masked if it looks like a card number (the audit log refuses those)."""
    return redact(value.replace("\x00", ""))[:200]


def _mismatch_detail(report: integrity.IntegrityReport) -> dict[str, str | int | bool]:
    first = report.problems[0]
    detail: dict[str, str | int | bool] = {
        "problems": len(report.problems),
        "asset": _fit(first.asset),
        "kind": first.kind,
    }
    for name, value in (("expected", first.expected), ("served", first.served)):
        if value:
            detail[name] = _fit(value)
    return detail


async def check_scripts(ctx: WorkerContext) -> JobResult:
    """Compare the payment page as served with the script inventory."""
    from vault.worker import JobResult

    settings = ctx.settings
    interval = int(settings.scripts_check_interval_seconds)
    try:
        report = await integrity.check(
            ctx.http,
            settings.public_url,
            committed(),
            publishable_key=settings.scripts_check_publishable_key,
            origin=settings.scripts_check_origin,
        )
    except httpx.HTTPError as exc:
        # Not compared, so neither ok nor a mismatch: the gauges age into the staleness alert.
        log.error("script_inventory.unreachable", url=settings.public_url, error=type(exc).__name__)
        await _record(
            ctx,
            SCRIPTS_ACTOR,
            SCRIPTS_ACTION,
            "unreachable",
            {"error": type(exc).__name__, "interval_seconds": interval},
        )
        raise
    for problem in report.problems:
        log.error(
            "script_inventory.mismatch",
            asset=problem.asset,
            kind=problem.kind,
            expected=problem.expected,
            served=problem.served,
            problem=problem.message,
            url=report.base_url,
        )
    if report.card_page_not_checked:
        log.warning("script_inventory.card_page_not_checked", reason=report.card_page_not_checked)
    checked_at = ctx.now().timestamp()
    await monitoring.publish_or_log(
        ctx.redis,
        monitoring.Verification(monitoring.SCRIPTS, checked_at, len(report.problems), "worker"),
    )
    detail: dict[str, str | int | bool] = {
        "assets": len(report.assets),
        "card_page": report.card_page is not None,
        "interval_seconds": interval,
    }
    if report.problems:
        detail.update(_mismatch_detail(report))
    outcome = "ok" if report.ok else "mismatch"
    await _record(ctx, SCRIPTS_ACTOR, SCRIPTS_ACTION, outcome, detail)
    return JobResult(
        done=len(report.assets),
        detail={"outcome": outcome, "problems": len(report.problems), "url": report.base_url},
    )


async def verify_audit_chain(ctx: WorkerContext) -> JobResult:
    """Walk every audit chain; a break is an alert (and stays one until a walk finds none)."""
    from vault.worker import JobResult

    report = await verify(ctx.pool)
    await monitoring.chain_verified(report, by="worker", now=ctx.now().timestamp(), redis=ctx.redis)
    detail: dict[str, str | int | bool] = {
        "records": report.records,
        "broken_chains": len(report.broken),
        "interval_seconds": int(ctx.settings.audit_verify_interval_seconds),
    }
    if report.broken:
        first = report.broken[0]
        detail.update(chain_id=first.chain_id, seq=first.seq, problem=str(first.problem))
    outcome = "ok" if report.ok else "broken"
    await _record(ctx, AUDIT_VERIFY_ACTOR, AUDIT_VERIFY_ACTION, outcome, detail)
    return JobResult(
        done=report.records, detail={"outcome": outcome, "broken_chains": len(report.broken)}
    )
