"""Tokens: a card in, a random token out; metadata to the API; crypto-shredding on delete.

The PAN and the cardholder's name exist here in clear only in memory, for the time it takes to
seal them. A CVC is never written to disk: it is sealed and kept in Redis with a TTL, and taken
(read and deleted at once) by the first forward that uses it.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
import msgspec

from core.cards import bin6, last4, validate_cvc, validate_expiry, validate_pan
from core.errors import InvalidRequest, NotFound
from core.ids import new_random_id
from tessera.runtime.logging import get_logger
from tessera.runtime.redis_client import RedisClient
from vault.crypto import EnvelopeCipher, card_aad, cvc_aad
from vault.keys import KeyService

log = get_logger("tessera.vault.tokens")
_TOKEN_ID = re.compile(r"tok_[0-9a-z]{26}")
#: A token's `last_used_at` is refreshed at most this often (the SQL in `mark_used` says it too).
USE_GRANULARITY = datetime.timedelta(days=1)


def _described(pattern: str) -> msgspec.Meta:
    """A rule core.cards checks (with its own error code): told to the OpenAPI document only."""
    return msgspec.Meta(extra_json_schema={"pattern": pattern})


class CreateToken(msgspec.Struct, forbid_unknown_fields=True):
    # The document can say the shape; that the number passes its check digit and the card has
    # not expired, only core.cards can.
    number: Annotated[str, msgspec.Meta(max_length=64), _described("^[0-9 -]+$")]
    exp_month: (
        Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": 12})]
        | Annotated[str, msgspec.Meta(max_length=4), _described("^(0?[1-9]|1[0-2])$")]
    )
    exp_year: int | Annotated[str, msgspec.Meta(max_length=4), _described("^([0-9]{2}|[0-9]{4})$")]
    cvc: Annotated[str, msgspec.Meta(max_length=8), _described("^[0-9]{3,4}$")] | None = None
    name: Annotated[str, msgspec.Meta(max_length=100)] | None = None


class CardView(msgspec.Struct):
    brand: str
    last4: str
    bin: str
    exp_month: int
    exp_year: int
    fingerprint: str


class TokenView(msgspec.Struct):
    id: str
    card: CardView
    cvc_provided: bool
    created: int
    object: str = "token"


class CardRecord(msgspec.Struct, array_like=True):
    """What is sealed: the PAN and the name. Expiry and brand are metadata, kept in clear."""

    number: str
    name: str | None


@dataclass(frozen=True)
class Card:
    """A decrypted card: lives in memory for one operation only."""

    number: str
    exp_month: int
    exp_year: int
    name: str | None
    cvc: str | None


def fingerprint_text(raw: bytes) -> str:
    return raw[:16].hex()


def token_view(row: Any) -> TokenView:
    """A token row's masked metadata: what the payment API may see of a card."""
    return TokenView(
        id=row["id"],
        card=CardView(
            brand=row["brand"],
            last4=row["last4"],
            bin=row["bin"],
            exp_month=row["exp_month"],
            exp_year=row["exp_year"],
            fingerprint=fingerprint_text(row["fingerprint"]),
        ),
        cvc_provided=row["cvc_provided"],
        created=int(row["created_at"].timestamp()),
    )


