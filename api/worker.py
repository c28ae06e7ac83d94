"""`tessera worker`: settles what requests left unsettled. Safe to run in several processes.

- reconciler: `processing` payments are settled by the processor's status inquiry on our
  reference, first within seconds of the time-out, then backing off to once a minute; a payment
  the processor never heard of is `failed` after the processor's cut-off.
- late authorizations: a payment failed at the cut-off is still looked up for a day (backing off
  to every ten minutes); an authorization the processor made late is voided, or refunded if it
  was captured, and the attempt records `late_reversal`.
- completer: idempotent requests abandoned half-way (a crashed API process) are driven to the
  end from their recovery point, so the client's next retry finds the final answer.
- expiry: authorizations not captured within the window (7 days) are canceled at the processor.
- recovery: declined renewals under recovery are decided when due (core.recovery's policy) and
  their retries sent; a retry that waited for a card update is due as soon as the update lands
  (api/services/recovery.py).
- idempotency keys past their retention are deleted.
- card updates (a loop of its own): each PSP's account-updater list is read from a durable
  cursor (one worker at a time per PSP), and the cards it announces are replaced in the vault
  under the same tokens (api/services/card_updates.py).
- webhooks (a loop of its own): due deliveries are sent, failing endpoints disabled, events
  older than 30 days deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import structlog

from api.services.card_updates import CardUpdateService, feeds
from api.services.webhooks import WebhookDeliverer
from api.settings import ApiSettings
from api.storage.worker import WorkerRepository
from api.vault_client import VaultClient
from api.wiring import Services, open_services
from core.errors import TesseraError
from tessera.runtime.db import create_pool
from tessera.runtime.redis_client import connect as connect_redis

log = structlog.stdlib.get_logger("tessera.worker")
BATCH = 50
#: How often the webhook loop looks for due deliveries when it found none.
WEBHOOK_POLL_SECONDS = 0.2
EVENT_RETENTION_DAYS = 30


async def reconcile(services: Services, work: WorkerRepository, settings: ApiSettings) -> int:
    rows = await work.claim_unknown_attempts(BATCH)
    for row in rows:
        if row["retry_by"] is not None:  # a recovery retry whose sender did not record it
            outcome = await services.recovery.settle(
                row["merchant_id"],
                row["payment_id"],
                row["attempt"],
                row["reference"],
                row["age_seconds"],
                settings.processor_cutoff_seconds,
                settings.late_authorization_window_seconds,
            )
            log.info("reconciled_retry", payment=row["payment_id"], outcome=outcome)
            continue
        outcome = await services.payments.settle(
            row["merchant_id"],
            row["payment_id"],
            row["attempt"],
            row["reference"],
            row["age_seconds"],
        )
        log.info("reconciled", payment=row["payment_id"], outcome=outcome)
    return len(rows)


async def reverse_late(services: Services, work: WorkerRepository) -> int:
    rows = await work.claim_late_checks(BATCH)
    for row in rows:
        outcome = await services.payments.reverse_late_authorization(
            row["merchant_id"],
            row["payment_id"],
            row["attempt"],
            row["processor"],
            row["reference"],
            row["window_closed"],
        )
        log.info("late_check", payment=row["payment_id"], outcome=outcome)
    return len(rows)


async def complete(services: Services, work: WorkerRepository, lease: float) -> int:
    rows = await work.claim_abandoned_keys(BATCH, lease)
    for row in rows:
        lease = row["locked_until"]  # the worker's own lease: its fencing token
        if row["recovery_point"] == "payment_created":
            await services.payments.complete(row["merchant_id"], row["key"], lease)
        elif row["recovery_point"] == "retry_started":
            await services.recovery.complete(row["merchant_id"], row["key"], lease)
        else:
            await services.operations.complete(row["merchant_id"], row["key"], lease)
        log.info("completed", merchant=row["merchant_id"], recovery_point=row["recovery_point"])
    return len(rows)


async def expire(services: Services, work: WorkerRepository, window: float) -> int:
    rows = await work.expired_authorizations(window, BATCH)
    done = 0
    for row in rows:
        try:
            await services.operations.expire(row["merchant_id"], row["id"])
            done += 1
        except TesseraError as exc:  # another worker is on it, or the payment moved on
            log.info("expiry_skipped", payment=row["id"], code=exc.code)
    return done


async def update_cards(updates: CardUpdateService, stop: asyncio.Event, interval: float) -> None:
    """Its own loop, apart from the settling cycle: a slow PSP list or vault never delays a
    reconciliation, and a settling backlog never delays a card update."""
    while not stop.is_set():
        done = 0
        for processor in updates.feeds:
            try:
                done += await updates.fetch(processor)
            except Exception:
                log.exception("card_updates_failed", processor=processor)
        if not done:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def beat(path: Path) -> None:
    """The liveness signal: a file touched after every cycle (a stuck worker stops touching it)."""
    try:
        await asyncio.to_thread(path.touch)
    except OSError as exc:
        log.warning("heartbeat_failed", error=type(exc).__name__)


async def deliver_webhooks(deliverer: WebhookDeliverer, stop: asyncio.Event) -> None:
    """Its own loop, apart from the settling cycle: a delivery waits for neither."""
    housekeeping_at = 0.0
    while not stop.is_set():
        started = 0
        try:
            started = await deliverer.dispatch()
            if time.monotonic() >= housekeeping_at:
                housekeeping_at = time.monotonic() + 60
                await deliverer.disable_failing()
                await deliverer.queue.purge_expired_events(EVENT_RETENTION_DAYS)
        except Exception:
            log.exception("webhook_cycle_failed")
        if not started:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WEBHOOK_POLL_SECONDS)


async def run(settings: ApiSettings, stop: asyncio.Event) -> None:
    pool = await create_pool(
        settings.database_url, min_size=1, max_size=6, wait_seconds=settings.db_timeout_seconds
    )
    redis = connect_redis(settings.redis_url, socket_timeout=2)
    work = WorkerRepository(pool)
    lease = float(settings.idempotency_lease_seconds)
    try:
        async with open_services(settings, pool, redis) as services:
            deliverer = WebhookDeliverer(
                pool,
                services.box,
                services.publisher,
                settings.production,
                timeout_seconds=settings.webhook_timeout_seconds,
                retry_base_seconds=settings.webhook_retry_base_seconds,
                retry_window_seconds=settings.webhook_retry_window_seconds,
                disable_after_seconds=settings.webhook_disable_after_seconds,
                per_endpoint=settings.webhook_endpoint_concurrency,
            )
            # The vault fetches a new card from the PSP within its forward time-out.
            vault = VaultClient(
                settings.vault_url,
                settings.vault_service_token,
                settings.authorization_timeout_seconds + 2,
            )
            updates = CardUpdateService(
                pool,
                vault,
                feeds(
                    (settings.psp_a_url, settings.psp_a_api_key),
                    (settings.psp_b_url, settings.psp_b_api_key),
                    settings.authorization_timeout_seconds,
                ),
                services.publisher,
                lease_seconds=lease,
                poll_seconds=settings.card_update_poll_seconds,
            )
            webhooks = asyncio.create_task(deliver_webhooks(deliverer, stop))
            cards = asyncio.create_task(
                update_cards(updates, stop, settings.worker_interval_seconds)
            )
            log.info("worker_started")
            while not stop.is_set():
                try:
                    busy = await reconcile(services, work, settings)
                    busy += await reverse_late(services, work)
                    busy += await complete(services, work, lease)
                    busy += await expire(services, work, settings.authorization_expiry_seconds)
                    busy += await services.recovery.run_due(BATCH)
                    await work.purge_expired_keys(1000)
                except Exception:
                    log.exception("worker_cycle_failed")
                    busy = 0
                if settings.worker_heartbeat_path:
                    await beat(Path(settings.worker_heartbeat_path))
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), settings.worker_interval_seconds)
            await webhooks
            await cards
            await deliverer.close()
            await updates.close()
            await vault.close()
    finally:
        await redis.aclose()
        await pool.close()
        log.info("worker_stopped")


def main(settings: ApiSettings) -> None:
    """Run until SIGTERM or SIGINT; the cycle in progress finishes first."""
    import uvloop

    async def start() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    uvloop.run(start())
