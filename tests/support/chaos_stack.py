"""The whole stack on private storage (a private Postgres cluster, or a multi-host DSN over a
primary and its standbys, and a private Redis or any Redis URL), for the storage chaos
campaigns: own KMS keyring, own credentials, free ports, one merchant with its test-card
tokens."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.history import Sources
from tests.support.stack import Stack, start_stack
from vault.kms.local import LocalKms

#: Approved, approved, approved, declined: what the history workload pays with.
CARDS = ("4242424242424242", "5555555555554444", "4242424242424242", "4000000000000002")


def private_env(
    work: Path, database_env: dict[str, str], redis_api: str, redis_vault: str
) -> dict[str, str]:
    """Everything the services need but ports: databases, Redis, a fresh KMS keyring, tokens."""
    keyring = work / "kms" / "keyring.json"
    LocalKms.create_keyring(str(keyring))
    service_token, admin_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    return {
        "TESSERA_MODE": "development",
        **database_env,
        "TESSERA_API_REDIS_URL": redis_api,
        "TESSERA_VAULT_REDIS_URL": redis_vault,
        "TESSERA_VAULT_LOCAL_KMS_PATH": str(keyring),
        "TESSERA_VAULT_SERVICE_TOKEN": service_token,
        "TESSERA_API_VAULT_SERVICE_TOKEN": service_token,
        "TESSERA_VAULT_ADMIN_TOKEN": admin_token,
        # Nothing is in flight when a campaign stops its stack: no reason to wait.
        "TESSERA_API_SHUTDOWN_TIMEOUT_SECONDS": "1",
        "TESSERA_VAULT_SHUTDOWN_TIMEOUT_SECONDS": "1",
    }


@dataclass
class Shop:
    merchant_id: str
    secret_key: str
    publishable_key: str
    tokens: list[str]

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.secret_key}"}

    def sources(self, stack: Stack, *, psp_b: bool = False) -> Sources:
        return Sources(
            api_url=stack.urls["api"],
            auth=self.auth,
            merchant_id=self.merchant_id,
            api_database_url=stack.env["TESSERA_API_DATABASE_URL"],
            psp_a_url=stack.urls["psp_a"],
            psp_b_url=stack.urls["psp_b"] if psp_b else None,
        )


def open_shop(stack: Stack, name: str, *configure: str, cards: tuple[str, ...] = CARDS) -> Shop:
    """A merchant (`tessera merchants create`, and `configure` if options are given) and one
    token per card (no CVC: a CVC is for one authorization, and the workload reuses tokens)."""
    created = stack.create_merchant(name, *configure)
    tokens = []
    with httpx.Client(base_url=stack.urls["vault"], timeout=10) as http:
        for number in cards:
            response = http.post(
                "/v1/tokens",
                json={"number": number, "exp_month": 12, "exp_year": 2040},
                headers={"authorization": f"Bearer {created['publishable_key']}"},
            )
            response.raise_for_status()
            tokens.append(response.json()["id"])
    return Shop(created["merchant_id"], created["secret_key"], created["publishable_key"], tokens)


__all__ = ["CARDS", "Shop", "open_shop", "private_env", "start_stack"]