class TokenRepository:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def insert(self, **values: Any) -> Any:
        return await self.pool.fetchrow(
            "INSERT INTO tokens (id, merchant_id, data_key_id, nonce, ciphertext, brand, bin, "
            "last4, exp_month, exp_year, fingerprint, cvc_provided) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING *",
            values["id"],
            values["merchant_id"],
            values["data_key_id"],
            values["nonce"],
            values["ciphertext"],
            values["brand"],
            values["bin"],
            values["last4"],
            values["exp_month"],
            values["exp_year"],
            values["fingerprint"],
            values["cvc_provided"],
        )

    async def live(self, token_id: str, merchant_id: str | None) -> Any:
        """A token that exists, is not deleted and (unless an admin asks) is the merchant's."""
        return await self.pool.fetchrow(
            "SELECT * FROM tokens WHERE id = $1 AND deleted_at IS NULL "
            "AND ($2::text IS NULL OR merchant_id = $2)",
            token_id,
            merchant_id,
        )

    async def mark_used(self, token_id: str) -> bool:
        """Refresh a live token's last use, if it is more than a day old (retention counts
        from it): a token forwarded all day long is written once a day, not once a forward."""
        status: str = await self.pool.execute(
            "UPDATE tokens SET last_used_at = now() WHERE id = $1 AND deleted_at IS NULL "
            "AND last_used_at < now() - interval '1 day'",
            token_id,
        )
        return status == "UPDATE 1"

    async def replace_card(
        self, token_id: str, merchant_id: str, old_nonce: bytes, **new: Any
    ) -> Any:
        """Seal a new card into a live token's row, overwriting the old ciphertext; None if the
        row changed since `old_nonce` was read (another update, a shred). The trigger
        `tokens_only_shred` (migration 0006) allows the runtime role this change and sets
        card_updated_at."""
        return await self.pool.fetchrow(
            "UPDATE tokens SET data_key_id = $4, nonce = $5, ciphertext = $6, brand = $7, "
            "bin = $8, last4 = $9, exp_month = $10, exp_year = $11, fingerprint = $12, "
            "cvc_provided = false, card_update = $13 "
            "WHERE id = $1 AND merchant_id = $2 AND nonce = $3 AND deleted_at IS NULL "
            "RETURNING *",
            token_id,
            merchant_id,
            old_nonce,
            new["data_key_id"],
            new["nonce"],
            new["ciphertext"],
            new["brand"],
            new["bin"],
            new["last4"],
            new["exp_month"],
            new["exp_year"],
            new["fingerprint"],
            new["card_update"],
        )

    async def shred(self, token_id: str, merchant_id: str) -> bool:
        # vault/retention.py shreds with the same SET.
        status: str = await self.pool.execute(
            "UPDATE tokens SET ciphertext = NULL, nonce = NULL, data_key_id = NULL, "
            "deleted_at = now() WHERE id = $1 AND merchant_id = $2 AND deleted_at IS NULL",
            token_id,
            merchant_id,
        )
        return status == "UPDATE 1"


