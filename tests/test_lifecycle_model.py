"""Issue 9, campaign 7: a model of the payment lifecycle, checked against the running API.

A hypothesis `RuleBasedStateMachine` authorizes (with and without capture, with cards that
decline), captures part or all, refunds part or all, cancels, and retries earlier requests with
their Idempotency-Key (and with the key but another body), over HTTP against the `api` fixture's
process, while an in-memory model of each payment says what must happen. Every answer is
checked against the model (status code, error code, amounts), and after every step the
merchant's payments as the API lists them equal the model's, the amounts keep their order
(captured <= authorized <= amount, refunded <= captured) and the merchant's balance from the
ledger equals the model's. Each example runs with a merchant of its own.

CI runs a few short examples; `TESSERA_LIFECYCLE=fuzz` runs many long ones (`make fuzz`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from api.storage.merchants import MerchantRepository
from tests.conftest import ApiMerchant, register_vault_merchant
from tests.support.payments import tokenize
from tests.support.processes import ServiceProcess

FUZZ = os.environ.get("TESSERA_LIFECYCLE", "") == "fuzz"
SETTINGS = settings(
    max_examples=300 if FUZZ else 15,
    stateful_step_count=40 if FUZZ else 15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
#: Card -> the decline code PSP A gives it (None: approved).
CARDS: dict[str, str | None] = {
    "4242424242424242": None,
    "5555555555554444": None,
    "4000000000000002": "do_not_honor",
    "4000000000009995": "insufficient_funds",
    "4000000000000069": "expired_card",
}
#: Minor-unit exponents 2, 0 and 3: every currency's amounts are integers all the same.
CURRENCIES = ("EUR", "JPY", "KWD")


@dataclass
class Payment:
    """The model of one payment: what the API must show for it."""

    id: str
    currency: str
    amount: int
    capture: bool
    status: str
    authorized: int = 0
    captured: int = 0
    refunds: list[int] = field(default_factory=list)

    @property
    def refunded(self) -> int:
        return sum(self.refunds)

    def view(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "currency": self.currency,
            "amount": self.amount,
            "amount_authorized": self.authorized,
            "amount_captured": self.captured,
            "amount_refunded": self.refunded,
            "refunds": sorted((amount, "succeeded") for amount in self.refunds),
        }


@dataclass(frozen=True)
class Sent:
    """A request as it was sent, and what it was answered: a retry must be answered the same."""

    path: str
    body: dict[str, Any] | None
    key: str
    status: int
    content: bytes


def _view(api_payment: dict[str, Any]) -> dict[str, Any]:
    keys = ("status", "currency", "amount", "amount_authorized", "amount_captured")
    found = {k: api_payment[k] for k in keys}
    found["amount_refunded"] = api_payment["amount_refunded"]
    # As a set: refunds made at once are listed in the order the API took them.
    found["refunds"] = sorted((r["amount"], r["status"]) for r in api_payment["refunds"])
    return found


class Lifecycle(RuleBasedStateMachine):
    """Rules drive the API; the model predicts; invariants compare."""

    api: ServiceProcess
    vault: ServiceProcess
    admin_token: str
    database_url: str
    steps = 0

    payments = Bundle("payments")
    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.http = httpx.Client(base_url=self.api.url, timeout=30)
        self.other_client = httpx.Client(base_url=self.api.url, timeout=30)
        self.merchant = _new_merchant(self.vault, self.admin_token, self.database_url)
        self.model: dict[str, Payment] = {}
        self.tokens: dict[str, str] = {}
        self.authorizations: list[Sent] = []

    # --- talking to the API ---------------------------------------------------------------

    def _post(
        self, path: str, body: dict[str, Any] | None, key: str, http: httpx.Client | None = None
    ) -> httpx.Response:
        headers = {**self.merchant.auth, "idempotency-key": key}
        Lifecycle.steps += 1
        return (http or self.http).post(path, json=body, headers=headers)

    def _at_once(
        self, first: tuple[str, dict[str, Any], str], second: tuple[str, dict[str, Any], str]
    ) -> tuple[httpx.Response, httpx.Response]:
        """Two requests sent at the same moment, on two connections."""
        with ThreadPoolExecutor(2) as pool:
            one = pool.submit(self._post, *first, self.http)
            two = pool.submit(self._post, *second, self.other_client)
            answers = (one.result(), two.result())
        for answer in answers:
            assert answer.status_code < 500, answer.text
        return answers

    def _send(self, path: str, body: dict[str, Any] | None) -> tuple[httpx.Response, Sent]:
        key = f"model-{secrets.token_hex(8)}"
        response = self._post(path, body, key)
        assert response.status_code < 500, response.text
        return response, Sent(path, body, key, response.status_code, response.content)

    def _token(self, card: str) -> str:
        if card not in self.tokens:
            self.tokens[card] = tokenize(self.vault, self.merchant, card)
        return self.tokens[card]

    @staticmethod
    def _conflict(response: httpx.Response, code: str) -> None:
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == code, response.text

    # --- rules -------------------------------------------------------------------------------

    @rule(
        target=payments,
        card=st.sampled_from(sorted(CARDS)),
        currency=st.sampled_from(CURRENCIES),
        amount=st.integers(1, 100_000),
        capture=st.booleans(),
    )
    def authorize(self, card: str, currency: str, amount: int, capture: bool) -> str:
        body = {"amount": amount, "currency": currency, "token": self._token(card)}
        body["capture"] = capture
        response, sent = self._send("/v1/payments", body)
        self.authorizations.append(sent)
        return self._authorized(response, card, currency, amount, capture)

    @rule(
        target=payments,
        card=st.sampled_from(sorted(CARDS)),
        currency=st.sampled_from(CURRENCIES),
        amount=st.integers(1, 100_000),
        capture=st.booleans(),
    )
    def the_same_authorization_twice_at_once(
        self, card: str, currency: str, amount: int, capture: bool
    ) -> str:
        """A retry racing its original: one payment whichever wins; the other request is told
        the key is in use, or gets the same answer as a replay."""
        body = {"amount": amount, "currency": currency, "token": self._token(card)}
        body["capture"] = capture
        key = f"model-{secrets.token_hex(8)}"
        answers = self._at_once(("/v1/payments", body, key), ("/v1/payments", body, key))
        in_use = [a for a in answers if a.status_code == 409]
        for answer in in_use:
            assert answer.json()["error"]["code"] == "idempotency_key_in_use", answer.text
        done = [a for a in answers if a.status_code != 409]
        assert len(done) in (1, 2), [a.text for a in answers]
        if len(done) == 2:
            assert done[0].content == done[1].content
            replayed = [a.headers.get("idempotent-replayed") for a in done]
            assert sorted(replayed, key=str) == [None, "true"], replayed
        winner = done[0]
        self.authorizations.append(
            Sent("/v1/payments", body, key, winner.status_code, winner.content)
        )
        return self._authorized(winner, card, currency, amount, capture)

    def _authorized(
        self, response: httpx.Response, card: str, currency: str, amount: int, capture: bool
    ) -> str:
        decline = CARDS[card]
        if decline is None:
            assert response.status_code == 201, response.text
            status = "captured" if capture else "authorized"
            payment = Payment(response.json()["id"], currency, amount, capture, status, amount)
            payment.captured = amount if capture else 0
        else:
            assert response.status_code == 402, response.text
            error = response.json()["error"]
            assert (error["code"], error["decline_code"]) == ("card_declined", decline)
            payment = Payment(error["payment"], currency, amount, capture, "declined")
        self.model[payment.id] = payment
        assert response.json().get("status", "declined") == payment.status
        return payment.id

    @rule(target=requests, payment_id=payments, data=st.data())
    def capture(self, payment_id: str, data: st.DataObject) -> Sent:
        payment = self.model[payment_id]
        ceiling = max(payment.authorized, payment.amount) + 2
        amount = data.draw(st.one_of(st.none(), st.integers(1, ceiling)), label="amount")
        body = {} if amount is None else {"amount": amount}
        response, sent = self._send(f"/v1/payments/{payment_id}/capture", body)
        if payment.status != "authorized":
            self._conflict(response, "payment_not_capturable")
        elif amount is not None and amount > payment.authorized:
            self._conflict(response, "amount_exceeds_authorized")
        else:
            assert response.status_code == 200, response.text
            payment.status, payment.captured = "captured", amount or payment.authorized
            assert response.json()["amount_captured"] == payment.captured
        return sent

    @rule(target=requests, payment_id=payments, data=st.data())
    def refund(self, payment_id: str, data: st.DataObject) -> Sent:
        payment = self.model[payment_id]
        left = payment.captured - payment.refunded
        amount = data.draw(st.one_of(st.none(), st.integers(1, left + 2)), label="amount")
        body = {} if amount is None else {"amount": amount}
        response, sent = self._send(f"/v1/payments/{payment_id}/refunds", body)
        if payment.status not in ("captured", "partially_refunded"):
            self._conflict(response, "payment_not_refundable")
        elif amount is not None and amount > left:
            self._conflict(response, "amount_exceeds_refundable")
        else:
            assert response.status_code == 201, response.text
            refunded = amount or left
            payment.refunds.append(refunded)
            full = payment.refunded == payment.captured
            payment.status = "refunded" if full else "partially_refunded"
            refund = response.json()
            assert (refund["amount"], refund["status"], refund["payment"]) == (
                refunded,
                "succeeded",
                payment_id,
            )
        return sent

    @rule(payment_id=payments, data=st.data())
    def two_refunds_at_once(self, payment_id: str, data: st.DataObject) -> None:
        """Two clients refund one payment at the same moment, each with a key of its own: the
        API takes them in turn, so the answers are those of one order or the other, and the
        refunds never add up past the capture."""
        payment = self.model[payment_id]
        left = payment.captured - payment.refunded
        amounts = [data.draw(st.integers(1, left + 2), label="amount") for _ in range(2)]
        path = f"/v1/payments/{payment_id}/refunds"
        answers = self._at_once(
            *((path, {"amount": amount}, f"model-{secrets.token_hex(8)}") for amount in amounts)
        )
        found = [_outcome(answer) for answer in answers]
        refundable = payment.status in ("captured", "partially_refunded")
        forward = _refund_outcomes(refundable, left, amounts)
        backward = _refund_outcomes(refundable, left, amounts[::-1])[::-1]
        assert found in (forward, backward), (found, amounts, left)
        for amount, (status, _) in zip(amounts, found, strict=True):
            if status == 201:
                payment.refunds.append(amount)
        if payment.refunds:
            full = payment.refunded == payment.captured
            payment.status = "refunded" if full else "partially_refunded"

    @rule(target=requests, payment_id=payments)
    def cancel(self, payment_id: str) -> Sent:
        payment = self.model[payment_id]
        response, sent = self._send(f"/v1/payments/{payment_id}/cancel", None)
        if payment.status != "authorized":
            self._conflict(response, "payment_not_cancelable")
        else:
            assert response.status_code == 200, response.text
            payment.status = "canceled"
            assert response.json()["status"] == "canceled"
        return sent

    @rule(sent=requests)
    def retry_with_the_same_key(self, sent: Sent) -> None:
        """The client did not get the answer and sends the request again: it gets the first
        answer, byte for byte, and nothing happens twice (the invariants see to that)."""
        again = self._post(sent.path, sent.body, sent.key)
        assert (again.status_code, again.content) == (sent.status, sent.content)
        assert again.headers.get("idempotent-replayed") == "true"

    @precondition(lambda self: bool(self.authorizations))
    @rule(data=st.data())
    def retry_an_authorization(self, data: st.DataObject) -> None:
        """The same for a payment: no second payment, no second authorization at the PSP."""
        self.retry_with_the_same_key(data.draw(st.sampled_from(self.authorizations)))

    @rule(sent=consumes(requests))
    def reuse_the_key_for_another_request(self, sent: Sent) -> None:
        """The same key with another body is refused, and nothing runs."""
        other = {**(sent.body or {}), "amount": 99_999_999} if sent.body is not None else {}
        response = self._post(sent.path, other, sent.key)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "idempotency_key_reused"

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def the_api_equals_the_model(self) -> None:
        listed = self.http.get("/v1/payments", params={"limit": 100}, headers=self.merchant.auth)
        assert listed.status_code == 200, listed.text
        found = {p["id"]: p for p in listed.json()["data"]}
        assert set(found) == set(self.model)
        for payment_id, payment in self.model.items():
            api_payment = found[payment_id]
            assert _view(api_payment) == payment.view(), payment_id
            assert (
                0
                <= api_payment["amount_refunded"]
                <= api_payment["amount_captured"]
                <= api_payment["amount_authorized"]
                <= api_payment["amount"]
            )

    @invariant()
    def the_balance_is_the_models(self) -> None:
        """From the ledger: captures are pending settlement (two days), refunds leave at once."""
        response = self.http.get("/v1/balance", headers=self.merchant.auth)
        assert response.status_code == 200, response.text
        balance = response.json()
        found = {
            (kind, entry["currency"]): entry["amount"]
            for kind in ("available", "pending")
            for entry in balance[kind]
        }
        expected: dict[tuple[str, str], int] = defaultdict(int)
        for payment in self.model.values():
            if payment.captured:
                expected["pending", payment.currency] += payment.captured
                expected["available", payment.currency] -= payment.refunded
        assert {k: v for k, v in found.items() if v} == {k: v for k, v in expected.items() if v}

    def teardown(self) -> None:
        self.http.close()
        self.other_client.close()


def _outcome(answer: httpx.Response) -> tuple[int, str | None]:
    """The status, and the error's code if it is one."""
    if answer.status_code < 400:
        return answer.status_code, None
    return answer.status_code, answer.json()["error"]["code"]


