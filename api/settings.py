"""The payment API's settings (environment variables `TESSERA_API_*`, plus `TESSERA_MODE`)."""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from core.errors import TesseraError
from core.recovery import Caps, scheme_caps
from tessera.runtime.settings import BaseSettings, ServiceSettings, check_secret, validate_url


class ApiSettings(ServiceSettings, frozen=True, kw_only=True):
    env_prefix: ClassVar[str] = "TESSERA_API_"

    port: int = 8000
    database_url: str = "postgresql://tessera_api@127.0.0.1:5432/tessera_api"
    #: A read replica (streaming standby) for the list endpoints only; empty: the primary.
    #: What may read it, and why nothing else does: `api.storage.read_pools.ListReads`.
    read_database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    db_pool_max: int = 8
    #: Where the vault's service port answers.
    vault_url: str = "http://127.0.0.1:8100"
    #: The API's credential at the vault.
    vault_service_token: str
    #: A service mesh's sidecar carries the API's calls to the vault over mutual TLS (Istio
    #: with STRICT PeerAuthentication, deploy/k8s/): the API may then name the vault by an
    #: http:// URL, which the sidecar upgrades, in production too.
    vault_mesh_mtls: bool = False
    #: PSP A, for captures, voids, refunds and inquiries (authorizations go through the vault).
    psp_a_url: str = "http://127.0.0.1:8201"
    psp_a_api_key: str = "psp_a_test_key"
    #: PSP B (Adyen-like), and the key its notifications are signed with (hex).
    psp_b_url: str = "http://127.0.0.1:8202"
    psp_b_api_key: str = "psp_b_test_key"
    psp_b_hmac_key: str = "E92EF49F9B36436D3A9FBEFC305A24593559B43D854C8151FC9E242818957599"
    #: How long an authorization may take before its outcome is called unknown (`processing`).
    authorization_timeout_seconds: float = 10.0
    #: Payments this process works on at once (phases 1-3). More wait, before their key is
    #: claimed, so an overloaded process slows every payment a little instead of letting them
    #: all run into the authorization time-out (make bench: 1,000 in flight against a slow PSP).
    max_payments_in_flight: int = 256
    #: How long a payment waits for one of those slots before `503 at_capacity` (nothing was
    #: written; retrying with the same key is safe).
    admission_wait_seconds: float = 30.0
    #: How long idempotency keys (and their responses) are kept.
    idempotency_retention_hours: int = 24
    #: The lease on a key whose request is in flight: longer than any processor call, so a
    #: crashed request's key frees itself and a retry can finish it.
    idempotency_lease_seconds: int = 30
    #: Authorizations not captured within this are canceled by the worker (7 days).
    authorization_expiry_seconds: float = 7 * 24 * 3600
    #: A processor that has not heard of our reference this long after we sent it is taken not
    #: to have it: the reconciler calls the payment `failed` (and watches for a late one).
    processor_cutoff_seconds: float = 60.0
    #: After the cut-off, how long the worker keeps looking for a late authorization of a
    #: failed payment (to void or refund it).
    late_authorization_window_seconds: float = 24 * 3600
    #: How long the worker sleeps when it found nothing to do.
    worker_interval_seconds: float = 1.0
    #: How often the worker reads each PSP's account-updater list (once read to its end, the
    #: list rests this long, across every worker): real updaters publish in daily batches.
    card_update_poll_seconds: float = 300.0
    #: A file the worker touches after every cycle, for a liveness check; empty: none.
    worker_heartbeat_path: str = ""
    #: How long captured money waits before the merchant's balance shows it available.
    settlement_delay_seconds: float = 2 * 24 * 3600
    #: The key (hex, 32 bytes) that encrypts webhook signing secrets at rest (AES-256-GCM).
    webhook_secret_key: str = "7e57" * 16
    #: A webhook delivery's HTTP time-out.
    webhook_timeout_seconds: float = 10.0
    #: The first retry waits about this long; each next one twice as long, up to 6 hours.
    webhook_retry_base_seconds: float = 1.0
    #: A delivery not accepted within this is `failed` (3 days).
    webhook_retry_window_seconds: float = 3 * 24 * 3600
    #: An endpoint that has not accepted any delivery for this long is disabled (5 days).
    webhook_disable_after_seconds: float = 5 * 24 * 3600
    #: How many deliveries to one endpoint may be in flight at once (per worker).
    webhook_endpoint_concurrency: int = 4

    #: Recovery of declined renewals (docs/subscriptions.md): how long a recovery lasts after
    #: the first decline (the schemes count retries over 30 days: at most 30).
    recovery_window_days: int = 30
    #: The fixed schedule, used while the learned one has too little data: days after the
    #: first decline.
    recovery_fixed_schedule_days: str = "1,3,5,7"
    #: Answered retries of a decline kind the learned schedule needs before it decides.
    recovery_min_outcomes: int = 300
    #: Caps lower than the schemes', per brand, as JSON, e.g.
    #: {"visa": {"per_card": 8, "per_payment": 4}}; a missing number keeps the scheme's. A
    #: number above the scheme's is refused at start-up.
    recovery_caps: str = ""

    def recovery_schedule_days(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.recovery_fixed_schedule_days.split(",") if d.strip())

    def recovery_caps_by_brand(self) -> dict[str, Caps]:
        """The configured caps, each checked against its scheme's (core.recovery)."""
        if not self.recovery_caps:
            return {}
        raw = msgspec.json.decode(
            self.recovery_caps, type=dict[str, dict[str, Annotated[int, msgspec.Meta(ge=0)]]]
        )
        caps = {}
        for brand, numbers in raw.items():
            scheme = scheme_caps(brand)
            unknown = set(numbers) - {"per_card", "per_payment", "per_card_daily"}
            if unknown:
                raise ValueError(f"unknown caps {sorted(unknown)}")
            configured = Caps(
                numbers.get("per_card", scheme.per_card),
                numbers.get("per_payment", scheme.per_payment),
                numbers.get("per_card_daily", scheme.per_card_daily),
            )
            caps[brand] = scheme.lowered(configured)
        return caps

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.recovery_window_days <= 30:
            raise ValueError(f"{self.env_name('recovery_window_days')}: 1 to 30")
        try:
            days = self.recovery_schedule_days()
            if not days or any(not 0 < d <= 30 for d in days) or list(days) != sorted(days):
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{self.env_name('recovery_fixed_schedule_days')}: increasing days, 1 to 30, "
                "comma-separated"
            ) from None
        if not 0 < self.card_update_poll_seconds <= 86400:
            raise ValueError(f"{self.env_name('card_update_poll_seconds')}: 0 < s <= 86400")
        if self.recovery_min_outcomes < 1:
            raise ValueError(f"{self.env_name('recovery_min_outcomes')}: at least 1")
        try:
            self.recovery_caps_by_brand()
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TesseraError) as exc:
            raise ValueError(f"{self.env_name('recovery_caps')}: {exc}") from None
        if self.read_database_url:
            validate_url(
                self.read_database_url,
                ("postgresql", "postgres"),
                self.env_name("read_database_url"),
            )
        validate_url(self.vault_url, ("http", "https"), self.env_name("vault_url"))
        check_secret(self.vault_service_token, self.env_name("vault_service_token"))
        validate_url(self.psp_a_url, ("http", "https"), self.env_name("psp_a_url"))
        validate_url(self.psp_b_url, ("http", "https"), self.env_name("psp_b_url"))
        try:
            if len(bytes.fromhex(self.psp_b_hmac_key)) < 16:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{self.env_name('psp_b_hmac_key')}: at least 16 bytes, hex-encoded"
            ) from None
        if not 1 <= self.max_payments_in_flight <= 100_000:
            raise ValueError(f"{self.env_name('max_payments_in_flight')}: 1 to 100000")
        if not 0 < self.admission_wait_seconds <= 300:
            raise ValueError(f"{self.env_name('admission_wait_seconds')}: 0 < s <= 300")
        if not 0 < self.authorization_timeout_seconds <= 10:
            raise ValueError(f"{self.env_name('authorization_timeout_seconds')}: 0 < s <= 10")
        try:
            if len(bytes.fromhex(self.webhook_secret_key)) != 32:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{self.env_name('webhook_secret_key')}: exactly 32 bytes, hex-encoded"
            ) from None
        if not 1 <= self.webhook_endpoint_concurrency <= 64:
            raise ValueError(f"{self.env_name('webhook_endpoint_concurrency')}: 1 to 64")
        if self.idempotency_retention_hours < 24:
            raise ValueError(f"{self.env_name('idempotency_retention_hours')}: at least 24")
        if self.idempotency_lease_seconds <= self.authorization_timeout_seconds + 5:
            raise ValueError(
                f"{self.env_name('idempotency_lease_seconds')} must exceed the authorization "
                "time-out by more than 5 s"
            )

    def production_problems(self) -> list[str]:
        problems = []
        if not self.vault_url.startswith("https://") and not self.vault_mesh_mtls:
            problems.append(
                "TESSERA_API_VAULT_URL must use https:// (mTLS to the vault), unless "
                "TESSERA_API_VAULT_MESH_MTLS says a mesh sidecar provides it"
            )
        if not self.psp_a_url.startswith("https://") or self.psp_a_api_key == "psp_a_test_key":
            problems.append("PSP A needs an https URL and a real API key")
        if not self.psp_b_url.startswith("https://") or self.psp_b_api_key == "psp_b_test_key":
            problems.append("PSP B needs an https URL and a real API key")
        if self.webhook_secret_key == "7e57" * 16:
            problems.append("TESSERA_API_WEBHOOK_SECRET_KEY is the public development key")
        if self.psp_b_hmac_key.upper().startswith("E92EF49F"):
            problems.append("PSP B's notification key is the public development key")
        return problems