class CvcStore:
    """Sealed CVCs in Redis, with a TTL, taken at most once."""

    def __init__(self, redis: RedisClient, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds

    @staticmethod
    def _key(token_id: str) -> str:
        return f"vault:cvc:{token_id}"

    async def put(self, token_id: str, data_key_id: str, nonce: bytes, sealed: bytes) -> None:
        value = msgspec.msgpack.encode((data_key_id, nonce, sealed))
        await self.redis.set(self._key(token_id), value, ex=self.ttl_seconds)

    async def take(self, token_id: str) -> tuple[str, bytes, bytes] | None:
        value = await self.redis.getdel(self._key(token_id))
        if not isinstance(value, bytes):
            return None
        data_key_id, nonce, sealed = msgspec.msgpack.decode(value, type=tuple[str, bytes, bytes])
        return data_key_id, nonce, sealed

    async def discard(self, token_id: str) -> None:
        await self.redis.delete(self._key(token_id))


def parse_token_id(value: str, param: str = "id") -> str:
    """A malformed id is answered exactly like an unknown one: 404."""
    if not _TOKEN_ID.fullmatch(value):
        raise NotFound("No such token.", param=param)
    return value


@dataclass
class TokenService:
    keys: KeyService
    tokens: TokenRepository
    cvcs: CvcStore

    async def create(self, merchant_id: str, data: CreateToken, today: datetime.date) -> TokenView:
        pan, brand = validate_pan(data.number)
        exp_month, exp_year = validate_expiry(data.exp_month, data.exp_year, today=today)
        cvc = validate_cvc(data.cvc, brand) if data.cvc is not None else None
        name = data.name.strip() if data.name else None
        if name and len(name) > 100:
            raise InvalidRequest("name is at most 100 characters.", param="name")
        token_id = new_random_id("tok")
        data_key_id, key = await self.keys.ring.encryption_key()
        record = msgspec.msgpack.encode(CardRecord(pan, name))
        nonce, ciphertext = EnvelopeCipher.seal(
            key, record, card_aad(token_id, merchant_id, data_key_id)
        )
        fingerprint = await self.keys.fingerprint(merchant_id, pan)
        if cvc is not None:
            cvc_nonce, sealed_cvc = EnvelopeCipher.seal(
                key, cvc.encode(), cvc_aad(token_id, merchant_id, data_key_id)
            )
            await self.cvcs.put(token_id, data_key_id, cvc_nonce, sealed_cvc)
        row = await self.tokens.insert(
            id=token_id,
            merchant_id=merchant_id,
            data_key_id=data_key_id,
            nonce=nonce,
            ciphertext=ciphertext,
            brand=str(brand),
            bin=bin6(pan),
            last4=last4(pan),
            exp_month=exp_month,
            exp_year=exp_year,
            fingerprint=fingerprint,
            cvc_provided=cvc is not None,
        )
        return token_view(row)

    async def metadata(self, token_id: str, merchant_id: str) -> TokenView:
        row = await self.tokens.live(token_id, merchant_id)
        if row is None:
            raise NotFound("No such token.", param="id")
        return token_view(row)

    async def delete(self, token_id: str, merchant_id: str) -> None:
        if not await self.tokens.shred(token_id, merchant_id):
            raise NotFound("No such token.", param="id")
        await self.cvcs.discard(token_id)

    async def replace(
        self, row: Any, card: Card, number: str, exp_month: int, exp_year: int, card_update: str
    ) -> TokenView | None:
        """Replace the card of `row` (read before `card` was revealed) with a new number and
        expiry under the same token: sealed under the current data key with a fresh nonce, the
        old ciphertext overwritten. The old card's CVC, if one is still held, is discarded (it
        is not the new card's). None if the row changed meanwhile."""
        token_id, merchant_id = row["id"], row["merchant_id"]
        data_key_id, key = await self.keys.ring.encryption_key()
        record = msgspec.msgpack.encode(CardRecord(number, card.name))
        nonce, ciphertext = EnvelopeCipher.seal(
            key, record, card_aad(token_id, merchant_id, data_key_id)
        )
        del record
        _, brand = validate_pan(number)
        replaced = await self.tokens.replace_card(
            token_id,
            merchant_id,
            row["nonce"],
            data_key_id=data_key_id,
            nonce=nonce,
            ciphertext=ciphertext,
            brand=str(brand),
            bin=bin6(number),
            last4=last4(number),
            exp_month=exp_month,
            exp_year=exp_year,
            fingerprint=await self.keys.fingerprint(merchant_id, number),
            card_update=card_update,
        )
        if replaced is None:
            return None
        await self.cvcs.discard(token_id)
        return token_view(replaced)

    async def card_of(self, row: Any) -> Card:
        """The card sealed in `row` as it was read (no CVC, no use recorded). A card update
        compares the updater's card with this one and replaces it only if the row is still the
        one read: a request racing another never judges a stale row by a fresher card."""
        key = await self.keys.ring.key(row["data_key_id"])
        plaintext = EnvelopeCipher.open(
            key,
            row["nonce"],
            row["ciphertext"],
            card_aad(row["id"], row["merchant_id"], row["data_key_id"]),
        )
        record = msgspec.msgpack.decode(plaintext, type=CardRecord)
        return Card(record.number, row["exp_month"], row["exp_year"], record.name, None)

    async def reveal(
        self, token_id: str, merchant_id: str | None, *, take_cvc: bool, use: bool = False
    ) -> Card:
        """Decrypt a card for one use (forward, break-glass). The CVC, if asked for, is taken:
        whatever happens next, it is gone. `use` (a forward, not a break-glass look) keeps the
        card from the retention sweep for another period."""
        row = await self.tokens.live(token_id, merchant_id)
        if row is None:
            raise NotFound("No such token.", param="token")
        if use and row["last_used_at"] < datetime.datetime.now(datetime.UTC) - USE_GRANULARITY:
            # The row just read tells whether a write is due: no round trip on most forwards.
            # A failed write is tried again by the next forward; it does not stop this one
            # (an error here would reach the API as "the card may have left").
            try:
                await self.tokens.mark_used(token_id)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("last_use_not_recorded", error=type(exc).__name__)
        key = await self.keys.ring.key(row["data_key_id"])
        plaintext = EnvelopeCipher.open(
            key,
            row["nonce"],
            row["ciphertext"],
            card_aad(token_id, row["merchant_id"], row["data_key_id"]),
        )
        record = msgspec.msgpack.decode(plaintext, type=CardRecord)
        # Taken only once the card itself decrypted, so a KMS outage does not burn the CVC.
        # Only a token made with a CVC asks Redis for it: the others are charged while Redis is
        # down (the Redis campaign found every payment `failed` during an outage).
        cvc: str | None = None
        if take_cvc and row["cvc_provided"]:
            held = await self.cvcs.take(token_id)
            if held is not None:
                cvc_key_id, cvc_nonce, sealed = held
                cvc_key = await self.keys.ring.key(cvc_key_id)
                cvc = EnvelopeCipher.open(
                    cvc_key, cvc_nonce, sealed, cvc_aad(token_id, row["merchant_id"], cvc_key_id)
                ).decode()
        return Card(record.number, row["exp_month"], row["exp_year"], record.name, cvc)