def _refund_outcomes(
    refundable: bool, left: int, amounts: list[int]
) -> list[tuple[int, str | None]]:
    """What refunds of `amounts`, taken in this order, must be answered."""
    outcomes: list[tuple[int, str | None]] = []
    for amount in amounts:
        if not refundable:
            outcomes.append((409, "payment_not_refundable"))
        elif amount > left:
            outcomes.append((409, "amount_exceeds_refundable"))
        else:
            left -= amount
            refundable = left > 0
            outcomes.append((201, None))
    return outcomes


def _new_merchant(vault: ServiceProcess, admin_token: str, database_url: str) -> ApiMerchant:
    """A merchant of the example's own, registered at the vault and in the API's database as
    `tessera merchants create` does, so its list and balance hold only the model's payments."""
    at_vault = register_vault_merchant(vault, admin_token)
    secret_key = f"sk_test_{secrets.token_hex(24)}"

    async def store() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await MerchantRepository(conn).create(at_vault.id, "lifecycle model", secret_key)
        finally:
            await conn.close()

    asyncio.run(store())
    return ApiMerchant(at_vault.id, secret_key, at_vault.publishable_key)


def test_the_payment_lifecycle_matches_its_model(
    api: ServiceProcess,
    vault: ServiceProcess,
    api_env: dict[str, str],
    tokens: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    Lifecycle.api, Lifecycle.vault = api, vault
    Lifecycle.admin_token = tokens["admin"]
    Lifecycle.database_url = api_env["TESSERA_API_DATABASE_URL"]
    Lifecycle.steps = 0
    run_state_machine_as_test(Lifecycle, settings=SETTINGS)
    with capsys.disabled():
        print(
            f"\nlifecycle model: {SETTINGS.max_examples} examples of up to "
            f"{SETTINGS.stateful_step_count} steps, {Lifecycle.steps} requests, API == model "
            "after every step"
        )
