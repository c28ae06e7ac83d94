"""The vault's settings (environment variables `TESSERA_VAULT_*`, plus `TESSERA_MODE`)."""

from __future__ import annotations

import hmac
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from tessera.runtime import redis_client
from tessera.runtime.redis_client import is_tls_url
from tessera.runtime.settings import (
    BaseSettings,
    LogLevel,
    ServiceSettings,
    check_secret,
    is_loopback_url,
    validate_url,
)
from vault.forward import Destination

#: The vault's listeners: `public` faces browsers (through the ingress), `service` the payment
#: API, `admin` the administrators. Each has its own port in production, so a network policy
#: can admit each caller to its own listener only.
Listener = Literal["public", "service", "admin"]


class VaultSettings(ServiceSettings, frozen=True, kw_only=True):
    env_prefix: ClassVar[str] = "TESSERA_VAULT_"

    #: The browser-facing listener: hosted card fields, tessera.js, POST /v1/tokens.
    port: int = 8100
    #: The payment API's listener (token metadata, forwarding); 0: served on `port`.
    service_port: int = 0
    #: The administrators' listener (merchants, keys, audit, break-glass); 0: served on `port`.
    admin_port: int = 0
    database_url: str = "postgresql://tessera_vault@127.0.0.1:5432/tessera_vault"
    redis_url: str = "redis://127.0.0.1:6379/1"
    db_pool_max: int = 6
    #: Bearer credential of the payment API (in production, mTLS identity as well).
    service_token: str
    #: Bearer credential of vault administrators (key rotation, audit, merchant registry).
    admin_token: str
    kms_provider: Literal["local", "gcp"] = "local"
    #: The local KMS's keyring file (outside the repository; `tessera dev setup` creates it).
    local_kms_path: str = ""
    #: projects/P/locations/L/keyRings/R/cryptoKeys/K, for kms_provider=gcp.
    gcp_kms_key_name: str = ""
    #: host:port of a plaintext gRPC KMS (tests and local emulation only; refused in production).
    gcp_kms_endpoint: str = ""
    #: How long a CVC is held (sealed, in Redis) for its one authorization; at most an hour.
    cvc_ttl_seconds: int = 3600
    #: Where the forwarding proxy may send card data: {"psp_a": {"url": ..., "paths": [...]}}.
    forward_destinations: dict[str, Destination] = {}
    forward_timeout_seconds: float = 10.0
    #: Break-glass detokenizations per administrator credential per minute.
    detokenize_per_minute: int = 5
    #: mTLS identity of the payment API, as a service mesh's sidecar vouches for it in the
    #: `X-Forwarded-Client-Cert` header (SPIFFE URIs, e.g.
    #: spiffe://cluster.local/ns/tessera-app/sa/tessera-api). Honoured only when
    #: `trust_forwarded_client_cert` is on, i.e. when only the sidecar can reach the vault.
    service_identities: list[str] = []
    trust_forwarded_client_cert: bool = False
    #: The vault's origin as browsers reach it (https://vault.example), for the hosted card
    #: fields; empty: the origin of each request (its scheme and Host header).
    public_origin: str = ""
    #: How long a KEK version may stay primary, in days: Terraform's `rotation_period` (90 days,
    #: deploy/terraform/modules/kms). The key inventory reports it; the assessor's kit fails a
    #: primary version older than it.
    kek_cryptoperiod_days: int = 90
    #: How often this process copies the latest verifications (the worker's audit chain and
    #: payment-page checks) from Redis into its /metrics gauges (vault/monitoring.py).
    monitor_refresh_seconds: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.05 <= self.monitor_refresh_seconds <= 300:
            raise ValueError(f"{self.env_name('monitor_refresh_seconds')}: 0.05 to 300 seconds")
        check_secret(self.service_token, self.env_name("service_token"))
        check_secret(self.admin_token, self.env_name("admin_token"))
        if hmac.compare_digest(self.service_token, self.admin_token):
            raise ValueError(
                f"{self.env_name('admin_token')} must differ from {self.env_name('service_token')}"
            )
        if not 1 <= self.cvc_ttl_seconds <= 3600:
            raise ValueError(f"{self.env_name('cvc_ttl_seconds')}: between 1 and 3600 seconds")
        if self.kms_provider == "gcp" and not self.gcp_kms_key_name.startswith("projects/"):
            raise ValueError(f"{self.env_name('gcp_kms_key_name')}: a full Cloud KMS key name")
        extra = [p for p in (self.service_port, self.admin_port) if p]
        if any(not 1 <= p <= 65535 for p in extra) or len({self.port, *extra}) != 1 + len(extra):
            raise ValueError(
                f"{self.env_name('service_port')} and {self.env_name('admin_port')}: TCP ports, "
                f"distinct from each other and from {self.env_name('port')} (or 0: on that port)"
            )
        if self.trust_forwarded_client_cert and not self.service_identities:
            raise ValueError(
                f"{self.env_name('trust_forwarded_client_cert')} needs "
                f"{self.env_name('service_identities')}"
            )
        if not 1 <= self.kek_cryptoperiod_days <= 3650:
            raise ValueError(f"{self.env_name('kek_cryptoperiod_days')}: 1 to 3650 days")
        if self.public_origin:
            parts = urlsplit(self.public_origin)
            # Compared with browsers' Origin headers, which are lower-case and have no slash.
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(
                    f"{self.env_name('public_origin')}: scheme://host[:port], nothing more"
                )
        for name, destination in self.forward_destinations.items():
            if not destination.url.startswith(("http://", "https://")) or not destination.paths:
                raise ValueError(
                    f"{self.env_name('forward_destinations')}: {name} needs an http(s) url "
                    "and at least one path"
                )

    def listen_ports(self) -> list[int]:
        return sorted({self.port, self.service_port or self.port, self.admin_port or self.port})

    def listeners_by_port(self) -> dict[int, frozenset[Listener]]:
        """Which listeners each bound port serves (all three on one port in development)."""
        served: dict[int, set[Listener]] = {port: set() for port in self.listen_ports()}
        served[self.port].add("public")
        served[self.service_port or self.port].add("service")
        served[self.admin_port or self.port].add("admin")
        return {port: frozenset(names) for port, names in served.items()}

    def production_problems(self) -> list[str]:
        problems = []
        if not self.service_port or not self.admin_port:
            problems.append(
                "TESSERA_VAULT_SERVICE_PORT and TESSERA_VAULT_ADMIN_PORT (production keeps the "
                "browser-facing, service and admin listeners on separate ports)"
            )
        if self.kms_provider == "local":
            problems.append("TESSERA_VAULT_KMS_PROVIDER=local (use gcp)")
        if self.gcp_kms_endpoint:
            problems.append("TESSERA_VAULT_GCP_KMS_ENDPOINT (a plaintext KMS endpoint)")
        if not is_tls_url(self.redis_url):
            problems.append("TESSERA_VAULT_REDIS_URL must use TLS (rediss:// or rediss+cluster://)")
        for name, destination in self.forward_destinations.items():
            if not destination.url.startswith("https://") or is_loopback_url(destination.url):
                problems.append(f"forward destination {name} must be https and not loopback")
        return problems


