"""The API's only way to the vault: HTTP to the vault's published endpoints.

The API never sees a card number: it reads token metadata (brand, last 4, expiry) and asks the
vault to forward authorization requests with the card filled in.
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from core.errors import ServiceUnavailable, TesseraError
from tessera.runtime.http_client import HttpClient, HttpFailure, MaybeSent, NotSent, Reply


class TokenCard(msgspec.Struct, frozen=True):
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    bin: str = ""


class _TokenView(msgspec.Struct):
    id: str
    card: TokenCard


class CardUpdated(msgspec.Struct, frozen=True):
    """The vault's answer to a card update: the token's card after it, and what happened."""

    card: TokenCard
    outcome: str
    number_changed: bool = False
    expiry_changed: bool = False


class _CardUpdateAnswer(msgspec.Struct):
    token: _TokenView
    outcome: str
    number_changed: bool = False
    expiry_changed: bool = False


class CardUpdateRefused(Exception):
    """The vault did not apply the update. `code` is the vault's: `card_update_not_applicable`
    (not this card's update), `token_changed` (a concurrent change won), `not_found`; `retry`
    says whether asking again later may succeed (the vault, the PSP or the race)."""

    def __init__(self, code: str, retry: bool) -> None:
        super().__init__(code)
        self.code = code
        self.retry = retry


class Forwarded(msgspec.Struct, frozen=True):
    status: int
    headers: dict[str, str]
    body: Any


class ForwardFailed(Exception):
    """The vault could not get an answer from the destination. `sent` is "false" when the
    request certainly never arrived, "unknown" when it may have (never retry that blindly)."""

    def __init__(self, code: str, sent: str) -> None:
        super().__init__(code)
        self.code = code
        self.sent = sent


class VaultClient:
    """Pooled, keep-alive connections to the vault's service port."""

    def __init__(self, base_url: str, service_token: str, timeout_seconds: float) -> None:
        self._http = HttpClient(
            base_url,
            headers={"authorization": f"Bearer {service_token}"},
            timeout_seconds=timeout_seconds,
        )

    async def token(self, merchant_id: str, token_id: str) -> TokenCard | None:
        """The token's card metadata, or None if it is not this merchant's live token."""
        try:
            response = await self._http.get(
                f"/v1/tokens/{token_id}", headers={"tessera-merchant": merchant_id}
            )
        except HttpFailure as exc:
            raise ServiceUnavailable(f"The vault did not answer ({exc}).") from None
        if response.status == 404:
            return None
        if response.status != 200:
            raise _vault_error(response)
        return msgspec.json.decode(response.content, type=_TokenView).card

    async def delete_token(self, merchant_id: str, token_id: str) -> None:
        """Delete the merchant's token (the card is crypto-shredded); one already gone is fine."""
        try:
            response = await self._http.request(
                "DELETE", f"/v1/tokens/{token_id}", headers={"tessera-merchant": merchant_id}
            )
        except HttpFailure as exc:
            raise ServiceUnavailable(f"The vault did not answer ({exc}).") from None
        if response.status not in (200, 404):
            raise _vault_error(response)

    async def card_update(
        self,
        merchant_id: str,
        token_id: str,
        *,
        destination: str,
        update: str,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        fields: dict[str, str],
    ) -> CardUpdated:
        """Ask the vault to fetch an account update's new card from the destination (with the
        token's card in `body`'s placeholders) and replace the token's card with it."""
        request = {
            "destination": destination,
            "update": update,
            "path": path,
            "body": body,
            "headers": headers,
            "fields": fields,
        }
        try:
            response = await self._http.post(
                f"/v1/tokens/{token_id}/card_updates",
                json=request,
                headers={"tessera-merchant": merchant_id},
            )
        except HttpFailure:
            raise CardUpdateRefused("vault_unreachable", retry=True) from None
        if response.status == 200:
            answer = msgspec.json.decode(response.content, type=_CardUpdateAnswer)
            return CardUpdated(
                answer.token.card, answer.outcome, answer.number_changed, answer.expiry_changed
            )
        if response.status == 404:
            raise CardUpdateRefused("not_found", retry=False)
        code = str(_error_body(response).get("code", f"vault_{response.status}"))
        if code == "card_update_not_applicable":
            raise CardUpdateRefused(code, retry=False)
        # token_changed, 5xx, 504: the vault, the PSP or a race; a 400 is our template's bug,
        # which a retry will not fix but which must not lose the update either.
        raise CardUpdateRefused(code, retry=True)

    async def forward(
        self,
        merchant_id: str,
        *,
        destination: str,
        path: str,
        token: str,
        body: dict[str, Any],
        headers: dict[str, str],
    ) -> Forwarded:
        request = {
            "destination": destination,
            "path": path,
            "token": token,
            "body": body,
            "headers": headers,
        }
        try:
            response = await self._http.post(
                "/v1/forward", json=request, headers={"tessera-merchant": merchant_id}
            )
        except NotSent:
            raise ForwardFailed("vault_unreachable", sent="false") from None
        except MaybeSent:
            raise ForwardFailed("vault_timeout", sent="unknown") from None
        if response.status == 200:
            return msgspec.json.decode(response.content, type=Forwarded)
        error = _error_body(response)
        if error.get("code") in (
            "destination_unreachable",
            "destination_timeout",
            "destination_error",
        ):
            raise ForwardFailed(str(error["code"]), sent=str(error.get("sent", "unknown")))
        if response.status in (503, 500):
            # A 503 is a refusal before anything was sent (audit, KMS, database, Redis) unless
            # the vault says `sent`: it could not record the outcome of a forward that went out.
            # A 500 is a bug that may have struck after sending: unknown, so the processor is
            # asked about it, never a second processor tried.
            default = "false" if response.status == 503 else "unknown"
            sent = str(error.get("sent", default))
            raise ForwardFailed(str(error.get("code", "vault_error")), sent=sent)
        raise _vault_error(response)

    async def close(self) -> None:
        await self._http.close()


def _error_body(response: Reply) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _vault_error(response: Reply) -> TesseraError:
    error = _error_body(response)
    if response.status >= 500:
        return ServiceUnavailable("The vault is unavailable; retry later.")
    return TesseraError(
        f"The vault refused the request ({error.get('code', response.status)}).",
        code="vault_error",
    )


class VaultAdminClient:
    """Admin calls made by operators' commands (merchant registration), never by requests."""

    def __init__(self, base_url: str, admin_token: str, timeout: float = 10.0) -> None:
        self._http = httpx.Client(
            base_url=base_url,
            headers={"authorization": f"Bearer {admin_token}"},
            timeout=timeout,
        )

    def register_merchant(
        self, merchant_id: str, publishable_key: str, allowed_origins: list[str]
    ) -> list[str]:
        try:
            response = self._http.post(
                "/v1/merchants",
                json={
                    "id": merchant_id,
                    "publishable_key": publishable_key,
                    "allowed_origins": allowed_origins,
                },
            )
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"The vault did not answer ({type(exc).__name__}).") from None
        if response.status_code != 201:
            error = response.json().get("error", {}) if response.content else {}
            raise TesseraError(
                f"The vault refused the merchant: {error.get('message', response.status_code)}",
                code=error.get("code", "vault_error"),
                param=error.get("param"),
            )
        origins: list[str] = response.json()["allowed_origins"]
        return origins

    def close(self) -> None:
        self._http.close()
