"""The vault's settings (environment variables `TESSERA_VAULT_*`, plus `TESSERA_MODE`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from tessera.runtime.settings import ServiceSettings, check_secret


class VaultSettings(ServiceSettings, frozen=True, kw_only=True):
    env_prefix: ClassVar[str] = "TESSERA_VAULT_"

    port: int = 8100
    database_url: str = "postgresql://tessera_vault@127.0.0.1:5432/tessera_vault"
    redis_url: str = "redis://127.0.0.1:6379/1"
    db_pool_max: int = 6
    #: Bearer credential of the payment API (in production, mTLS identity as well).
    service_token: str
    #: Bearer credential of vault administrators (key rotation, audit, merchant registry).
    admin_token: str
    kms_provider: Literal["local", "gcp"] = "local"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_secret(self.service_token, self.env_name("service_token"))
        check_secret(self.admin_token, self.env_name("admin_token"))
        if self.service_token == self.admin_token:
            raise ValueError(
                f"{self.env_name('admin_token')} must differ from {self.env_name('service_token')}"
            )

    def production_problems(self) -> list[str]:
        problems = []
        if self.kms_provider == "local":
            problems.append("TESSERA_VAULT_KMS_PROVIDER=local (use gcp)")
        if not self.redis_url.startswith("rediss://"):
            problems.append("TESSERA_VAULT_REDIS_URL must use TLS (rediss://)")
        return problems


#: The largest request body the vault reads; a card never needs more.
MAX_BODY_BYTES = 8 * 1024
