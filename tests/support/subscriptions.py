"""Helpers for the stored-credential, card-update and recovery tests: a setup payment and its
payment method, a renewal, reads, the ledger's postings, and card numbers no other test uses
(the simulators are shared by the session, and a card's scripted answers or account updates
must be the test's own)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg
import httpx

from tests.conftest import ApiMerchant, create_merchant
from tests.support.payments import APPROVED, configure_routing, post, tokenize
from tests.support.processes import ServiceProcess
from tests.support.vault_helpers import luhn_complete


def shop_at(
    api_env: dict[str, str],
    vault: ServiceProcess,
    admin: str,
    label: str,
    processor: str,
    *flags: str,
) -> ApiMerchant:
    """A merchant routed to `processor` only (so its setups' processor is known), configured
    with `flags` too (e.g. `--recovery`)."""
    shop = create_merchant(api_env, vault, admin, f"{label} {processor} {' '.join(flags)}".strip())
    configure_routing(api_env, shop, "--processors", processor, *flags)
    return shop


def unused_visa() -> str:
    """A Visa number no other test uses (not in the simulators' card table: approved)."""
    return luhn_complete("4" + "".join(secrets.choice("0123456789") for _ in range(14)))


def unused_mastercard() -> str:
    return luhn_complete("55" + "".join(secrets.choice("0123456789") for _ in range(13)))


def setup_payment(
    api: ServiceProcess, vault: ServiceProcess, shop: ApiMerchant, number: str = APPROVED
) -> dict[str, Any]:
    body = {
        "amount": 1200,
        "currency": "EUR",
        "token": tokenize(vault, shop, number),
        "setup_future_usage": "off_session",
    }
    response = post(api, shop, "/v1/payments", body)
    assert response.status_code == 201, response.text
    payment: dict[str, Any] = response.json()
    return payment


def renew(
    api: ServiceProcess,
    shop: ApiMerchant,
    payment_method: str,
    reason: str = "recurring",
    key: str | None = None,
) -> httpx.Response:
    body = {
        "amount": 1200,
        "currency": "EUR",
        "payment_method": payment_method,
        "off_session": True,
        "mit_reason": reason,
    }
    return post(api, shop, "/v1/payments", body, key)


def get(api: ServiceProcess, shop: ApiMerchant, path: str, **params: Any) -> httpx.Response:
    return httpx.get(api.url + path, headers=shop.auth, params=params, timeout=10)


def postings(api_env: dict[str, str], payment_id: str) -> list[str]:
    async def read() -> list[str]:
        conn = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        try:
            rows = await conn.fetch(
                "SELECT kind FROM ledger_postings WHERE payment_id = $1 ORDER BY kind", payment_id
            )
        finally:
            await conn.close()
        return [row["kind"] for row in rows]

    return asyncio.run(read())


def authorizations_and_captures(api_env: dict[str, str], payment_id: str) -> tuple[int, int]:
    """How many authorization and capture postings the payment has in the ledger."""
    kinds = postings(api_env, payment_id)
    return kinds.count("authorization"), kinds.count("capture")


def execute(api_env: dict[str, str], sql: str, *args: Any) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    asyncio.run(run())
