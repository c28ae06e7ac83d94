"""Control `retention`: cards are kept only while they are used (PCI DSS 3.2.1).

The vault's worker crypto-shreds every live token unused (`tokens.last_used_at`) for longer
than its merchant's period (`merchants.card_retention_days`, else the vault's default,
TESSERA_VAULT_CARD_RETENTION_DAYS), and records each sweep (`retention.sweep`) in the audit log.
From the vault's database (read-only, as the auditor role), judged on the report's clock:

- **Nothing overdue**: live tokens past their merchant's period, counted per merchant with the
  oldest last use (no token id: ids are not card data, but the evidence stays small). Any
  fails the control: they are overdue for shredding.
- **The sweep runs**: the latest `retention.sweep` record no older than two sweep intervals
  (TESSERA_PCI_RETENTION_INTERVAL_SECONDS, the worker's TESSERA_VAULT_RETENTION_INTERVAL_SECONDS),
  and with a default period no longer than the policy's (TESSERA_PCI_CARD_RETENTION_DAYS).
- What it did: tokens shredded for retention in the last 30 days (audit records), tokens
  deleted in the last 30 days (either way), and the periods in force (the default, and every
  merchant's own).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from tessera.pci.context import EvidenceContext
from tessera.pci.model import Control, ControlResult

CONTROL = Control(
    "retention",
    "Card data retention: tokens unused past their merchant's period are crypto-shredded",
    ("3.2.1",),
)

#: How far back the audit log is searched for sweeps and shreddings (the BRIN index on
#: occurred_at keeps it a range scan).
LOOKBACK = datetime.timedelta(days=30)
#: Merchants listed in the evidence, most overdue (or explicit periods) first.
MAX_LISTED = 50

_MIGRATED = """
SELECT EXISTS (
    SELECT 1 FROM information_schema.columns
    WHERE table_schema = current_schema() AND table_name = 'tokens'
      AND column_name = 'last_used_at'
)
"""
# Per merchant, through the (merchant_id, last_used_at) index of live tokens.
_OVERDUE = """
SELECT m.id AS merchant_id, coalesce(m.card_retention_days, $2) AS retention_days,
       o.overdue, o.oldest_last_used_at
FROM merchants m
CROSS JOIN LATERAL (
    SELECT count(*) AS overdue, min(t.last_used_at) AS oldest_last_used_at
    FROM tokens t
    WHERE t.merchant_id = m.id AND t.deleted_at IS NULL
      AND t.last_used_at
          < $1::timestamptz - make_interval(days => coalesce(m.card_retention_days, $2))
) AS o
WHERE o.overdue > 0
ORDER BY o.overdue DESC, m.id
"""
_LAST_SWEEP = """
SELECT occurred_at, outcome, detail::text AS detail
FROM audit_log
WHERE action = 'retention.sweep' AND occurred_at >= $1 AND occurred_at <= $2
ORDER BY occurred_at DESC
LIMIT 1
"""
_RETENTION_SHREDS = """
SELECT count(*) FROM audit_log
WHERE action = 'token.shred' AND outcome = 'retention_expired'
  AND occurred_at >= $1 AND occurred_at <= $2
"""
_DELETED = "SELECT count(*) FROM tokens WHERE deleted_at >= $1 AND deleted_at <= $2"
_PERIODS = """
SELECT count(*) FILTER (WHERE card_retention_days IS NULL) AS on_default,
       count(*) FILTER (WHERE card_retention_days IS NOT NULL) AS own_period
FROM merchants
"""
_OWN_PERIODS = """
SELECT id AS merchant_id, card_retention_days AS retention_days FROM merchants
WHERE card_retention_days IS NOT NULL
ORDER BY card_retention_days DESC, id
LIMIT $1
"""


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value else None


async def run(ctx: EvidenceContext) -> ControlResult:
    policy_days = ctx.settings.card_retention_days
    interval = datetime.timedelta(seconds=ctx.settings.retention_interval_seconds)
    since = ctx.now - LOOKBACK
    async with ctx.database("vault") as conn:
        if not await conn.fetchval(_MIGRATED):
            return CONTROL.failed(
                "the vault's schema has no tokens.last_used_at (migration 0005_retention): "
                "nothing shreds unused cards",
            )
        overdue = await conn.fetch(_OVERDUE, ctx.now, policy_days)
        sweep = await conn.fetchrow(_LAST_SWEEP, since, ctx.now)
        retention_shreds = await conn.fetchval(_RETENTION_SHREDS, since, ctx.now)
        deleted = await conn.fetchval(_DELETED, since, ctx.now)
        # An aggregate always answers one row.
        periods = dict(await conn.fetchrow(_PERIODS) or {"on_default": 0, "own_period": 0})
        own = await conn.fetch(_OWN_PERIODS, MAX_LISTED)

    failures: list[str] = []
    total_overdue = sum(row["overdue"] for row in overdue)
    if total_overdue:
        failures.append(
            f"{total_overdue} live token(s) of {len(overdue)} merchant(s) unused past their "
            "retention period are overdue for shredding"
        )
    last_sweep: dict[str, Any] | None = None
    if sweep is None:
        failures.append(
            f"the sweep is not running: no retention.sweep record in the last {LOOKBACK.days} days"
        )
    else:
        detail = json.loads(sweep["detail"])
        age = ctx.now - sweep["occurred_at"]
        last_sweep = {
            "at": _iso(sweep["occurred_at"]),
            "age_seconds": round(age.total_seconds()),
            "outcome": sweep["outcome"],
            "detail": detail,
        }
        if age > 2 * interval:
            failures.append(
                "the sweep is not running: the last retention.sweep was "
                f"{_iso(sweep['occurred_at'])}, more than two intervals ({2 * interval}) "
                f"before {_iso(ctx.now)}"
            )
        swept_days = detail.get("default_days")
        if isinstance(swept_days, int) and swept_days > policy_days:
            failures.append(
                f"the sweep keeps unused cards {swept_days} days by default; the policy says "
                f"{policy_days}"
            )
    evidence = {
        "judged_at": _iso(ctx.now),
        "policy": {
            "default_retention_days": policy_days,
            "sweep_interval_seconds": ctx.settings.retention_interval_seconds,
            "merchants_on_default": periods["on_default"],
            "merchants_with_own_period": periods["own_period"],
            "own_periods": [dict(row) for row in own],
        },
        "overdue": {
            "tokens": total_overdue,
            "by_merchant": [
                {
                    "merchant_id": row["merchant_id"],
                    "retention_days": row["retention_days"],
                    "overdue": row["overdue"],
                    "oldest_last_used_at": _iso(row["oldest_last_used_at"]),
                }
                for row in overdue[:MAX_LISTED]
            ],
        },
        "last_sweep": last_sweep,
        "last_30_days": {"retention_shreds": retention_shreds, "tokens_deleted": deleted},
    }
    summary = (
        f"no live token is unused past its merchant's period (default {policy_days} days, "
        f"{periods['own_period']} merchant(s) with their own); the last sweep ran "
        f"{last_sweep['at'] if last_sweep else None}; {retention_shreds} token(s) shredded for "
        f"retention in the last {LOOKBACK.days} days"
    )
    return CONTROL.judged(failures, summary, evidence)
