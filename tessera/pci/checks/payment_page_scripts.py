"""`payment-page-scripts` (PCI DSS 6.4.3, 11.6.1): the payment page runs only reviewed scripts,
and a change to it is detected.

Judged on:

- the inventory (vault/elements/inventory.json) against the repository's static files: every
  file listed, with its current sha384;
- what the vault serves at `TESSERA_PCI_VAULT_URL`, fetched as a browser fetches it and compared
  with the inventory by the same code the vault worker runs (`vault.elements.integrity`): each
  script's and stylesheet's hash, the published integrity, and, for a merchant's publishable key
  and registered origin (`TESSERA_PCI_PUBLISHABLE_KEY`, `TESSERA_PCI_CHECKOUT_ORIGIN`), the
  iframe page's CSP, its scripts and their integrity, and the page against its reviewed
  template; without them that part is not checked (the evidence says so) and the rest is judged;
- the worker's scheduled check: its latest audit record (actor `worker:scripts`) must be no
  older than two of its intervals, and must not be a mismatch.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from tessera.pci.context import EvidenceContext
from tessera.pci.model import Control, ControlResult
from vault.elements import integrity
from vault.elements.inventory import differences, load
from vault.watchdog import SCRIPTS_ACTION, SCRIPTS_ACTOR

CONTROL = Control(
    "payment-page-scripts",
    "Payment-page scripts are inventoried, authorized and watched for changes",
    ("6.4.3", "11.6.1"),
)
#: The worker's job (vault/worker.py), whose schedule row is shown beside its record.
JOB = "scripts"
#: The longest interval the worker accepts is a day, so a record older than two days is stale
#: whatever the interval: the search for the latest one looks no further back.
LOOK_BACK = datetime.timedelta(days=2)

_LAST_RECORD = """
SELECT occurred_at, outcome, detail::text AS detail FROM audit_log
WHERE occurred_at >= $1 AND actor = $2 AND action = $3
ORDER BY occurred_at DESC LIMIT 1
"""


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime.datetime) else value


async def _last_run(ctx: EvidenceContext) -> tuple[dict[str, Any], datetime.datetime | None]:
    """The worker's latest scripts check (its audit record) and its schedule row."""
    async with ctx.database("vault") as conn:
        job = await conn.fetchrow(
            "SELECT last_started_at, last_finished_at, last_outcome, next_run_at "
            "FROM worker_jobs WHERE name = $1",
            JOB,
        )
        row = await conn.fetchrow(_LAST_RECORD, ctx.now - LOOK_BACK, SCRIPTS_ACTOR, SCRIPTS_ACTION)
    found: dict[str, Any] = {
        "schedule": None if job is None else {k: _iso(v) for k, v in job.items()},
        "record": None,
    }
    if row is None:
        return found, None
    found["record"] = {
        "occurred_at": row["occurred_at"].isoformat(),
        "outcome": row["outcome"],
        "detail": json.loads(row["detail"]),
    }
    return found, row["occurred_at"]


async def run(ctx: EvidenceContext) -> ControlResult:
    failures: list[str] = []
    inventory = load(ctx.root / "vault" / "elements" / "inventory.json")
    drift = differences(inventory)
    evidence: dict[str, Any] = {
        "inventory": {
            "file": "vault/elements/inventory.json",
            "assets": [
                {"name": a.name, "type": a.type, "path": a.path, "integrity": a.integrity}
                for a in inventory.assets
            ],
            "inline": [{"id": b.id, "type": b.type} for b in inventory.inline],
            "differences_from_the_files": drift,
        }
    }
    failures += drift

    settings = ctx.settings
    report = await integrity.check(
        ctx.http,
        settings.vault_url,
        inventory,
        publishable_key=settings.publishable_key,
        origin=settings.checkout_origin,
    )
    evidence["served"] = report.to_dict()
    for problem in report.problems:
        line = f"{problem.asset}: {problem.message}"
        if problem.expected or problem.served:
            line += f" (inventory {problem.expected or '-'}, served {problem.served or '-'})"
        failures.append(line)

    worker, at = await _last_run(ctx)
    evidence["worker"] = worker
    record = worker["record"]
    if record is None or at is None:
        failures.append(
            f"no audit record of the vault worker's scripts check ({SCRIPTS_ACTOR}) in the last "
            f"{LOOK_BACK.days} days: the scheduled check is not running"
        )
    else:
        interval = float(record["detail"].get("interval_seconds") or 300)
        age = (ctx.now - at).total_seconds()
        worker.update(age_seconds=round(age), limit_seconds=round(2 * interval))
        if age > 2 * interval:
            failures.append(
                f"the vault worker last compared the page {round(age)} s ago, more than two "
                f"of its intervals ({round(2 * interval)} s)"
            )
        if record["outcome"] != "ok":
            failures.append(f"the vault worker's latest check says {record['outcome']}")

    summary = (
        f"{len(report.assets)} scripts and stylesheets are served as inventoried, the refusal for "
        "an unknown key cannot be framed, and the vault worker compared the page "
        f"{worker.get('age_seconds')} s ago"
    )
    if report.card_page is not None:
        summary += "; card.html's CSP, scripts, integrity and template match"
    else:
        summary += f" (not checked: {report.card_page_not_checked})"
    return CONTROL.judged(failures, summary, evidence)
