"""The retention sweep (PCI DSS v4.0.1 3.2.1): cards are kept only while they are used.

Every live token whose `last_used_at` is older than its merchant's retention period
(`merchants.card_retention_days`, else `TESSERA_VAULT_CARD_RETENTION_DAYS`) is crypto-shredded
exactly as `DELETE /v1/tokens/{id}` does it (ciphertext, nonce and key link NULLed, the
tombstone kept, the CVC discarded from Redis).

Each token is shredded and audited in one short transaction (`token.shred`, actor
`worker:retention`, outcome `retention_expired`, the days it went unused): a shredding is never
unrecorded and a record never describes a shredding that did not happen. The transaction holds
one audit chain head and one token, so tokenizations and forwards never wait for the sweep.
Tokens are claimed with `FOR UPDATE SKIP LOCKED`, so workers sweeping at once each take
different tokens and each token is shredded (and recorded) once. A token used meanwhile is no
longer due when the claim re-reads it, and is kept. Every sweep ends with a `retention.sweep`
record (how many, how long): the evidence that the sweep runs.
"""

from __future__ import annotations

import datetime
import time

from tessera.runtime.logging import get_logger
from tessera.runtime.redis_client import REDIS_ERRORS
from vault.tokens import CvcStore
from vault.worker import JobResult, WorkerContext

log = get_logger("tessera.vault.retention")

ACTOR = "worker:retention"
#: Tokens shredded between two heartbeats (and checks for SIGTERM).
BATCH = 200

_MERCHANTS = "SELECT id, card_retention_days FROM merchants ORDER BY id"
# The oldest due token of one merchant, locked unless another worker holds it, then shredded:
# one statement. `$2` is the cut-off (now minus the merchant's period). The SET is
# TokenRepository.shred's.
_SHRED_ONE = """
WITH due AS (
    SELECT id FROM tokens
    WHERE merchant_id = $1 AND deleted_at IS NULL AND last_used_at < $2
    ORDER BY last_used_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE tokens AS t
SET ciphertext = NULL, nonce = NULL, data_key_id = NULL, deleted_at = now()
FROM due WHERE t.id = due.id
RETURNING t.id, t.last_used_at, t.cvc_provided
"""


async def sweep(ctx: WorkerContext) -> JobResult:
    started = time.monotonic()
    now = ctx.now()
    default_days = ctx.settings.card_retention_days
    cvcs = CvcStore(ctx.redis, ttl_seconds=1)  # only discards
    shredded = 0
    merchants = 0
    for merchant in await ctx.pool.fetch(_MERCHANTS):
        days = merchant["card_retention_days"] or default_days
        cutoff = now - datetime.timedelta(days=days)
        while not ctx.stopping:
            done = await _shred_batch(ctx, cvcs, merchant["id"], cutoff, days)
            shredded += done
            if done < BATCH:
                break
            await ctx.beat()
        merchants += 1
        if ctx.stopping:
            break
    detail = {
        "shredded": shredded,
        "merchants": merchants,
        "default_days": default_days,
        "complete": not ctx.stopping,
        "milliseconds": round((time.monotonic() - started) * 1000),
    }
    await ctx.audit.append(
        actor=ACTOR,
        action="retention.sweep",
        outcome="ok" if not ctx.stopping else "interrupted",
        request_id=None,
        detail=detail,
    )
    return JobResult(shredded, detail)


async def _shred_batch(
    ctx: WorkerContext, cvcs: CvcStore, merchant_id: str, cutoff: datetime.datetime, days: int
) -> int:
    done = 0
    while done < BATCH:
        async with ctx.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_SHRED_ONE, merchant_id, cutoff)
            if row is None:
                return done
            unused_days = (ctx.now() - row["last_used_at"]).days
            await ctx.audit.append(
                actor=ACTOR,
                action="token.shred",
                outcome="retention_expired",
                request_id=None,
                token_id=row["id"],
                detail={"days_unused": unused_days, "retention_days": days},
                conn=conn,
            )
        done += 1
        try:
            await cvcs.discard(row["id"])
        except REDIS_ERRORS as exc:
            # A CVC lives an hour at most (TESSERA_VAULT_CVC_TTL_SECONDS) and a due token has
            # gone unused for a week at least: nothing is left to discard but the attempt.
            log.warning("cvc_discard_failed", error=type(exc).__name__)
    return done
