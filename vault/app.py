"""The vault's app factory: the one place its clients, key ring and handlers are wired."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from prometheus_client import Gauge

from tessera.runtime.commands import app_in_worker
from tessera.runtime.service import build_app
from vault.audit import AuditLog
from vault.card_updates import CardUpdateController
from vault.cors import TokenPreflight
from vault.elements.routes import ElementsController
from vault.fingerprints import FingerprintController
from vault.forward import Forwarder
from vault.key_inventory import KeyInventoryController
from vault.keys import KeyRepository, KeyService
from vault.kms.base import KeyManagementService
from vault.listeners import listener_guard
from vault.merchants import MerchantDirectory, MerchantRepository
from vault.monitoring import AlarmedAuditLog, Alarms, MonitoredKms, following
from vault.openapi import DOCUMENT
from vault.routes import AdminController, ForwardController, TokenController
from vault.settings import MAX_BODY_BYTES, VaultSettings, VaultWorkerSettings
from vault.tokens import CvcStore, TokenRepository, TokenService


async def open_kms(settings: VaultSettings | VaultWorkerSettings) -> KeyManagementService:
    if settings.kms_provider == "gcp":
        from vault.kms.gcp import CloudKms

        return await CloudKms.connect(
            settings.gcp_kms_key_name, endpoint=settings.gcp_kms_endpoint or None
        )
    from vault.kms.local import LocalKms, default_keyring_path

    path = settings.local_kms_path or str(default_keyring_path())
    if not settings.production:
        # Development only (production refuses the local KMS): a first start makes its keyring.
        LocalKms.create_keyring(path)
    return LocalKms.open(path)


async def _audit_log(state: State) -> AuditLog:
    if state.audit is None:
        async with state.audit_lock:
            if state.audit is None:
                key = await state.key_service.audit_key()
                state.audit = AlarmedAuditLog(state.pool, key, state.alarms)
    audit: AuditLog = state.audit
    return audit


def _merchants(state: State) -> MerchantRepository:
    return MerchantRepository(state.pool)


def create_app(settings: VaultSettings, kms: KeyManagementService | None = None) -> Litestar:
    @asynccontextmanager
    async def vault_lifespan(app: Litestar) -> AsyncIterator[None]:
        state = app.state
        state.alarms = Alarms(state.metrics.registry)  # PCI DSS 10.7.2: vault/monitoring.py
        state.kms = MonitoredKms(kms or await open_kms(settings), state.alarms)
        state.key_service = KeyService(state.kms, KeyRepository(state.pool))
        kms_calls = Gauge(
            "vault_kms_calls",
            "Requests this process has sent to the KMS since it started.",
            registry=state.metrics.registry,
        )
        kms_calls.set_function(lambda: state.kms.calls)
        state.audit = None  # made on first use: the audit key needs the schema and the KMS
        state.audit_lock = asyncio.Lock()
        state.merchant_directory = MerchantDirectory(state.pool)
        state.tokens = TokenService(
            state.key_service,
            TokenRepository(state.pool),
            CvcStore(state.redis, settings.cvc_ttl_seconds),
        )
        state.forwarder = Forwarder(
            dict(settings.forward_destinations),
            settings.forward_timeout_seconds,
            public_only=settings.production,
        )
        try:
            async with following(state.alarms, state.redis, settings.monitor_refresh_seconds):
                yield
        finally:
            await state.forwarder.close()
            if kms is None:
                await state.kms.close()

    def provide(name: str) -> Provide:
        def dependency(state: State) -> Any:
            return getattr(state, name)

        return Provide(dependency, sync_to_thread=False)

    dependencies = {
        "keys": provide("key_service"),
        "audit": Provide(_audit_log),
        **{name: provide(name) for name in ("tokens", "forwarder", "kms")},
    }
    dependencies["merchants"] = Provide(_merchants, sync_to_thread=False)
    by_port = settings.listeners_by_port()
    return build_app(
        service="vault",
        title="Tessera vault",
        settings=settings,
        migrations_package="vault.migrations",
        route_handlers=[
            TokenController,
            CardUpdateController,
            ForwardController,
            AdminController,
            FingerprintController,
            KeyInventoryController,
            ElementsController,
        ],
        dependencies=dependencies,
        max_body_bytes=MAX_BODY_BYTES,
        service_lifespan=vault_lifespan,
        wrap_handler=TokenPreflight,
        document=DOCUMENT,
        guards=[listener_guard(by_port)] if len(by_port) > 1 else [],
    )


def app_from_environment() -> Litestar:
    """One worker process's app when `TESSERA_VAULT_WORKERS` > 1 (uvicorn's factory)."""
    app: Litestar = app_in_worker(VaultSettings, create_app, "vault")
    return app