#: The largest request body the API reads.
MAX_BODY_BYTES = 64 * 1024


class OperatorSettings(BaseSettings, frozen=True, kw_only=True):
    """What operators' commands read (`tessera merchants …`, `tessera ledger check`): the API's
    database and the vault's admin listener, and none of the service's own secrets, so the
    admin toolbox that runs them holds only what onboarding needs."""

    env_prefix: ClassVar[str] = "TESSERA_API_"
    #: The vault administrator's two settings keep the vault's names.
    VAULT_NAMES: ClassVar[dict[str, str]] = {
        "vault_admin_url": "TESSERA_VAULT_ADMIN_URL",
        "vault_admin_token": "TESSERA_VAULT_ADMIN_TOKEN",
    }

    database_url: str = "postgresql://tessera_api@127.0.0.1:5432/tessera_api"
    db_timeout_seconds: float = 5.0
    vault_url: str = "http://127.0.0.1:8100"
    #: The vault's admin listener; empty: `vault_url` (one port in development).
    vault_admin_url: str = ""
    vault_admin_token: str = ""

    @classmethod
    def env_name(cls, field: str) -> str:
        return cls.VAULT_NAMES.get(field) or super().env_name(field)

    def __post_init__(self) -> None:
        validate_url(self.database_url, ("postgresql", "postgres"), self.env_name("database_url"))
        validate_url(self.vault_url, ("http", "https"), self.env_name("vault_url"))
        if self.vault_admin_url:
            validate_url(self.vault_admin_url, ("http", "https"), self.env_name("vault_admin_url"))
        if self.db_timeout_seconds <= 0:
            raise ValueError(f"{self.env_name('db_timeout_seconds')}: must be positive")
