"""The payment API's settings (environment variables `TESSERA_API_*`, plus `TESSERA_MODE`)."""

from __future__ import annotations

from typing import ClassVar

from tessera.runtime.settings import ServiceSettings, check_secret, validate_url


class ApiSettings(ServiceSettings, frozen=True, kw_only=True):
    env_prefix: ClassVar[str] = "TESSERA_API_"

    port: int = 8000
    database_url: str = "postgresql://tessera_api@127.0.0.1:5432/tessera_api"
    redis_url: str = "redis://127.0.0.1:6379/0"
    db_pool_max: int = 8
    #: Where the vault's service port answers.
    vault_url: str = "http://127.0.0.1:8100"
    #: The API's credential at the vault.
    vault_service_token: str

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_url(self.vault_url, ("http", "https"), self.env_name("vault_url"))
        check_secret(self.vault_service_token, self.env_name("vault_service_token"))

    def production_problems(self) -> list[str]:
        problems = []
        if not self.vault_url.startswith("https://"):
            problems.append("TESSERA_API_VAULT_URL must use https:// (mTLS to the vault)")
        return problems


#: The largest request body the API reads.
MAX_BODY_BYTES = 64 * 1024
