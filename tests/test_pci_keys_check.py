"""The `keys` control's judging, rule by rule: inventories in (as `GET /v1/keys` answers), verdicts
out. No stack: `judge` is a pure function of the inventory and the clock; the control against a
real vault is in tests/test_vault_key_inventory.py."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Callable
from typing import Any

import pytest

from tessera.pci.checks.keys import LISTED, SLACK_SECONDS, judge

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
DAY = 86400
T = int(NOW.timestamp())
MAX_AGE = 86400
MAX_RECORDS = 1 << 24


def card_key(key_id: str, version: str, created: int, **changes: Any) -> dict[str, Any]:
    return {
        "id": key_id,
        "created": created,
        "kek_version": version,
        "records": 1000,
        "first_record": created + 60,
        "last_record": created + 3600,
        "in_use": True,
        "unwrap": "ok",
        "unwrap_reason": None,
        **changes,
    }


def inventory() -> dict[str, Any]:
    """A healthy vault: version 1 rotated out 30 days ago and rewrapped, version 2 primary."""
    return {
        "object": "key_inventory",
        "generated": T,
        "kek": {
            "provider": "gcp",
            "cryptoperiod_days": 90,
            "versions": [
                {
                    "name": "1",
                    "created": T - 120 * DAY,
                    "state": "disabled",
                    "primary": False,
                    "data_keys": {},
                },
                {
                    "name": "2",
                    "created": T - 30 * DAY,
                    "state": "enabled",
                    "primary": True,
                    "data_keys": {"audit": 1, "card": 2, "fingerprint": 1},
                },
            ],
            "versions_error": None,
        },
        "data_key_policy": {"max_records": MAX_RECORDS, "max_age_seconds": MAX_AGE},
        "data_keys": {
            "total": 4,
            "by_kek_version": [
                {"kek_version": "2", "purpose": "audit", "count": 1},
                {"kek_version": "2", "purpose": "card", "count": 2},
                {"kek_version": "2", "purpose": "fingerprint", "count": 1},
            ],
            "unknown_kek_versions": {},
        },
        "card_keys": [
            card_key("dek_a", "2", T - 3 * DAY, last_record=T - 2 * DAY),
            card_key("dek_b", "2", T - DAY),
        ],
        "fingerprint_keys": [
            {
                "id": "dek_f",
                "merchant": "mer_1",
                "kek_version": "2",
                "created": T - 100 * DAY,
                "unwrap": "ok",
                "unwrap_reason": None,
            }
        ],
        "audit_keys": [
            {
                "id": "dek_audit",
                "merchant": None,
                "kek_version": "2",
                "created": T - 100 * DAY,
                "unwrap": "ok",
                "unwrap_reason": None,
            }
        ],
        "unwrap": {"checked": 4, "ok": 4, "failed": 0, "errors": {}, "seconds": 0.01},
    }


def changed(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = copy.deepcopy(inventory())
    change(data)
    return data


def version(data: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(v for v in data["kek"]["versions"] if v["name"] == name)
    return found


def move_keys(data: dict[str, Any], counts: dict[str, int], to: str = "1") -> None:
    """Put `counts` data keys (per purpose) under version `to` instead of 2."""
    version(data, to)["data_keys"] = counts
    remaining = version(data, "2")["data_keys"]
    for purpose, n in counts.items():
        remaining[purpose] -= n


def test_a_healthy_inventory_passes_every_rule_and_shows_each_versions_age() -> None:
    result = judge(inventory(), NOW)
    assert result.failures == []
    assert len(result.judged) == 7
    assert all(line.startswith("pass: ") for line in result.judged)
    ages = {v["name"]: v["age_days"] for v in result.evidence["kek"]["versions"]}
    assert ages == {"1": 120.0, "2": 30.0}
    assert result.evidence["card_keys"]["count"] == 2
    assert result.evidence["judged"] == result.judged


# --- the KEK: listed, one enabled primary ------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["kek"].update(versions=[], versions_error="kms_error"),
            "did not list the KEK's versions (kms_error)",
        ),
        (lambda d: version(d, "1").update(primary=True), "lists 2 primary KEK versions"),
        (lambda d: version(d, "2").update(state="disabled"), "primary KEK version 2 is disabled"),
    ],
)
def test_the_kek_must_be_listed_with_one_enabled_primary(
    change: Callable[[dict[str, Any]], None], message: str
) -> None:
    result = judge(changed(change), NOW)
    assert any(message in f for f in result.failures), result.failures


# --- the primary's age against the cryptoperiod ------------------------------------------------


def test_a_primary_version_older_than_the_cryptoperiod_fails_naming_it_and_its_age() -> None:
    late = changed(lambda d: version(d, "2").update(created=T - 91 * DAY))
    [failure] = judge(late, NOW).failures
    assert failure == (
        "the primary KEK version 2 is 91.0 days old, past its cryptoperiod of 90 days: "
        "the KEK was not rotated in time"
    )
    in_time = changed(lambda d: version(d, "2").update(created=T - 89 * DAY))
    assert judge(in_time, NOW).failures == []


def test_the_same_inventory_fails_once_the_clock_passes_the_cryptoperiod() -> None:
    assert judge(inventory(), NOW).failures == []
    later = judge(inventory(), NOW + datetime.timedelta(days=61))
    assert [f.split(":")[0] for f in later.failures] == [
        "the primary KEK version 2 is 91.0 days old, past its cryptoperiod of 90 days"
    ]


def test_the_cryptoperiod_is_the_configured_one() -> None:
    shorter = changed(lambda d: d["kek"].update(cryptoperiod_days=29))
    assert "past its cryptoperiod of 29 days" in judge(shorter, NOW).failures[0]


# --- every data key under an enabled version, and unwrapping ---------------------------------


def test_data_keys_under_a_disabled_or_unlisted_version_fail() -> None:
    def disable_with_a_key(data: dict[str, Any]) -> None:
        version(data, "1").update(created=T - 60 * DAY)  # within its period: only this rule
        move_keys(data, {"card": 1})

    assert judge(changed(disable_with_a_key), NOW).failures == [
        "1 data key(s) wrapped under KEK version 1, which is disabled"
    ]
    unlisted = changed(lambda d: d["data_keys"].update(unknown_kek_versions={"7": 3}))
    assert judge(unlisted, NOW).failures == [
        "3 data key(s) wrapped under KEK version 7, which the KMS does not list"
    ]

    def enable_with_a_key(data: dict[str, Any]) -> None:
        disable_with_a_key(data)
        version(data, "1").update(state="enabled")

    assert judge(changed(enable_with_a_key), NOW).failures == []


def test_a_data_key_that_does_not_unwrap_fails_naming_it_and_the_error() -> None:
    def damage(data: dict[str, Any]) -> None:
        data["fingerprint_keys"][0].update(unwrap="kms_error", unwrap_reason="decryption failed")
        data["unwrap"].update(ok=3, failed=1, errors={"kms_error": 1})

    [failure] = judge(changed(damage), NOW).failures
    assert failure == "1 of 4 data keys do not unwrap under the KMS (kms_error: 1): dek_f"


def test_data_keys_left_out_of_the_unwrap_fail() -> None:
    partial = changed(lambda d: d["unwrap"].update(checked=3, ok=3))
    assert judge(partial, NOW).failures == ["3 data keys unwrapped of 4 stored"]


def test_many_failing_keys_are_listed_up_to_a_bound_and_counted_whole() -> None:
    def damage(data: dict[str, Any]) -> None:
        data["card_keys"] = [
            card_key(f"dek_{i:03}", "2", T - DAY, unwrap="kms_error") for i in range(50)
        ]
        data["data_keys"]["total"] = 52
        data["unwrap"].update(checked=52, ok=2, failed=50, errors={"kms_error": 50})

    [failure] = judge(changed(damage), NOW).failures
    assert failure.startswith("50 of 52 data keys do not unwrap")
    assert failure.endswith(f"and {50 - LISTED} more")


# --- card DEKs within their bounds ----------------------------------------------------------


def test_a_card_dek_over_its_record_bound_fails() -> None:
    over = changed(lambda d: d["card_keys"][0].update(records=MAX_RECORDS + 1))
    assert judge(over, NOW).failures == [
        f"card DEK dek_a encrypts {MAX_RECORDS + 1} records, over its bound of {MAX_RECORDS}"
    ]
    at_bound = changed(lambda d: d["card_keys"][0].update(records=MAX_RECORDS))
    assert judge(at_bound, NOW).failures == []


def test_a_card_dek_used_for_new_records_past_its_cryptoperiod_fails() -> None:
    created = T - 3 * DAY
    too_long = changed(
        lambda d: d["card_keys"][0].update(last_record=created + MAX_AGE + SLACK_SECONDS + 1)
    )
    [failure] = judge(too_long, NOW).failures
    assert failure.startswith("card DEK dek_a took new records for 1.0")
    assert failure.endswith("past its cryptoperiod of 1.0 days")
    within_slack = changed(
        lambda d: d["card_keys"][0].update(last_record=created + MAX_AGE + SLACK_SECONDS)
    )
    assert judge(within_slack, NOW).failures == []
    unused = changed(lambda d: d["card_keys"][0].update(first_record=None, last_record=None))
    assert judge(unused, NOW).failures == []


def test_an_old_card_dek_still_decrypting_is_not_a_failure() -> None:
    """A card DEK made long ago keeps decrypting its records: only new records count."""
    old = changed(lambda d: d["card_keys"][0].update(created=T - 400 * DAY))
    old["card_keys"][0]["last_record"] = T - 400 * DAY + 3600
    assert judge(old, NOW).failures == []


# --- rewrap after a rotation -----------------------------------------------------------------


def enable_old(data: dict[str, Any], age_days: int) -> None:
    version(data, "1").update(state="enabled", created=T - age_days * DAY)
    move_keys(data, {"card": 1, "fingerprint": 1})


def test_keys_left_under_a_superseded_version_past_the_cryptoperiod_fail_as_rewrap_pending() -> (
    None
):
    pending = changed(lambda d: enable_old(d, 91))
    assert judge(pending, NOW).failures == [
        "rewrap pending: 2 data key(s) still wrapped under KEK version 1, 91.0 days old "
        "(cryptoperiod 90 days)"
    ]


def test_keys_under_a_superseded_version_within_the_cryptoperiod_pass() -> None:
    """Rotated early (say after 10 days): the old version is still within its period."""
    assert judge(changed(lambda d: enable_old(d, 10)), NOW).failures == []


def test_an_old_superseded_version_holding_no_keys_passes() -> None:
    old_empty = changed(lambda d: version(d, "1").update(state="enabled", created=T - 400 * DAY))
    assert judge(old_empty, NOW).failures == []


def test_every_failure_is_also_a_judged_line() -> None:
    def break_two_rules(data: dict[str, Any]) -> None:
        version(data, "2").update(created=T - 100 * DAY)
        enable_old(data, 95)

    result = judge(changed(break_two_rules), NOW)
    assert len(result.failures) == 2
    assert [line for line in result.judged if line.startswith("fail: ")] == [
        f"fail: {f}" for f in result.failures
    ]
