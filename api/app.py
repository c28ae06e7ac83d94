"""The payment API's app factory: the one place its clients, services and handlers are wired."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from api.auth import MerchantKeys
from api.connectors.psp_a import PspAConnector
from api.routes.payments import PaymentController, RefundController
from api.services.operations import OperationService
from api.services.payments import PaymentService
from api.settings import MAX_BODY_BYTES, ApiSettings
from api.storage.idempotency import IdempotencyRepository, ReplayCache
from api.vault_client import VaultClient
from tessera.runtime.service import build_app


def _payments(state: State) -> PaymentService:
    service: PaymentService = state.payment_service
    return service


def _operations(state: State) -> OperationService:
    service: OperationService = state.operation_service
    return service


def create_app(settings: ApiSettings) -> Litestar:
    @asynccontextmanager
    async def api_lifespan(app: Litestar) -> AsyncIterator[None]:
        state = app.state
        # The vault answers after its own forward time-out; wait a little longer for it.
        vault = VaultClient(
            settings.vault_url,
            settings.vault_service_token,
            settings.authorization_timeout_seconds + 2,
        )
        connector = PspAConnector(
            vault,
            base_url=settings.psp_a_url,
            api_key=settings.psp_a_api_key,
            timeout_seconds=settings.authorization_timeout_seconds,
        )
        retention = settings.idempotency_retention_hours * 3600
        state.merchant_keys = MerchantKeys(state.pool)
        state.payment_service = PaymentService(
            pool=state.pool,
            vault=vault,
            connector=connector,
            keys=IdempotencyRepository(retention, settings.idempotency_lease_seconds),
            replays=ReplayCache(state.redis, retention),
        )
        state.operation_service = OperationService(
            pool=state.pool,
            connector=connector,
            keys=state.payment_service.keys,
            replays=state.payment_service.replays,
            lease_seconds=float(settings.idempotency_lease_seconds),
        )
        try:
            yield
        finally:
            await connector.close()
            await vault.close()

    return build_app(
        service="api",
        title="Tessera payment API",
        settings=settings,
        migrations_package="api.migrations",
        route_handlers=[PaymentController, RefundController],
        dependencies={
            "payments": Provide(_payments, sync_to_thread=False),
            "operations": Provide(_operations, sync_to_thread=False),
        },
        max_body_bytes=MAX_BODY_BYTES,
        service_lifespan=api_lifespan,
    )
