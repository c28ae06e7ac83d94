"""Control `keys`: the key inventory, and every key within its cryptoperiod and bounds.

It reads the vault's key inventory (`GET /v1/keys` on the admin listener, `vault/key_inventory.py`:
the KEK's versions from the KMS, every data key from the vault's tables, each unwrapped once
under the KMS right then) and judges it on `ctx.now`, so a test can move the clock:

- the KMS lists the KEK's versions; exactly one is primary and it is enabled (3.6.1, 3.7.1);
- the primary version is younger than the KEK's cryptoperiod: the KEK was rotated in time
  (3.6.1, 3.7.4);
- every data key is wrapped under a version the KMS lists and that is enabled, and unwraps
  under the KMS with its own associated data: keys are stored only encrypted under the KEK,
  none is lost, and none was substituted (moved from another row or relabelled under another
  KEK version) (3.6.1.2, 3.7.2, 3.7.3, 3.7.7);
- no card DEK encrypts more records than its bound, and none was used for new records past its
  own cryptoperiod (last record - created > max age + `SLACK_SECONDS`) (3.7.4);
- no data key is still wrapped under a superseded KEK version older than the cryptoperiod: the
  rewrap after a rotation is not pending (3.7.4, 3.7.5).

Judging is `judge(inventory, now)`, a pure function (tests/test_pci_keys_check.py). The evidence
is a summary of the inventory (counts, every KEK version with its age in days, the keys that
fail a rule) and one judged line per rule, never key material (the inventory holds none).
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from tessera.pci.context import EvidenceContext
from tessera.pci.model import Control, ControlResult

CONTROL = Control(
    "keys",
    "Key inventory: the KEK rotated within its cryptoperiod, every data key unwraps, "
    "within its bounds and rewrapped after rotation",
    ("3.6.1", "3.6.1.2", "3.7.1", "3.7.2", "3.7.3", "3.7.4", "3.7.5", "3.7.7"),
)

#: A card DEK's last record may come this long after its max age: the vault stores the key
#: (created_at) a moment before it starts its own clock, and a record is inserted a moment after
#: the key was taken for it.
SLACK_SECONDS = 300
#: Keys listed by name per failing rule in the evidence (the counts are always whole).
LISTED = 20
#: The inventory unwraps every data key: on Cloud KMS, thousands of keys take seconds.
INVENTORY_TIMEOUT_SECONDS = 300.0
_DAY = 86400.0


@dataclass
class Judgement:
    failures: list[str] = field(default_factory=list)
    #: One line per rule: "pass: …" or "fail: …".
    judged: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    def rule(self, failures: list[str], passed: str) -> None:
        self.failures += failures
        self.judged += [f"fail: {f}" for f in failures] or [f"pass: {passed}"]


def _at(seconds: int | float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _days(seconds: float) -> float:
    return round(seconds / _DAY, 2)


def _listed(ids: list[str]) -> str:
    shown = ", ".join(ids[:LISTED])
    return shown + (f" and {len(ids) - LISTED} more" if len(ids) > LISTED else "")


def judge(inventory: Mapping[str, Any], now: datetime.datetime) -> Judgement:
    """Every rule of the control on one inventory (as `GET /v1/keys` answers it) at `now`."""
    result = Judgement()
    kek = inventory["kek"]
    period_days = int(kek["cryptoperiod_days"])
    period = period_days * _DAY
    versions: list[dict[str, Any]] = list(kek["versions"])
    ages = {v["name"]: now.timestamp() - v["created"] for v in versions}
    states = {v["name"]: v["state"] for v in versions}
    keys_under = {v["name"]: sum(v["data_keys"].values()) for v in versions}
    policy = inventory["data_key_policy"]
    card_keys: list[dict[str, Any]] = inventory["card_keys"]
    scoped = [*inventory["fingerprint_keys"], *inventory["audit_keys"]]
    unwrap = inventory["unwrap"]
    counts = inventory["data_keys"]

    # The KEK: listed, one enabled primary, rotated within its cryptoperiod.
    primaries = [v for v in versions if v["primary"]]
    if kek.get("versions_error") or not versions:
        listed = [f"the KMS did not list the KEK's versions ({kek.get('versions_error')})"]
    elif len(primaries) != 1:
        listed = [f"the KMS lists {len(primaries)} primary KEK versions, not one"]
    elif primaries[0]["state"] != "enabled":
        listed = [f"the primary KEK version {primaries[0]['name']} is {primaries[0]['state']}"]
    else:
        listed = []
    result.rule(
        listed,
        f"the KMS lists {len(versions)} KEK version(s), one primary and enabled",
    )
    result.rule(
        [
            f"the primary KEK version {v['name']} is {_days(ages[v['name']])} days old, past its "
            f"cryptoperiod of {period_days} days: the KEK was not rotated in time"
            for v in primaries
            if ages[v["name"]] > period
        ],
        (
            f"the primary KEK version {primaries[0]['name']} is "
            f"{_days(ages[primaries[0]['name']])} days old, within {period_days} days"
            if len(primaries) == 1
            else "no primary KEK version to age"
        ),
    )

    # Every data key under an enabled, listed version, and every one unwraps now.
    placement = [
        f"{n} data key(s) wrapped under KEK version {name}, which is {states[name]}"
        for name, n in keys_under.items()
        if n and states[name] != "enabled"
    ] + [
        f"{n} data key(s) wrapped under KEK version {name}, which the KMS does not list"
        for name, n in counts["unknown_kek_versions"].items()
    ]
    result.rule(placement, "every data key is wrapped under an enabled KEK version")
    failed_ids = [k["id"] for k in [*card_keys, *scoped] if k["unwrap"] != "ok"]
    unwrapped = []
    if unwrap["failed"] or failed_ids:
        errors = ", ".join(f"{code}: {n}" for code, n in sorted(unwrap["errors"].items()))
        unwrapped.append(
            f"{unwrap['failed']} of {unwrap['checked']} data keys do not unwrap under the KMS "
            f"({errors}): {_listed(failed_ids)}"
        )
    if unwrap["checked"] != counts["total"]:
        unwrapped.append(f"{unwrap['checked']} data keys unwrapped of {counts['total']} stored")
    result.rule(
        unwrapped,
        f"all {unwrap['checked']} data keys unwrap under the KMS with their own associated data",
    )

    # Card DEKs within their bounds: records, and time used for new records.
    over_records = [k for k in card_keys if k["records"] > policy["max_records"]]
    result.rule(
        [
            f"card DEK {k['id']} encrypts {k['records']} records, over its bound of "
            f"{policy['max_records']}"
            for k in over_records[:LISTED]
        ]
        + ([f"and {len(over_records) - LISTED} more"] if len(over_records) > LISTED else []),
        f"no card DEK encrypts more than {policy['max_records']} records",
    )
    limit = policy["max_age_seconds"] + SLACK_SECONDS
    overused = [
        k
        for k in card_keys
        if k["last_record"] is not None and k["last_record"] - k["created"] > limit
    ]
    result.rule(
        [
            f"card DEK {k['id']} took new records for {_days(k['last_record'] - k['created'])} "
            f"days, past its cryptoperiod of {_days(policy['max_age_seconds'])} days"
            for k in overused[:LISTED]
        ]
        + ([f"and {len(overused) - LISTED} more"] if len(overused) > LISTED else []),
        f"no card DEK took new records longer than {policy['max_age_seconds']} s "
        f"(+{SLACK_SECONDS} s) after it was made",
    )

    # After a rotation: nothing left under a superseded version past the cryptoperiod.
    superseded = [v for v in versions if not v["primary"] and keys_under[v["name"]]]
    result.rule(
        [
            f"rewrap pending: {keys_under[v['name']]} data key(s) still wrapped under KEK "
            f"version {v['name']}, {_days(ages[v['name']])} days old (cryptoperiod "
            f"{period_days} days)"
            for v in superseded
            if ages[v["name"]] > period
        ],
        "no data key is left under a superseded KEK version past its cryptoperiod",
    )

    result.evidence = summary(inventory, now, ages, overused, over_records, failed_ids)
    result.evidence["judged"] = result.judged
    return result


def summary(
    inventory: Mapping[str, Any],
    now: datetime.datetime,
    ages: dict[str, float],
    overused: list[dict[str, Any]],
    over_records: list[dict[str, Any]],
    failed_ids: list[str],
) -> dict[str, Any]:
    """What the assessor sees: counts, every KEK version's age, and the keys that fail."""
    kek = inventory["kek"]
    card_keys: list[dict[str, Any]] = inventory["card_keys"]
    used = [k for k in card_keys if k["last_record"] is not None]
    fingerprints = Counter(k["kek_version"] for k in inventory["fingerprint_keys"])
    return {
        "judged_at": now.isoformat(),
        "kek": {
            "provider": kek["provider"],
            "cryptoperiod_days": kek["cryptoperiod_days"],
            "versions_error": kek.get("versions_error"),
            "versions": [
                {
                    "name": v["name"],
                    "state": v["state"],
                    "primary": v["primary"],
                    "created": _at(v["created"]).isoformat(),
                    "age_days": _days(ages[v["name"]]),
                    "data_keys": v["data_keys"],
                }
                for v in kek["versions"]
            ],
        },
        "data_key_policy": inventory["data_key_policy"],
        "data_keys": inventory["data_keys"],
        "card_keys": {
            "count": len(card_keys),
            "in_use": sum(1 for k in card_keys if k["in_use"]),
            "most_records": max((k["records"] for k in card_keys), default=0),
            "longest_use_days": max(
                (_days(k["last_record"] - k["created"]) for k in used), default=0.0
            ),
            "over_records": [k["id"] for k in over_records[:LISTED]],
            "used_past_cryptoperiod": [
                {
                    "id": k["id"],
                    "created": _at(k["created"]).isoformat(),
                    "last_record": _at(k["last_record"]).isoformat(),
                    "kek_version": k["kek_version"],
                }
                for k in overused[:LISTED]
            ],
        },
        "fingerprint_keys": {
            "merchants": len(inventory["fingerprint_keys"]),
            "by_kek_version": dict(sorted(fingerprints.items())),
        },
        "audit_keys": len(inventory["audit_keys"]),
        "unwrap": {**inventory["unwrap"], "failed_keys": failed_ids[:LISTED]},
    }


