"""Where the running stack is, and read-only ways to look at it.

Every setting is an environment variable `TESSERA_PCI_*` (or a file named by `…_FILE`); the
defaults are `make up`'s stack. The kit needs the vault's admin credential and a role that can
read both databases (`tessera_auditor`: member of `pg_read_all_data`, created by
`tessera dev setup`; in production the platform makes it), and nothing else.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import asyncpg
import httpx

from tessera.runtime.settings import BaseSettings, validate_url

Database = Literal["api", "vault"]


class EvidenceSettings(BaseSettings, frozen=True, kw_only=True):
    env_prefix: ClassVar[str] = "TESSERA_PCI_"
    #: The vault administrator's credential keeps the vault's own name.
    VAULT_NAMES: ClassVar[dict[str, str]] = {"vault_admin_token": "TESSERA_VAULT_ADMIN_TOKEN"}

    #: The payment API (its /metrics, its routes for the caller matrix).
    api_url: str = "http://127.0.0.1:8000"
    #: The vault's three listeners; the service and admin ones default to the public one (one
    #: port in development).
    vault_url: str = "http://127.0.0.1:8100"
    vault_service_url: str = ""
    vault_admin_url: str = ""
    vault_admin_token: str = ""
    #: Read access to the two databases (a role that can SELECT everything and change nothing).
    api_database_url: str = "postgresql://tessera_auditor@127.0.0.1:5432/tessera_api"
    vault_database_url: str = "postgresql://tessera_auditor@127.0.0.1:5432/tessera_vault"
    #: The services' Postgres roles (tessera/dbsetup.py names them; the platform does in
    #: production): the runtime roles the services log in as, and the owners that run migrations.
    #: The kit reads their privileges from the catalog; it never logs in as them.
    vault_runtime_role: str = "tessera_vault"
    vault_owner_role: str = "tessera_vault_owner"
    api_runtime_role: str = "tessera_api"
    api_owner_role: str = "tessera_api_owner"
    #: The two Redis databases: the API's (idempotency, routing) and the vault's (CVCs).
    api_redis_url: str = "redis://127.0.0.1:6379/0"
    vault_redis_url: str = "redis://127.0.0.1:6379/1"
    #: Log files or directories of every service (directories: every file below them).
    log_paths: tuple[str, ...] = (".run/logs",)
    #: The vault's CVC time-to-live (TESSERA_VAULT_CVC_TTL_SECONDS): no entry may be older.
    cvc_ttl_seconds: int = 0
    #: The card retention policy (PCI DSS 3.2.1): the vault's default period in days
    #: (TESSERA_VAULT_CARD_RETENTION_DAYS) and how often its worker sweeps
    #: (TESSERA_VAULT_RETENTION_INTERVAL_SECONDS); a sweep older than two intervals fails.
    card_retention_days: int = 400
    retention_interval_seconds: float = 3600.0
    #: Where `make segmentation` writes its latest result.
    segmentation_result: str = ".run/segmentation/latest.json"
    #: A merchant's publishable key and one of its registered origins, to fetch the card-fields
    #: page as a browser would (its CSP and frame-ancestors); empty: that part is not checked.
    publishable_key: str = ""
    checkout_origin: str = ""
    #: Seconds each HTTP call may take.
    http_timeout_seconds: float = 10.0

    @classmethod
    def env_name(cls, field: str) -> str:
        return cls.VAULT_NAMES.get(field) or super().env_name(field)

    def __post_init__(self) -> None:
        for name in ("api_url", "vault_url", "vault_service_url", "vault_admin_url"):
            value = getattr(self, name)
            if value:
                validate_url(value, ("http", "https"), self.env_name(name))
        for name in ("api_database_url", "vault_database_url"):
            validate_url(getattr(self, name), ("postgresql", "postgres"), self.env_name(name))

    @property
    def service_url(self) -> str:
        return self.vault_service_url or self.vault_url

    @property
    def admin_url(self) -> str:
        return self.vault_admin_url or self.vault_url


@dataclass
class EvidenceContext:
    """What every check is given: the settings, the clock, the repository, an HTTP client."""

    settings: EvidenceSettings
    #: The time the report is for: injectable, so a test can move the clock (cryptoperiods).
    now: datetime.datetime
    #: The repository checkout (docs/, uv.lock, deploy/).
    root: Path
    #: Where the report goes; checks may leave artifacts beside it (the SBOM).
    out: Path
    #: Let the kit run `make segmentation` itself (root, minutes) instead of reading the last one.
    run_segmentation: bool = False
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(timeout=self.settings.http_timeout_seconds)

    async def close(self) -> None:
        await self.http.aclose()

    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.settings.vault_admin_token}"}

    @asynccontextmanager
    async def database(self, which: Database) -> AsyncIterator[asyncpg.Connection[Any]]:
        """A connection to one database in a read-only session: the kit cannot write by mistake."""
        url = self.settings.api_database_url if which == "api" else self.settings.vault_database_url
        conn: asyncpg.Connection[Any] = await asyncpg.connect(
            url, timeout=10, server_settings={"default_transaction_read_only": "on"}
        )
        try:
            yield conn
        finally:
            await conn.close()