#: The largest request body the vault reads; a card never needs more.
MAX_BODY_BYTES = 8 * 1024


#: A merchant's own card retention (`card_retention_days`), in days. At least a week: a forward
#: refreshes a token's `last_used_at` at most once a day, so a shorter period could shred a card
#: used the day before; at most ten years.
RETENTION_DAYS_MIN = 7
RETENTION_DAYS_MAX = 3650


class VaultWorkerSettings(BaseSettings, frozen=True, kw_only=True):
    """`python -m vault worker`: the vault's own variables, only those the worker needs.

    It serves nothing, so it holds neither the service nor the admin credential.
    """

    env_prefix: ClassVar[str] = "TESSERA_VAULT_"

    database_url: str = "postgresql://tessera_vault@127.0.0.1:5432/tessera_vault"
    redis_url: str = "redis://127.0.0.1:6379/1"
    db_timeout_seconds: float = 5.0
    log_level: LogLevel = "info"
    kms_provider: Literal["local", "gcp"] = "local"
    local_kms_path: str = ""
    gcp_kms_key_name: str = ""
    gcp_kms_endpoint: str = ""
    #: A live token unused for this many days is crypto-shredded (PCI DSS 3.2.1), unless its
    #: merchant registered a period of its own. 400: a card kept for a yearly renewal is used
    #: every 365 days, and the rest is a month of retries and late renewals.
    card_retention_days: int = 400
    #: How often the retention sweep runs (across all workers: one of them runs it).
    retention_interval_seconds: float = 3600.0
    #: How often the worker looks for a job that is due.
    worker_poll_seconds: float = 5.0
    #: A file the worker touches after every poll and every batch, for a liveness check.
    worker_heartbeat_path: str = ""
    #: The vault's origin as browsers reach it (the server's variable too): the payment-page
    #: check (vault/watchdog.py) fetches the card fields from there, through the edge, as a
    #: browser does. Empty (development): http://127.0.0.1 on the vault's port.
    public_origin: str = ""
    port: int = 8100
    #: How often the served payment page is compared with the script inventory (PCI DSS 11.6.1).
    scripts_check_interval_seconds: float = 300.0
    #: A merchant's publishable key and one of its registered origins (a merchant registered for
    #: monitoring), to fetch card.html as a checkout page does; empty: that part is not checked.
    scripts_check_publishable_key: str = ""
    scripts_check_origin: str = ""
    #: How often every audit chain is verified (PCI DSS 10.3.4, 10.7.2).
    audit_verify_interval_seconds: float = 3600.0

    @property
    def public_url(self) -> str:
        """Where the worker fetches the payment page from."""
        return (self.public_origin or f"http://127.0.0.1:{self.port}").rstrip("/")

    def __post_init__(self) -> None:
        validate_url(self.database_url, ("postgresql", "postgres"), self.env_name("database_url"))
        validate_url(self.redis_url, redis_client.SCHEMES, self.env_name("redis_url"))
        if problem := redis_client.cluster_url_problem(self.redis_url):
            raise ValueError(f"{self.env_name('redis_url')}: {problem}")
        if not RETENTION_DAYS_MIN <= self.card_retention_days <= RETENTION_DAYS_MAX:
            raise ValueError(
                f"{self.env_name('card_retention_days')}: "
                f"{RETENTION_DAYS_MIN} to {RETENTION_DAYS_MAX} days"
            )
        if not 60 <= self.retention_interval_seconds <= 86400:
            raise ValueError(f"{self.env_name('retention_interval_seconds')}: 60 to 86400")
        if not 0.05 <= self.worker_poll_seconds <= 300:
            raise ValueError(f"{self.env_name('worker_poll_seconds')}: 0.05 to 300 seconds")
        if self.db_timeout_seconds <= 0:
            raise ValueError(f"{self.env_name('db_timeout_seconds')}: must be positive")
        if self.kms_provider == "gcp" and not self.gcp_kms_key_name.startswith("projects/"):
            raise ValueError(f"{self.env_name('gcp_kms_key_name')}: a full Cloud KMS key name")
        for name in ("scripts_check_interval_seconds", "audit_verify_interval_seconds"):
            if not 60 <= getattr(self, name) <= 86400:
                raise ValueError(f"{self.env_name(name)}: 60 to 86400 seconds")
        if self.public_origin:
            parts = urlsplit(self.public_origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(
                    f"{self.env_name('public_origin')}: scheme://host[:port], nothing more"
                )
        if bool(self.scripts_check_publishable_key) != bool(self.scripts_check_origin):
            raise ValueError(
                f"{self.env_name('scripts_check_publishable_key')} and "
                f"{self.env_name('scripts_check_origin')}: both, or neither"
            )

    def production_problems(self) -> list[str]:
        problems = []
        if self.kms_provider == "local":
            problems.append("TESSERA_VAULT_KMS_PROVIDER=local (use gcp)")
        if self.gcp_kms_endpoint:
            problems.append("TESSERA_VAULT_GCP_KMS_ENDPOINT (a plaintext KMS endpoint)")
        if not is_tls_url(self.redis_url):
            problems.append("TESSERA_VAULT_REDIS_URL must use TLS (rediss:// or rediss+cluster://)")
        if not self.public_origin.startswith("https://"):
            problems.append(
                "TESSERA_VAULT_PUBLIC_ORIGIN (https): the payment-page check fetches the card "
                "fields where browsers do"
            )
        return problems
