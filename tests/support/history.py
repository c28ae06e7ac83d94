"""A Jepsen-style history of payment operations, and the checker that judges it afterwards.

During a chaos campaign, concurrent clients authorize, capture, cancel and refund through the
real API, each client retrying with the same `Idempotency-Key` as a careful merchant would. Every
operation is recorded as *invoked*, then completed as

- `ok`: the API said it happened (2xx; a `202 processing` payment is followed until it settles);
- `failed`: the API said it did not happen (a decline, `502 processor_error`, `409` state);
- `unknown`: no definite answer before the client gave up (time-outs, 5xx, in-use keys).

Afterwards `check()` reads what the world holds — the API's payments, refunds and attempts, the
ledger (postings and per-payment sums, from the API's database) and both PSP simulators' own
records — and asserts: `ok` operations applied exactly once, `failed` never, `unknown` at most
once; captured <= authorized and refunded <= captured; every ledger posting sums to zero and the
ledger equals the payments table; the simulators agree with Tessera about every payment; no
payment exists that no operation asked for, none twice for one key, and none that was
acknowledged is missing. It returns a `CheckResult` with the counts and every violation.

Use it from any campaign: `History()` + `Workload(...).run_in_background()` (or your own
clients calling `Client.authorize` / `capture` / `cancel` / `refund`), then
`check(history, Sources(...))` and `result.print()`; a test asserts `result.ok`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import asyncpg
import httpx

from api.storage.ledger import LedgerRepository


class Kind(StrEnum):
    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    CANCEL = "cancel"
    REFUND = "refund"


class Result(StrEnum):
    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


#: Payment statuses in which the card holds (or held, then moved on) an authorization.
APPROVED = {"authorized", "captured", "partially_refunded", "refunded", "canceled"}
#: Every status a settled payment may have.
FINAL = APPROVED | {"declined", "failed"}


@dataclass
class Call:
    """One HTTP exchange of an operation (an operation may retry several times)."""

    operation: int
    started: float
    seconds: float
    status: int | None  # None: no answer (connection refused, reset, client time-out)
    code: str | None


@dataclass
class Operation:
    index: int
    kind: Kind
    key: str
    invoked: float
    payment: str | None = None
    amount: int | None = None
    #: authorize only: whether the payment was to be captured at once.
    capture: bool = False
    result: Result | None = None
    completed: float | None = None
    #: The last answer's status and error code (None: no answer).
    status: int | None = None
    code: str | None = None
    #: refund only: the refund's id, once the API named it.
    refund: str | None = None
    #: authorize only: a 2xx, 402 or 502 named the payment, so it must exist afterwards.
    acknowledged: bool = False


class History:
    """The record of every operation; safe to share between threads and tasks."""

    def __init__(self) -> None:
        self.operations: list[Operation] = []
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._start

    def invoke(self, kind: Kind, key: str, **fields: Any) -> Operation:
        with self._lock:
            operation = Operation(len(self.operations), kind, key, self.now(), **fields)
            self.operations.append(operation)
        return operation

    def complete(self, operation: Operation, result: Result, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(operation, name, value)
        operation.result = result
        operation.completed = self.now()

    def call(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def counts(self) -> Counter[tuple[str, str]]:
        return Counter(
            (op.kind.value, op.result.value if op.result else "invoked") for op in self.operations
        )

    def statuses(self, between: tuple[float, float] | None = None) -> Counter[str]:
        """Answers by status ("none": no answer), optionally only calls started in a window."""
        found: Counter[str] = Counter()
        for call in self.calls:
            if between is None or between[0] <= call.started <= between[1]:
                found[str(call.status) if call.status is not None else "none"] += 1
        return found


# --- the clients ---------------------------------------------------------------------------

#: Answers worth retrying with the same key: nothing was decided yet, or it may have been.
RETRY_STATUSES = {409, 429, 500, 502, 503, 504}
#: 409 and 502 codes that are definite outcomes, not "try again".
DEFINITE_CODES = {
    "payment_not_capturable",
    "payment_not_cancelable",
    "payment_not_refundable",
    "amount_exceeds_authorized",
    "amount_exceeds_refundable",
    "invalid_state",
    "processor_error",
}


@dataclass
class Client:
    """One merchant's client: every operation retried with its key until a definite answer or
    `give_up_seconds`."""

    http: httpx.AsyncClient
    history: History
    auth: dict[str, str]
    give_up_seconds: float = 30.0
    #: Hard cap on one HTTP exchange; an answer slower than this is "no answer".
    request_timeout: float = 20.0
    #: Other API processes to turn to when one gives no answer (a client-side load balancer).
    others: list[httpx.AsyncClient] = field(default_factory=list)
    _current: int = 0

    async def _exchange(
        self, operation: Operation, method: str, path: str, body: dict[str, Any] | None
    ) -> httpx.Response | None:
        headers = dict(self.auth)
        if method == "POST":
            headers["idempotency-key"] = operation.key
        started = time.monotonic()
        at = self.history.now()
        endpoints = [self.http, *self.others]
        http = endpoints[self._current % len(endpoints)]
        try:
            response = await http.request(
                method, path, json=body, headers=headers, timeout=self.request_timeout
            )
        except httpx.HTTPError:
            self.history.call(Call(operation.index, at, time.monotonic() - started, None, None))
            self._current += 1  # the next try goes to the next process
            return None
        code = _error_code(response)
        self.history.call(
            Call(operation.index, at, time.monotonic() - started, response.status_code, code)
        )
        return response

    async def _until_definite(
        self, operation: Operation, path: str, body: dict[str, Any] | None
    ) -> httpx.Response | None:
        """POST with the operation's key until an answer that is not worth retrying."""
        deadline = time.monotonic() + self.give_up_seconds
        pause = 0.1
        last: httpx.Response | None = None
        while True:
            response = await self._exchange(operation, "POST", path, body)
            if response is not None:
                last = response
                operation.status, operation.code = response.status_code, _error_code(response)
                definite = response.status_code not in RETRY_STATUSES or (
                    operation.code in DEFINITE_CODES
                )
                if definite:
                    return response
            else:
                operation.status, operation.code = None, None
            if time.monotonic() + pause > deadline:
                return None if last is None or not _definite(last) else last
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 1.6)

    async def authorize(
        self, token: str, amount: int, *, capture: bool, currency: str = "EUR"
    ) -> Operation:
        key = f"auth-{secrets.token_hex(10)}"
        operation = self.history.invoke(Kind.AUTHORIZE, key, amount=amount, capture=capture)
        body = {
            "amount": amount,
            "currency": currency,
            "token": token,
            "capture": capture,
            "reference": key,  # how the checker finds the payment of an unanswered key
        }
        response = await self._until_definite(operation, "/v1/payments", body)
        if response is None:
            self.history.complete(operation, Result.UNKNOWN)
            return operation
        data = _json(response)
        payment = data.get("id") or (data.get("error") or {}).get("payment")
        if payment:
            operation.payment = payment
            operation.acknowledged = True
        status = response.status_code
        if status == 201:
            self.history.complete(operation, Result.OK)
        elif status == 202 and payment:
            await self._follow(operation, payment)
        elif _refused(status, operation.code):
            self.history.complete(operation, Result.FAILED)
        else:
            self.history.complete(operation, Result.UNKNOWN)
        return operation

    async def _follow(self, operation: Operation, payment: str) -> None:
        """A `202 processing` payment: read it until the worker settled it, or give up."""
        deadline = time.monotonic() + self.give_up_seconds
        while time.monotonic() < deadline:
            response = await self._exchange(operation, "GET", f"/v1/payments/{payment}", None)
            if response is not None and response.status_code == 200:
                status = response.json()["status"]
                if status in APPROVED:
                    self.history.complete(operation, Result.OK)
                    return
                if status in ("declined", "failed"):
                    self.history.complete(operation, Result.FAILED)
                    return
            await asyncio.sleep(0.5)
        self.history.complete(operation, Result.UNKNOWN)

    async def capture(self, payment: str, amount: int | None = None) -> Operation:
        return await self._operate(Kind.CAPTURE, payment, "capture", amount)

    async def cancel(self, payment: str) -> Operation:
        return await self._operate(Kind.CANCEL, payment, "cancel", None)

    async def refund(self, payment: str, amount: int) -> Operation:
        return await self._operate(Kind.REFUND, payment, "refunds", amount)

    async def _operate(
        self, kind: Kind, payment: str, action: str, amount: int | None
    ) -> Operation:
        key = f"{kind.value}-{secrets.token_hex(10)}"
        operation = self.history.invoke(kind, key, payment=payment, amount=amount)
        body = {"amount": amount} if amount is not None else None
        path = f"/v1/payments/{payment}/{action}"
        response = await self._until_definite(operation, path, body)
        if response is None:
            self.history.complete(operation, Result.UNKNOWN)
            return operation
        status = response.status_code
        if status in (200, 201):
            refund = response.json().get("id") if kind is Kind.REFUND else None
            self.history.complete(operation, Result.OK, refund=refund)
        elif _refused(status, operation.code):
            self.history.complete(operation, Result.FAILED)
        else:
            self.history.complete(operation, Result.UNKNOWN)
        return operation


