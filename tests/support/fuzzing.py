"""What Schemathesis needs to know about Tessera, shared by `make fuzz` (the CLI against the
running stack, which loads this module as its hooks) and tests/test_fuzz_schemathesis.py (the
apps in-process).

The OpenAPI documents say what a valid request looks like, not everything a valid request must
be: that a token exists and belongs to the merchant, that a card number passes its check digit
and has not expired, that a webhook URL leads somewhere allowed, that `starting_after` and
`ending_before` are not both given, that an idempotency key names one request. For the parts of
a case generated as valid (positive), the hooks below supply such real values, so that the
`positive_data_acceptance` check holds the services to accepting them and the requests reach
the processors; parts generated as invalid (negative) are sent as generated.

Settings come from the environment (`FUZZ_ENV`): the credentials (also used by
`tests/schemathesis.toml`), the vault that mints tokens, the merchant they belong to, where
the vault may forward and a webhook URL the API accepts.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import string
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from schemathesis import Case, HookContext
from schemathesis.core import NotSet
from schemathesis.core.parameters import ParameterLocation

from vault.forward import _FORBIDDEN_HEADERS as FORWARD_SETS_ITSELF

CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "schemathesis.toml")

#: The environment this module and tests/schemathesis.toml read.
FUZZ_ENV = (
    "TESSERA_FUZZ_SECRET_KEY",  # the API merchant's secret key
    "TESSERA_FUZZ_PUBLISHABLE_KEY",  # the same merchant's publishable key (vault)
    "TESSERA_FUZZ_MERCHANT",  # that merchant's id (the vault's Tessera-Merchant header)
    "TESSERA_FUZZ_SERVICE_TOKEN",  # the vault's service credential
    "TESSERA_FUZZ_ADMIN_TOKEN",  # the vault's admin credential
    "TESSERA_FUZZ_VAULT_URL",  # where tokens are minted
    "TESSERA_FUZZ_FORWARD",  # "destination path" the vault may forward to
    "TESSERA_FUZZ_WEBHOOK_URL",  # a URL the API accepts for webhook endpoints
)

#: Approved by both simulators: a valid payment is a payment that goes through.
APPROVED_CARDS = (("4242424242424242", "123"), ("5555555555554444", "456"))


def setting(name: str) -> str:
    return os.environ[f"TESSERA_FUZZ_{name.upper()}"]


def mint_token(number: str = APPROVED_CARDS[0][0], cvc: str = APPROVED_CARDS[0][1]) -> str:
    """A live token of the fuzzed merchant, made as a checkout makes one."""
    response = httpx.post(
        setting("vault_url") + "/v1/tokens",
        json=valid_card(number, cvc),
        headers={"authorization": f"Bearer {setting('publishable_key')}"},
        timeout=30,
    )
    response.raise_for_status()
    token: str = response.json()["id"]
    return token


def valid_card(number: str, cvc: str) -> dict[str, Any]:
    year = datetime.datetime.now(datetime.UTC).year + 3
    return {"number": number, "exp_month": 12, "exp_year": year, "cvc": cvc}


def _positive(case: Case[Any], location: ParameterLocation) -> bool:
    return case.meta is None or not case.meta.is_negative_at(location)


def _body(case: Case[Any]) -> dict[str, Any] | None:
    if isinstance(case.body, NotSet) or not isinstance(case.body, dict):
        return None
    if not _positive(case, ParameterLocation.BODY):
        return None
    return case.body


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def _integers_as_integers(case: Case[Any]) -> None:
    """Amounts are integers written as integers: `2599`, never `2599.0` (a client computing
    money in floats is refused, 400). JSON Schema's `integer` admits both spellings and no
    schema can tell them apart, so valid cases spell whole numbers without the fraction."""
    body = _body(case)
    if body is not None:
        for key, value in body.items():
            body[key] = _whole_numbers(value)


def _unique_idempotency_key(case: Case[Any]) -> None:
    """One request per key: a key reused with another body is the client's error (422), which
    a schema cannot express; generated keys repeat, so each valid one gets a nonce."""
    key = case.headers.get("Idempotency-Key") if case.headers else None
    if isinstance(key, str) and key.strip() and _positive(case, ParameterLocation.HEADER):
        case.headers["Idempotency-Key"] = f"{key.strip()[:200]}-{secrets.token_hex(8)}"


def _create_payment(case: Case[Any]) -> None:
    """A payment with a fresh token (a setup, if `setup_future_usage` was drawn): the renewal's
    fields need a payment method of the merchant and go together (`off_session` with
    `mit_reason`), which no schema says; tests/test_subscriptions.py covers them."""
    body = _body(case)
    if body is not None:
        number, cvc = APPROVED_CARDS[secrets.randbelow(len(APPROVED_CARDS))]
        body["token"] = mint_token(number, cvc)
        for renewal_only in ("payment_method", "off_session", "mit_reason", "recovery"):
            body.pop(renewal_only, None)


def _create_webhook_endpoint(case: Case[Any]) -> None:
    body = _body(case)
    if body is not None:
        body["url"] = setting("webhook_url")


def _one_cursor(case: Case[Any]) -> None:
    """`starting_after` and `ending_before` exclude each other: a valid list has one at most."""
    query = case.query
    both = query and None not in (query.get("starting_after"), query.get("ending_before"))
    if both and _positive(case, ParameterLocation.QUERY):
        del query["ending_before"]


def _create_token(case: Case[Any]) -> None:
    body = _body(case)
    if body is not None:
        number, cvc = APPROVED_CARDS[secrets.randbelow(len(APPROVED_CARDS))]
        body.update(valid_card(number, cvc))


def _forward(case: Case[Any]) -> None:
    body = _body(case)
    if body is not None:
        destination, path = setting("forward").split()
        _clean_headers(body)
        body.update(destination=destination, path=path, token=mint_token())


def _clean_headers(body: dict[str, Any]) -> None:
    """The vault refuses headers it sets itself, and card placeholders there."""
    generated = body.get("headers")
    headers: dict[str, Any] = generated if isinstance(generated, dict) else {}
    body["headers"] = {
        name: value
        for name, value in headers.items()
        if re.fullmatch(r"[A-Za-z0-9-]{1,64}", name)
        and name.lower() not in FORWARD_SETS_ITSELF
        and "{{" not in str(value)
    }


def _card_update(case: Case[Any]) -> None:
    """A card update the vault may send: PSP A's account-updater card path with the card filled
    in. The fuzz cannot know which card a linked token holds, so no update is announced for it:
    the simulator has none and the vault answers 409 card_update_not_applicable (documented);
    tests/test_vault_card_updates.py covers the updates that apply."""
    body = _body(case)
    if body is not None:
        body.update(
            destination="psp_a",
            path="/v1/account_updates/card",
            # PSP A's key, as the payment API sends it (the simulator's development default)
            headers={"authorization": "Bearer psp_a_test_key"},
            body={"update": str(body.get("update") or "au_fuzz"), "number": "{{card.number}}"},
        )
        body.pop("fields", None)


def _detokenize(case: Case[Any]) -> None:
    body = _body(case)
    if body is not None:
        body.update(token=mint_token(), reason="schemathesis: a valid break-glass request")


def _lookup_fingerprints(case: Case[Any]) -> None:
    body = _body(case)
    if body is not None:
        # A card number (the schema says only its shape); one, so the fuzz spends little of
        # the vault's hourly lookup budget, which the session's other tests share.
        body["numbers"] = [APPROVED_CARDS[secrets.randbelow(len(APPROVED_CARDS))][0]]


def _register_merchant(case: Case[Any]) -> None:
    body = _body(case)
    if body is not None:
        letters = "".join(secrets.choice(string.ascii_letters) for _ in range(24))
        body.update(
            id=f"mer_{letters}",  # no digits: a merchant id that looks like a card is refused
            publishable_key=f"pk_test_{secrets.token_hex(24)}",
            allowed_origins=["https://fuzz.example"],
        )


#: Per operation label, what makes a valid case valid beyond its schema.
REALISTIC = {
    "POST /v1/payments": (_unique_idempotency_key, _integers_as_integers, _create_payment),
    "POST /v1/payments/{payment}/capture": (_unique_idempotency_key, _integers_as_integers),
    "POST /v1/payments/{payment}/cancel": (_unique_idempotency_key,),
    "POST /v1/payments/{payment}/refunds": (_unique_idempotency_key, _integers_as_integers),
    "POST /v1/webhook_endpoints/{endpoint}/roll_secret": (_integers_as_integers,),
    "GET /v1/payments": (_one_cursor,),
    "GET /v1/events": (_one_cursor,),
    "GET /v1/payment_methods": (_one_cursor,),
    "POST /v1/webhook_endpoints": (_create_webhook_endpoint,),
    "POST /v1/tokens": (_create_token,),
    "POST /v1/forward": (_forward,),
    "POST /v1/tokens/{token_id}/card_updates": (_card_update,),
    "POST /v1/detokenize": (_detokenize,),
    "POST /v1/merchants": (_register_merchant,),
    "POST /v1/fingerprints/lookup": (_lookup_fingerprints,),
}


@schemathesis.hook
def before_call(context: HookContext, case: Case[Any], kwargs: dict[str, Any]) -> None:
    """Give the valid parts of a case the real values their operation needs, just before it
    is sent (cases are also generated where nothing may be called yet, such as when pytest
    collects; Schemathesis checks the case against its schema again after this)."""
    for realistic in REALISTIC.get(case.operation.label, ()):
        realistic(case)