async def run(ctx: EvidenceContext) -> ControlResult:
    if not ctx.settings.vault_admin_token:
        return CONTROL.not_checked(
            "no vault administrator credential (TESSERA_VAULT_ADMIN_TOKEN): the key inventory "
            "is on the vault's admin listener"
        )
    url = ctx.settings.admin_url.rstrip("/") + "/v1/keys"
    response = await ctx.http.get(
        url, headers=ctx.admin_headers(), timeout=INVENTORY_TIMEOUT_SECONDS
    )
    if response.status_code in (401, 403, 503):
        return CONTROL.not_checked(
            f"GET {url} answered {response.status_code} "
            f"({_error_code(response)}): "
            + (
                "the administrator credential was refused"
                if response.status_code != 503
                else "the vault's database or KMS is unavailable"
            ),
            {"url": url, "status": response.status_code},
        )
    if response.status_code != 200:
        return CONTROL.failed(
            f"GET {url} answered {response.status_code} ({_error_code(response)})",
            {"url": url, "status": response.status_code},
        )
    inventory = response.json()
    if inventory["kek"].get("versions_error") == "kms_unavailable":
        return CONTROL.not_checked(
            "the vault could not reach its KMS to list the KEK's versions (kms_unavailable)",
            {"url": url, "kek": inventory["kek"], "unwrap": inventory["unwrap"]},
        )
    judgement = judge(inventory, ctx.now)
    evidence = {"url": url, **judgement.evidence}
    kek = evidence["kek"]
    primary = next((v for v in kek["versions"] if v["primary"]), None)
    summary_text = (
        f"{evidence['data_keys']['total']} data keys, all unwrapping under the KMS; primary KEK "
        f"version {primary['name'] if primary else '?'} is "
        f"{primary['age_days'] if primary else '?'} days old (cryptoperiod "
        f"{kek['cryptoperiod_days']} days); no card DEK past its bounds; no rewrap pending"
    )
    return CONTROL.judged(judgement.failures, summary_text, evidence)


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "no error object"