def _refused(status: int, code: str | None) -> bool:
    """A definite "it did not happen": a decline, the processor's refusal, an invalid state or
    request. Not an in-use key, a rate limit or any other 5xx: those may still happen."""
    if status in (402, 502):
        return code in ("card_declined", "processor_error")
    if status == 409:
        return code in DEFINITE_CODES
    return 400 <= status < 500 and status != 429


def _definite(response: httpx.Response) -> bool:
    return response.status_code not in RETRY_STATUSES or _error_code(response) in DEFINITE_CODES


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _error_code(response: httpx.Response) -> str | None:
    error = _json(response).get("error")
    return str(error.get("code")) if isinstance(error, dict) and error.get("code") else None


# --- the workload --------------------------------------------------------------------------


@dataclass
class Workload:
    """Concurrent customers, each going through a payment's life: authorize (some captured at
    once), then a capture (whole or part), a cancel, or a capture racing a cancel; then refunds,
    some of them racing each other past what was captured."""

    api_url: str
    auth: dict[str, str]
    tokens: list[str]
    history: History
    concurrency: int = 6
    give_up_seconds: float = 30.0
    seed: int | None = None
    #: More API processes; a customer whose request got no answer turns to the next one.
    other_urls: list[str] = field(default_factory=list)
    request_timeout: float = 20.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    errors: list[str] = field(default_factory=list)

    def run_in_background(self) -> Workload:
        self._thread = threading.Thread(target=self._run, name="history-workload", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 120) -> None:
        """Ask the customers to finish their current payment and wait for them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise AssertionError("the workload did not finish its operations in time")

    def run_for(self, seconds: float) -> None:
        self.run_in_background()
        time.sleep(seconds)
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._customers())
        except Exception as exc:  # reported by the campaign, never swallowed
            self.errors.append(repr(exc))

    async def _customers(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 3)
        async with contextlib.AsyncExitStack() as stack:
            https = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=limits))
                for url in (self.api_url, *self.other_urls)
            ]

            def client() -> Client:
                return Client(
                    https[0], self.history, self.auth, self.give_up_seconds,
                    self.request_timeout, https[1:],
                )  # fmt: skip

            await asyncio.gather(
                *(self._customer(client(), random.Random(_seed(self.seed, n)))
                  for n in range(self.concurrency))
            )  # fmt: skip

    async def _customer(self, client: Client, rng: random.Random) -> None:
        while not self._stop.is_set():
            await self.one_payment(client, rng)

    async def one_payment(self, client: Client, rng: random.Random) -> None:
        amount = rng.randint(100, 20_000)
        capture_now = rng.random() < 0.25
        authorized = await client.authorize(rng.choice(self.tokens), amount, capture=capture_now)
        if authorized.result is not Result.OK or authorized.payment is None:
            return
        payment = authorized.payment
        captured = amount if capture_now else 0
        if not capture_now:
            choice = rng.random()
            if choice < 0.45:
                captured = amount
                done = await client.capture(payment)
            elif choice < 0.65:
                captured = rng.randint(1, amount)
                done = await client.capture(payment, captured)
            elif choice < 0.8:
                await client.cancel(payment)
                return
            elif choice < 0.9:  # a capture racing a cancel: exactly one may win
                done, _ = await asyncio.gather(client.capture(payment), client.cancel(payment))
                captured = amount
            else:
                return  # left authorized
            if done.result is not Result.OK:
                return
        refunds = rng.choice((0, 0, 1, 1, 2, 3))
        if refunds == 3:  # racing refunds that together exceed the capture
            part = captured // 2 + 1
            await asyncio.gather(*(client.refund(payment, part) for _ in range(3)))
            return
        left = captured
        for _ in range(refunds):
            if left <= 0:
                return
            part = rng.randint(1, left)
            done = await client.refund(payment, part)
            if done.result is Result.OK:
                left -= part


def _seed(seed: int | None, n: int) -> int | None:
    return None if seed is None else seed * 1000 + n


# --- the checker ---------------------------------------------------------------------------


@dataclass
class Sources:
    """Where the checker reads the truth from."""

    api_url: str
    auth: dict[str, str]
    merchant_id: str
    #: The API's database (the runtime role suffices): the ledger's postings and sums.
    api_database_url: str
    psp_a_url: str
    psp_b_url: str | None = None


@dataclass
class CheckResult:
    counts: dict[str, dict[str, int]]
    payments: int
    statuses: dict[str, int]
    violations: list[str]
    #: Acknowledged payments that do not exist (each also a violation).
    lost: list[str]
    #: Approvals at a simulator for a payment Tessera does not have (each also a violation).
    orphaned_at_psp: list[str]
    answers: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self, title: str = "history") -> str:
        lines = [f"{title}: {sum(sum(v.values()) for v in self.counts.values())} operations"]
        for kind in Kind:
            row = self.counts.get(kind.value, {})
            cells = ", ".join(f"{r} {row.get(r, 0)}" for r in ("ok", "failed", "unknown"))
            lines.append(f"  {kind.value:<10} {cells}")
        lines.append(f"  payments   {self.payments} {dict(sorted(self.statuses.items()))}")
        lines.append(f"  answers    {dict(sorted(self.answers.items()))}")
        lines.append(f"  lost (acknowledged, missing)  {len(self.lost)}")
        lines.append(f"  approved at a PSP, unknown to Tessera  {len(self.orphaned_at_psp)}")
        lines.append(f"  violations {len(self.violations)}")
        lines += [f"    {v}" for v in self.violations[:25]]
        return "\n".join(lines)

    def print(self, title: str = "history") -> None:
        print(self.summary(title), flush=True)


@dataclass
class _PspView:
    """One simulator's record of one attempt reference, in Tessera's terms."""

    approved: bool
    captured: int = 0
    refunded: int = 0
    canceled: bool = False


def check(history: History, sources: Sources, *, settle_seconds: float = 90) -> CheckResult:
    """Wait (up to `settle_seconds`) until the merchant has nothing in flight — no payment
    `processing`, no refund `pending`, no operation holding a payment (the worker finishes what
    clients gave up on) — then read everything and judge the history. What is still in flight
    after that is judged as it stands (and shows as violations)."""
    deadline = time.monotonic() + settle_seconds
    with httpx.Client(base_url=sources.api_url, headers=sources.auth, timeout=30) as http:
        while True:
            payments = _all_payments(http)
            ledger = _read_ledger(sources)
            quiet = _settled(payments) and not ledger.in_flight
            if quiet or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    psp = _read_simulators(sources)
    return _judge(history, payments, ledger, psp)


def _all_payments(http: httpx.Client) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = ""
    while True:
        response = http.get(f"/v1/payments?limit=100{cursor}")
        response.raise_for_status()
        page = response.json()
        found += page["data"]
        if not page["has_more"]:
            return found
        cursor = f"&starting_after={page['data'][-1]['id']}"


def _settled(payments: list[dict[str, Any]]) -> bool:
    return all(
        p["status"] != "processing" and all(r["status"] != "pending" for r in p["refunds"])
        for p in payments
    )


@dataclass
class _Ledger:
    unbalanced: list[str]
    #: payment id -> (held, captured, refunded) as the ledger has them, and the table's.
    mismatches: dict[str, list[str]]
    in_flight: set[str]
    postings: dict[str, Counter[str]]


def _read_ledger(sources: Sources) -> _Ledger:
    async def read() -> _Ledger:
        conn = await asyncpg.connect(sources.api_database_url, timeout=10)
        try:
            async with conn.transaction(isolation="repeatable_read"):
                ledger = LedgerRepository(conn)
                unbalanced = await ledger.unbalanced_postings()
                rows = await ledger.payments_against_ledger()
                kinds = await conn.fetch(
                    "SELECT payment_id, kind, count(*) AS n FROM ledger_postings "
                    "WHERE merchant_id = $1 GROUP BY payment_id, kind",
                    sources.merchant_id,
                )
        finally:
            await conn.close()
        mismatches: dict[str, list[str]] = {}
        in_flight = set()
        for row in rows:
            if row["merchant_id"] != sources.merchant_id:
                continue
            if row["in_flight"]:
                in_flight.add(row["id"])
            held = row["amount_authorized"] if row["status"] == "authorized" else 0
            for name, table, booked in (
                ("held", held, row["held"]),
                ("captured", row["amount_captured"], row["captured"]),
                ("refunded", row["amount_refunded"], row["refunded"]),
            ):
                if table != booked:
                    mismatches.setdefault(row["id"], []).append(
                        f"{name}: table {table}, ledger {booked}"
                    )
        postings: dict[str, Counter[str]] = {}
        for row in kinds:
            postings.setdefault(row["payment_id"], Counter())[row["kind"]] = row["n"]
        return _Ledger(
            [f"posting {r['posting_id']} sums to {r['total']} {r['currency']}" for r in unbalanced],
            mismatches,
            in_flight,
            postings,
        )

    return asyncio.run(read())


def _read_simulators(sources: Sources) -> dict[str, list[_PspView]]:
    """Every record both simulators hold, by our attempt reference."""
    found: dict[str, list[_PspView]] = {}
    with httpx.Client(timeout=30) as http:
        body = http.get(sources.psp_a_url + "/admin/authorizations").json()
        for auth in body["authorizations"]:
            status = auth["status"]
            approved = status in ("approved", "captured", "voided")
            view = _PspView(
                approved,
                captured=auth["amount_captured"] if status == "captured" else 0,
                refunded=auth["amount_refunded"],
                canceled=status == "voided",
            )
            found.setdefault(auth["reference"], []).append(view)
        if sources.psp_b_url:
            body = http.get(sources.psp_b_url + "/admin/payments").json()
            for payment in body["payments"] if isinstance(body, dict) else body:
                found.setdefault(payment["merchantReference"], []).append(_psp_b_view(payment))
    return found


def _psp_b_view(payment: dict[str, Any]) -> _PspView:
    approved = payment.get("resultCode") == "Authorised"
    live = [m for m in payment.get("modifications", []) if m.get("status") != "failed"]

    def total(kind: str) -> int:
        return sum(int((m.get("amount") or {}).get("value", 0)) for m in live if m["type"] == kind)

    captured = payment["amount"]["value"] if payment.get("captureImmediately") else total("capture")
    return _PspView(
        approved,
        captured=captured if approved else 0,
        refunded=total("refund"),
        canceled=any(m["type"] == "cancel" for m in live),
    )


def _judge(
    history: History,
    payments: list[dict[str, Any]],
    ledger: _Ledger,
    psp: dict[str, list[_PspView]],
) -> CheckResult:
    violations: list[str] = []
    by_id = {p["id"]: p for p in payments}
    by_reference: dict[str, list[dict[str, Any]]] = {}
    for row in payments:
        by_reference.setdefault(row.get("reference") or "", []).append(row)
    operations = history.operations
    authorizations = {op.key: op for op in operations if op.kind is Kind.AUTHORIZE}
    on_payment: dict[str, list[Operation]] = {}
    for op in operations:
        if op.kind is not Kind.AUTHORIZE and op.payment:
            on_payment.setdefault(op.payment, []).append(op)

    # Payments nobody asked for, or more than one for one key.
    for reference, found in by_reference.items():
        if reference not in authorizations:
            violations += [
                f"{p['id']}: no operation asked for it (reference {reference!r})" for p in found
            ]
        elif len(found) > 1:
            violations.append(f"key {reference}: {len(found)} payments {[p['id'] for p in found]}")

    lost: list[str] = []
    orphaned: list[str] = []
    for op in authorizations.values():
        candidates = by_reference.get(op.key, [])
        payment = candidates[0] if candidates else None
        if op.acknowledged and op.payment and op.payment not in by_id:
            lost.append(op.payment)
            violations.append(f"{op.payment}: acknowledged ({op.status}) but missing")
            approvals = _approvals_with_prefix(psp, op.payment)
            if approvals:
                orphaned.append(op.payment)
                violations.append(f"{op.payment}: approved {approvals}x at a PSP, lost by Tessera")
        if payment is None:
            if op.result is Result.OK:
                violations.append(f"authorize {op.key}: ok but no payment")
            continue
        approvals = _approvals(payment, psp)
        status = payment["status"]
        if op.result is Result.OK and status not in APPROVED:
            violations.append(f"{payment['id']}: authorize ok but the payment is {status}")
        if op.result is Result.FAILED and status in APPROVED:
            violations.append(f"{payment['id']}: authorize failed but the payment is {status}")
        if approvals > 1:
            violations.append(f"{payment['id']}: {approvals} authorizations at the PSPs")
        if status in APPROVED and approvals != 1:
            violations.append(f"{payment['id']}: {status} in Tessera, {approvals} at the PSPs")
        if status in ("declined", "failed") and approvals:
            violations.append(f"{payment['id']}: {status} in Tessera, approved at a PSP")
        if status not in FINAL:
            violations.append(f"{payment['id']}: still {status}")
        violations += _check_amounts(payment, on_payment.get(payment["id"], []), op)
        violations += _check_psp_agreement(payment, psp)
        violations += [
            f"{payment['id']}: ledger {m}" for m in ledger.mismatches.get(payment["id"], [])
        ]
        kinds = ledger.postings.get(payment["id"], Counter())
        for kind in ("authorization", "capture", "release"):
            if kinds[kind] > 1:
                violations.append(f"{payment['id']}: {kinds[kind]} {kind} postings")
    for op in operations:
        missing = op.kind is not Kind.AUTHORIZE and op.payment and op.payment not in by_id
        if missing and op.result is Result.OK:
            violations.append(f"{op.kind} {op.key}: ok on {op.payment}, which is missing")
    violations += [f"ledger: {u}" for u in ledger.unbalanced]

    counts: dict[str, dict[str, int]] = {}
    for op in operations:
        row = counts.setdefault(op.kind.value, {})
        result = op.result.value if op.result else "invoked"
        row[result] = row.get(result, 0) + 1
        if op.result is None:
            violations.append(f"{op.kind} {op.key}: invoked, never completed")
    return CheckResult(
        counts=counts,
        payments=len(payments),
        statuses=dict(Counter(p["status"] for p in payments)),
        violations=violations,
        lost=lost,
        orphaned_at_psp=orphaned,
        answers=dict(history.statuses()),
    )


def _approvals(payment: dict[str, Any], psp: dict[str, list[_PspView]]) -> int:
    """Authorizations the simulators hold for the payment's attempts, not counting a late one
    Tessera found and reversed."""
    count = 0
    for attempt in payment["attempts"]:
        views = [v for v in psp.get(attempt["reference"], []) if v.approved]
        if attempt.get("late_reversal") and payment["status"] in ("failed", "declined"):
            views = [v for v in views if not (v.canceled or v.refunded)]
        count += len(views)
    return count


def _approvals_with_prefix(psp: dict[str, list[_PspView]], payment_id: str) -> int:
    return sum(
        1
        for reference, views in psp.items()
        if reference.startswith(payment_id + "_")
        for v in views
        if v.approved
    )


def _amount_of(op: Operation, payment: dict[str, Any]) -> int:
    return op.amount if op.amount is not None else int(payment["amount_authorized"])


def _check_amounts(
    payment: dict[str, Any], ops: list[Operation], authorize: Operation
) -> list[str]:
    """Captures, cancels and refunds on one payment: ok exactly once, failed never, unknown at
    most once; and the amounts' order."""
    pid = payment["id"]
    found: list[str] = []
    authorized, captured = payment["amount_authorized"], payment["amount_captured"]
    refunded, status = payment["amount_refunded"], payment["status"]
    if captured > authorized:
        found.append(f"{pid}: captured {captured} > authorized {authorized}")
    if refunded > captured:
        found.append(f"{pid}: refunded {refunded} > captured {captured}")

    captures = [op for op in ops if op.kind is Kind.CAPTURE]
    cancels = [op for op in ops if op.kind is Kind.CANCEL]
    ok_captures = [op for op in captures if op.result is Result.OK]
    maybe_captures = [op for op in captures if op.result is Result.UNKNOWN]
    if authorize.capture:
        if status in APPROVED and captured != authorized:
            found.append(f"{pid}: captured at once, yet captured {captured} of {authorized}")
    elif status in APPROVED:
        if len(ok_captures) > 1:
            found.append(f"{pid}: {len(ok_captures)} captures answered ok")
        if ok_captures:
            if captured != _amount_of(ok_captures[0], payment):
                found.append(
                    f"{pid}: capture ok for {_amount_of(ok_captures[0], payment)}, "
                    f"captured {captured}"
                )
        elif captured and captured not in {_amount_of(op, payment) for op in maybe_captures}:
            found.append(f"{pid}: captured {captured}, but no capture was ok or unknown")
    ok_cancels = [op for op in cancels if op.result is Result.OK]
    maybe_cancels = [op for op in cancels if op.result is Result.UNKNOWN]
    if ok_cancels and status != "canceled":
        found.append(f"{pid}: cancel ok, but the payment is {status}")
    if status == "canceled" and not (ok_cancels or maybe_cancels):
        found.append(f"{pid}: canceled, but no cancel was ok or unknown")
    if ok_cancels and ok_captures:
        found.append(f"{pid}: both a capture and a cancel answered ok")

    refunds = [op for op in ops if op.kind is Kind.REFUND]
    rows = {r["id"]: r for r in payment["refunds"]}
    counted = [r for r in payment["refunds"] if r["status"] in ("succeeded", "pending")]
    if sum(r["amount"] for r in counted) != refunded:
        found.append(
            f"{pid}: refunds add up to {sum(r['amount'] for r in counted)}, payment says {refunded}"
        )
    ok_ids = set()
    for op in refunds:
        if op.result is Result.OK:
            row = rows.get(op.refund or "")
            if row is None:
                found.append(f"{pid}: refund {op.key} ok, but refund {op.refund} is missing")
            elif row["status"] not in ("succeeded", "pending") or row["amount"] != op.amount:
                found.append(f"{pid}: refund {op.refund} ok, but {row['status']} {row['amount']}")
            ok_ids.add(op.refund)
    extra = Counter(r["amount"] for r in counted if r["id"] not in ok_ids)
    maybe = Counter(op.amount for op in refunds if op.result is Result.UNKNOWN)
    if extra - maybe:
        found.append(
            f"{pid}: refunds {dict(extra - maybe)} applied that no ok or unknown refund asked for"
        )
    return found


def _check_psp_agreement(payment: dict[str, Any], psp: dict[str, list[_PspView]]) -> list[str]:
    """The simulator that authorized the payment holds what Tessera holds."""
    pid, status = payment["id"], payment["status"]
    if status not in APPROVED:
        return []
    views = [
        v
        for attempt in payment["attempts"]
        for v in psp.get(attempt["reference"], [])
        if v.approved
    ]
    if len(views) != 1:
        return []  # reported by the approvals count
    view = views[0]
    found = []
    if view.captured != payment["amount_captured"]:
        found.append(f"{pid}: captured {payment['amount_captured']}, the PSP {view.captured}")
    refunded = sum(r["amount"] for r in payment["refunds"] if r["status"] == "succeeded")
    if view.refunded != refunded:
        found.append(f"{pid}: refunded {refunded}, the PSP {view.refunded}")
    if view.canceled != (status == "canceled"):
        found.append(f"{pid}: {status} in Tessera, canceled={view.canceled} at the PSP")
    return found


def operations_of(history: History, kinds: Iterable[Kind]) -> list[Operation]:
    wanted = set(kinds)
    return [op for op in history.operations if op.kind in wanted]
