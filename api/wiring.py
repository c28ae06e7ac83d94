"""The API's services and their clients, built once, for the web app and for the worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from redis.asyncio.cluster import RedisCluster

from api.connectors.base import Connector
from api.connectors.psp_a import PspAConnector
from api.connectors.psp_b import PspBConnector
from api.services.breaker import CircuitBreaker
from api.services.events import EventService, Publisher
from api.services.ledger import LedgerService
from api.services.notifications import NotificationService
from api.services.operations import OperationService
from api.services.payments import PaymentService
from api.services.recovery import RecoveryService
from api.services.routing import OutcomeStats
from api.services.webhooks import SecretBox, WebhookService
from api.settings import ApiSettings
from api.storage.idempotency import IdempotencyRepository, ReplayCache
from api.storage.read_pools import ListReads
from api.storage.redis_gate import RedisGate
from api.storage.routing import RoutingRepository
from api.vault_client import VaultClient
from core.recovery import FixedSchedule
from tessera.runtime.redis_client import RedisClient


@dataclass(frozen=True)
class Services:
    payments: PaymentService
    operations: OperationService
    recovery: RecoveryService
    notifications: NotificationService
    events: EventService
    webhooks: WebhookService
    ledger: LedgerService
    publisher: Publisher
    box: SecretBox


@asynccontextmanager
async def open_services(
    settings: ApiSettings, pool: Any, redis: RedisClient, read_pool: Any = None
) -> AsyncIterator[Services]:
    """`read_pool`: a replica's pool, which only the list endpoints read (`ListReads`); the
    worker passes none, so it reads the primary."""
    # The vault answers after its own forward time-out; wait a little longer for it.
    vault = VaultClient(
        settings.vault_url, settings.vault_service_token, settings.authorization_timeout_seconds + 2
    )
    connector = PspAConnector(
        vault,
        base_url=settings.psp_a_url,
        api_key=settings.psp_a_api_key,
        timeout_seconds=settings.authorization_timeout_seconds,
    )
    psp_b = PspBConnector(
        vault,
        base_url=settings.psp_b_url,
        api_key=settings.psp_b_api_key,
        timeout_seconds=settings.authorization_timeout_seconds,
    )
    connectors: dict[str, Connector] = {connector.name: connector, psp_b.name: psp_b}
    retention = settings.idempotency_retention_hours * 3600
    keys = IdempotencyRepository(retention, settings.idempotency_lease_seconds)
    # One per process: a Redis time-out spares every caller the next ones.
    gate = RedisGate(cluster=isinstance(redis, RedisCluster))
    replays = ReplayCache(redis, retention, gate)
    routing = RoutingRepository(pool)
    publisher = Publisher(settlement_delay_seconds=settings.settlement_delay_seconds)
    box = SecretBox(bytes.fromhex(settings.webhook_secret_key))
    lists = ListReads(pool, read_pool)
    recovery = RecoveryService(
        pool=pool,
        connectors=connectors,
        keys=keys,
        replays=replays,
        routing=routing,
        publisher=publisher,
        caps=settings.recovery_caps_by_brand(),
        window=timedelta(days=settings.recovery_window_days),
        fixed=FixedSchedule(settings.recovery_schedule_days()),
        min_outcomes=settings.recovery_min_outcomes,
    )
    try:
        yield Services(
            payments=PaymentService(
                pool=pool,
                vault=vault,
                connectors=connectors,
                keys=keys,
                replays=replays,
                routing=routing,
                stats=OutcomeStats(redis, gate=gate),
                breaker=CircuitBreaker(redis, gate=gate),
                processor_cutoff_seconds=settings.processor_cutoff_seconds,
                late_authorization_window_seconds=settings.late_authorization_window_seconds,
                max_in_flight=settings.max_payments_in_flight,
                admission_wait_seconds=settings.admission_wait_seconds,
                publisher=publisher,
                lists=lists,
                recovery=recovery,
            ),
            notifications=NotificationService(
                pool, bytes.fromhex(settings.psp_b_hmac_key), routing, publisher
            ),
            operations=OperationService(
                pool=pool,
                connectors=connectors,
                keys=keys,
                replays=replays,
                lease_seconds=float(settings.idempotency_lease_seconds),
                routing=routing,
                publisher=publisher,
                recovery=recovery,
            ),
            recovery=recovery,
            events=EventService(pool, lists),
            webhooks=WebhookService(pool, box, settings.production),
            ledger=LedgerService(pool),
            publisher=publisher,
            box=box,
        )
    finally:
        await psp_b.close()
        await connector.close()
        await vault.close()
