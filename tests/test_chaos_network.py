"""Issue 9, campaign 3: network faults on every hop of the payment API.

Every hop — the API's Postgres, its Redis, its vault, its direct line to each PSP (captures,
refunds, inquiries) and the vault's forwarding to each PSP (authorizations) — runs through a
`FaultProxy` (tests/support/fault_proxy.py, Toxiproxy's fault types). For each hop and fault:

- the request answers within the hop's configured time-out plus a margin, with the documented
  status and code (`503` retryable, `502 processor_error` definite, `202 processing` unknown),
  never a 500 and never a hang; nothing is half-written (the same key, once healed, gives one
  payment and one authorization);
- once healed, the service works again and holds no connection the fault left behind: every
  connection opened during the fault is closed, the API holds no more Postgres connections than
  its pool (the same ones `pg_stat_activity` lists, none idle in a transaction) and Redis lists
  exactly the connections the proxy carries (`CLIENT LIST`).

Then resets where they hurt: at each COMMIT of a payment (committed or not: the client cannot
tell) and during the PSP's authorization, capture and refund (the PSP did it, the answer is
lost): the client retries with the same key, the worker settles what stays unknown, and the PSP
holds exactly one authorization (capture, refund) per payment. Last, a load of authorizations,
captures, cancels and refunds while faults come and go on every hop, judged by the history
checker (tests/support/history.py).

`TESSERA_CHAOS_NETWORK_FULL=1` adds latency and byte-limit faults to the matrix and makes the
load run `TESSERA_CHAOS_NETWORK_SECONDS` (default 120) long; the normal suite runs the
representative part (each hop x time-out, reset, down) in about a minute.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ApiMerchant, create_merchant
from tests.support.fault_proxy import FaultProxy
from tests.support.history import History, Sources, Workload, check
from tests.support.network_stack import (
    AUTHORIZATION_TIMEOUT_SECONDS,
    DB_POOL_MAX,
    DB_TIMEOUT_SECONDS,
    LEASE_SECONDS,
    REDIS_TIMEOUT_SECONDS,
    VAULT_CLIENT_TIMEOUT_SECONDS,
    VAULT_FORWARD_TIMEOUT_SECONDS,
    NetworkStack,
    environment_flag,
    paused_worker,
    start_network_stack,
)
from tests.support.payments import APPROVED, configure_routing, new_key, tokenize, wait_for
from tests.support.processes import ServiceProcess

FULL = environment_flag("TESSERA_CHAOS_NETWORK_FULL")
LOAD_SECONDS = float(os.environ.get("TESSERA_CHAOS_NETWORK_SECONDS", "120")) if FULL else 6.0
#: Time for a loaded two-core machine to answer, on top of a configured time-out.
MARGIN = 2.0
#: More connections than this to a vault or PSP after sequential requests would be a leak
#: (aiohttp's pool is bounded only by its limit of 1,000).
HTTP_CONNECTIONS_BOUND = 4
REDIS_CONNECTIONS_BOUND = 6


@pytest.fixture(scope="module")
def net(
    api_env: dict[str, str],
    vault_env: dict[str, str],
    pg_admin_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[NetworkStack]:
    stack = start_network_stack(
        work=tmp_path_factory.mktemp("network"),
        api_env=api_env,
        vault_env=vault_env,
        pg_admin_url=pg_admin_url,
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def shop(net: NetworkStack, tokens: dict[str, str]) -> ApiMerchant:
    """A merchant whose payments go to PSP A."""
    return create_merchant(net.direct_env, net.vault, tokens["admin"], "Network shop A")


@pytest.fixture(scope="module")
def shop_b(net: NetworkStack, tokens: dict[str, str]) -> ApiMerchant:
    """A merchant whose payments go to PSP B."""
    merchant = create_merchant(net.direct_env, net.vault, tokens["admin"], "Network shop B")
    configure_routing(net.direct_env, merchant, "--processors", "psp_b")
    return merchant


@pytest.fixture(autouse=True)
def healed_network(net: NetworkStack) -> Iterator[None]:
    """Whatever a test did to the network, the next one starts with it whole."""
    yield
    net.heal_all()


# --- talking to the API -------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer at all
    code: str | None
    seconds: float
    body: dict[str, Any]

    @property
    def outcome(self) -> str:
        """`201 captured`, `503 service_unavailable`, `no answer`: for messages."""
        if self.status is None:
            return "no answer"
        return f"{self.status} {self.code or self.body.get('status')}"


def send(
    net: NetworkStack,
    merchant: ApiMerchant,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    key: str | None = None,
) -> Answer:
    headers = dict(merchant.auth)
    if method == "POST":
        headers["idempotency-key"] = key or new_key()
    started = time.monotonic()
    try:
        response = httpx.request(method, net.api.url + path, json=body, headers=headers, timeout=60)
    except httpx.HTTPError:
        return Answer(None, None, time.monotonic() - started, {})
    seconds = time.monotonic() - started
    data = response.json() if response.content else {}
    error = data.get("error") if isinstance(data, dict) else None
    code = str(error["code"]) if isinstance(error, dict) else None
    return Answer(response.status_code, code, seconds, data)


def authorize(
    net: NetworkStack, merchant: ApiMerchant, key: str, token: str, *, capture: bool = True
) -> Answer:
    body = {
        "amount": 1000 + sum(map(ord, key)) % 500,
        "currency": "EUR",
        "token": token,
        "capture": capture,
        "reference": key,
    }
    return send(net, merchant, "POST", "/v1/payments", body, key)


def payment_of(net: NetworkStack, merchant: ApiMerchant, payment_id: str) -> dict[str, Any]:
    return send(net, merchant, "GET", f"/v1/payments/{payment_id}").body


def authorizations_at(psp: ServiceProcess, processor: str, reference: str) -> list[dict[str, Any]]:
    """What the simulator holds for our attempt reference (a scan, so duplicates show)."""
    if processor == "psp_a":
        url = f"{psp.url}/admin/authorizations"
        found: list[dict[str, Any]] = httpx.get(url, params={"reference": reference}).json()[
            "authorizations"
        ]
        return found
    body = httpx.get(f"{psp.url}/admin/payments", params={"merchantReference": reference}).json()
    payments: list[dict[str, Any]] = body["payments"]
    return payments


def approved_at_psp(net: NetworkStack, payment: dict[str, Any]) -> int:
    """Authorizations the PSPs hold for the payment's attempts."""
    count = 0
    for attempt in payment["attempts"]:
        psp = net.psp_a if attempt["processor"] == "psp_a" else net.psp_b
        for record in authorizations_at(psp, attempt["processor"], attempt["reference"]):
            at_a = record.get("status") in ("approved", "captured", "voided")
            if at_a or record.get("resultCode") == "Authorised":
                count += 1
    return count


# --- the fault matrix ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    hop: str
    fault: str
    #: What the faulted request answers: status and error code (or payment status), and within.
    status: int
    code: str
    within: float
    #: What the same key answers once healed.
    healed_status: int

    def __str__(self) -> str:
        return f"{self.hop}-{self.fault}"


def _cases() -> list[Case]:
    # Each hop's configured time-out, plus the margin; a statement that times out costs twice
    # the database's (asyncpg then waits, as long again at most, for the server to confirm
    # the cancel before the connection may be used or pooled again).
    db = 2 * DB_TIMEOUT_SECONDS + MARGIN
    redis_wait = REDIS_TIMEOUT_SECONDS + MARGIN
    vault = VAULT_CLIENT_TIMEOUT_SECONDS + MARGIN
    forward = VAULT_FORWARD_TIMEOUT_SECONDS + MARGIN
    psp = AUTHORIZATION_TIMEOUT_SECONDS + MARGIN
    quick = MARGIN
    cases = [
        # The database: 503, nothing written; the same key then makes the payment.
        Case("postgres", "timeout", 503, "service_unavailable", db, 201),
        Case("postgres", "reset", 503, "service_unavailable", quick, 201),
        Case("postgres", "down", 503, "service_unavailable", quick, 201),
        # Redis is a cache: payments go on, at the cost of one Redis time-out at most (after
        # which the process leaves Redis alone for a while: the time-out comes last here).
        Case("redis", "reset", 201, "captured", quick, 201),
        Case("redis", "down", 201, "captured", quick, 201),
        Case("redis", "timeout", 201, "captured", redis_wait, 201),
        # The vault (the token is read before anything is written): 503, retry.
        Case("vault", "timeout", 503, "service_unavailable", vault, 201),
        Case("vault", "reset", 503, "service_unavailable", quick, 201),
        Case("vault", "down", 503, "service_unavailable", quick, 201),
        # The vault's forward to the PSP: unknown (202) unless surely not sent (502).
        Case("psp_a_forward", "timeout", 202, "processing", forward, 202),
        Case("psp_a_forward", "reset", 202, "processing", quick, 202),
        Case("psp_a_forward", "down", 502, "processor_error", quick, 502),
        Case("psp_b_forward", "timeout", 202, "processing", forward, 202),
        Case("psp_b_forward", "reset", 202, "processing", quick, 202),
        Case("psp_b_forward", "down", 502, "processor_error", quick, 502),
        # The API's own line to the PSP, here for a capture: 503 (ask again), 502 if not sent.
        Case("psp_a", "timeout", 503, "processor_unavailable", psp, 200),
        Case("psp_a", "reset", 503, "processor_unavailable", quick, 200),
        Case("psp_a", "down", 502, "processor_error", quick, 502),
        Case("psp_b", "timeout", 503, "processor_unavailable", psp, 200),
        Case("psp_b", "reset", 503, "processor_unavailable", quick, 200),
        Case("psp_b", "down", 502, "processor_error", quick, 502),
    ]  # fmt: skip
    if FULL:
        cases += [
            Case("postgres", "latency", 503, "service_unavailable", db, 201),
            Case("postgres", "limit", 503, "service_unavailable", quick, 201),
            Case("redis", "latency", 201, "captured", redis_wait, 201),
            Case("redis", "limit", 201, "captured", quick, 201),
            Case("vault", "latency", 503, "service_unavailable", vault, 201),
            Case("vault", "limit", 503, "service_unavailable", quick, 201),
            Case("psp_a_forward", "latency", 202, "processing", forward, 202),
            Case("psp_a_forward", "limit", 202, "processing", quick, 202),
            Case("psp_b_forward", "latency", 202, "processing", forward, 202),
            Case("psp_b_forward", "limit", 202, "processing", quick, 202),
            Case("psp_a", "latency", 503, "processor_unavailable", psp, 200),
            Case("psp_a", "limit", 503, "processor_unavailable", quick, 200),
            Case("psp_b", "latency", 503, "processor_unavailable", psp, 200),
            Case("psp_b", "limit", 503, "processor_unavailable", quick, 200),
        ]  # fmt: skip
    return cases


#: Latency well past every hop's time-out (the vault client's is the longest, 4 s).
LATENCY_MS = (VAULT_CLIENT_TIMEOUT_SECONDS + 2) * 1000


def arm(proxy: FaultProxy, fault: str) -> None:
    if fault == "timeout":
        proxy.timeout()
    elif fault == "reset":
        proxy.reset_after(0)  # every connection is reset at its next byte, either way
    elif fault == "down":
        proxy.down()
    elif fault == "latency":
        proxy.latency(LATENCY_MS, jitter=100)
    elif fault == "limit":
        proxy.limit_bytes(40)  # an answer cut off after its first 40 bytes
    else:
        raise AssertionError(fault)


def leaks(net: NetworkStack, hop: str) -> list[str]:
    """What is wrong with the hop's connections now (nothing, once the fault's are cleaned up):
    a connection the fault broke still held, one side holding what the other let go, more
    connections than the client's pool, a server's list that is not what the proxy carries."""
    proxy = net.proxies[hop]
    found = []
    open_now = proxy.open_connections()
    ports = proxy.upstream_ports()
    if open_now.client != open_now.upstream:
        found.append(f"half-open links: {open_now}")
    if broken := proxy.broken_still_open():
        found.append(f"{broken} connections the blackhole broke are still held")
    if hop == "postgres":
        backends = net.postgres_backends()
        if open_now.client > DB_POOL_MAX:
            found.append(f"{open_now.client} connections, more than the pool's {DB_POOL_MAX}")
        if {b["client_port"] for b in backends} != ports:
            found.append(f"pg_stat_activity {backends} is not what the proxy carries {ports}")
        stuck = [b for b in backends if "transaction" in (b["state"] or "")]
        found += [f"backend {b} idle in a transaction" for b in stuck]
    elif hop == "redis":
        clients = net.redis_clients()
        if set(clients) != ports:
            found.append(f"CLIENT LIST {clients} is not what the proxy carries {ports}")
        if open_now.client > REDIS_CONNECTIONS_BOUND:
            found.append(f"{open_now.client} Redis connections")
    elif open_now.client > HTTP_CONNECTIONS_BOUND:
        found.append(f"{open_now.client} connections to {hop}")
    return found


def assert_no_leaks(net: NetworkStack, hop: str) -> None:
    deadline = time.monotonic() + 3 * DB_TIMEOUT_SECONDS + MARGIN
    while problems := leaks(net, hop):
        if time.monotonic() > deadline:
            raise AssertionError(f"{hop}: {problems}")
        time.sleep(0.1)


def subject(case: Case) -> str:
    """Which merchant and operation a hop's fault is tried on."""
    return "capture" if case.hop in ("psp_a", "psp_b") else "authorize"


@pytest.mark.parametrize("case", _cases(), ids=str)
def test_each_hop_and_fault_answers_in_time_and_leaves_no_connection_behind(
    case: Case, net: NetworkStack, shop: ApiMerchant, shop_b: ApiMerchant
) -> None:
    merchant = shop_b if case.hop.startswith("psp_b") else shop
    token = tokenize(net.vault, merchant)
    key = new_key()
    proxy = net.proxies[case.hop]
    if subject(case) == "capture":
        authorized = authorize(net, merchant, new_key(), token, capture=False)
        assert authorized.status == 201, authorized.outcome
        payment_id = authorized.body["id"]
        path = f"/v1/payments/{payment_id}/capture"

        def request() -> Answer:
            return send(net, merchant, "POST", path, {"amount": 700}, key)

    else:

        def request() -> Answer:
            return authorize(net, merchant, key, token)

    arm(proxy, case.fault)
    faulted = request()
    proxy.heal()

    shown = answer_code(faulted)
    assert (faulted.status, shown) == (case.status, case.code), faulted
    assert faulted.seconds <= case.within, f"{faulted.outcome} after {faulted.seconds:.2f}s"

    healed = until_not_in_use(request)
    assert healed.status == case.healed_status, healed
    if subject(case) == "capture":
        assert_captured_once(net, merchant, payment_id, 700 if healed.status == 200 else None)
    else:
        assert_one_payment_for_the_key(net, merchant, key, healed)
    assert_no_leaks(net, case.hop)


def until_not_in_use(request: Callable[[], Answer]) -> Answer:
    """The request, again while its key is in use: after `503 processor_unavailable` the
    worker's completer may be finishing the operation (it takes released keys at once)."""
    deadline = time.monotonic() + LEASE_SECONDS + MARGIN
    while (answer := request()).code == "idempotency_key_in_use" and time.monotonic() < deadline:
        time.sleep(0.2)
    return answer


def answer_code(answer: Answer) -> str | None:
    return answer.code if answer.code is not None else answer.body.get("status")


def assert_one_payment_for_the_key(
    net: NetworkStack, merchant: ApiMerchant, key: str, healed: Answer
) -> None:
    payment_id = healed.body.get("id") or (healed.body.get("error") or {}).get("payment")
    assert payment_id, healed
    same_key = [p for p in list_payments(net, merchant) if p["reference"] == key]
    assert [p["id"] for p in same_key] == [payment_id]
    assert approved_at_psp(net, same_key[0]) <= 1


def assert_captured_once(
    net: NetworkStack, merchant: ApiMerchant, payment_id: str, amount: int | None
) -> None:
    """The PSP captured `amount` once (None: nothing), and Tessera says the same."""
    payment = payment_of(net, merchant, payment_id)
    [attempt] = payment["attempts"]
    psp = net.psp_a if attempt["processor"] == "psp_a" else net.psp_b
    [record] = authorizations_at(psp, attempt["processor"], attempt["reference"])
    if attempt["processor"] == "psp_a":
        assert record["amount_captured"] == (amount or 0), record
    else:
        captures = [m for m in record.get("modifications", []) if m["type"] == "capture"]
        assert [c["amount"]["value"] for c in captures] == ([amount] if amount else []), record
    if amount is not None:
        wait_for(lambda: payment_of(net, merchant, payment_id)["amount_captured"] == amount, 15)
    else:
        assert payment["status"] == "authorized", payment


def list_payments(net: NetworkStack, merchant: ApiMerchant) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = send(net, merchant, "GET", f"/v1/payments?limit=100{cursor}").body
        found += page["data"]
        if not page["has_more"]:
            return found
        cursor = f"&starting_after={page['data'][-1]['id']}"


# --- resets where they hurt ----------------------------------------------------------------


def test_a_reset_at_any_commit_of_a_payment_never_charges_twice(
    net: NetworkStack, shop: ApiMerchant
) -> None:
    """Postgres connection reset at each COMMIT of a payment, with the COMMIT applied (the answer
    lost) or not: the client gets a 503 and retries with the same key (the worker paused: the
    client does it all). The PSP holds one authorization and the key one payment.

    The payment whose outcome's COMMIT was lost is first retried while PSP A cannot be reached:
    the retry resumes it by asking the PSP, which once answered 500; it is `202 processing`
    (the outcome is unknown, never a failure), and the worker settles it from the PSP."""
    pg = net.proxies["postgres"]
    token = tokenize(net.vault, shop)
    # PSP B's notifications are transactions of the API too: none may slip in and be counted.
    wait_for(lambda: psp_b_notifications_pending(net) == 0, 40)
    settle(pg)
    pg.watch(b"COMMIT")
    clean = authorize(net, shop, new_key(), token)
    assert clean.status == 201, clean
    commits = pg.seen(b"COMMIT")
    assert commits >= 2  # the claim with the new payment, and the outcome with the response
    first: dict[str, Answer] = {}
    with paused_worker(net):
        for index, deliver in itertools.product(range(commits), (True, False)):
            key = f"commit-{index}-{'applied' if deliver else 'lost'}-{new_key()}"
            settle(pg)  # the count must start with this payment's own transactions
            pg.reset_on(b"COMMIT", skip=index, deliver=deliver)
            first[key] = authorize(net, shop, key, token)
            pg.heal()
        for key, answer in first.items():
            assert (answer.status, answer.code) == (503, "service_unavailable"), (key, answer)
        outcome_lost = next(k for k in first if k.startswith(f"commit-{commits - 1}-lost-"))
        time.sleep(LEASE_SECONDS + 0.5)  # a leased key answers 409 until its lease runs out
        net.proxies["psp_a"].down()
        resumed = authorize(net, shop, outcome_lost, token)
        net.proxies["psp_a"].heal()
        assert (resumed.status, resumed.body.get("status")) == (202, "processing"), resumed
        final = {outcome_lost: resumed}
        deadline = time.monotonic() + 15
        while len(final) < len(first) and time.monotonic() < deadline:
            for key in first.keys() - final.keys():
                answer = authorize(net, shop, key, token)
                assert answer.status in (201, 409), (key, answer)
                if answer.status == 201:
                    final[key] = answer
            time.sleep(0.3)
    assert final.keys() == first.keys(), f"not finished: {first.keys() - final.keys()}"
    wait_for(lambda: payment_of(net, shop, resumed.body["id"])["status"] == "captured", 20)
    payments = list_payments(net, shop)
    for key, answer in final.items():
        same_key = [p for p in payments if p["reference"] == key]
        assert [p["id"] for p in same_key] == [answer.body["id"]], key
        assert same_key[0]["status"] == "captured", (key, same_key[0])
        assert approved_at_psp(net, same_key[0]) == 1, key
    assert_no_leaks(net, "postgres")


def settle(pg: FaultProxy, quiet: float = 0.5, limit: float = 15) -> None:
    """Wait until no COMMIT has crossed the proxy for `quiet` seconds: a transaction still on its
    way (the API finishing after a 503 on a loaded machine) would otherwise be counted as one of
    the next payment's, and the reset would hit the wrong COMMIT (seen once in a full suite)."""
    deadline = time.monotonic() + limit
    pg.watch(b"COMMIT")
    while time.monotonic() < deadline:
        before = pg.seen(b"COMMIT")
        time.sleep(quiet)
        if pg.seen(b"COMMIT") == before:
            return
    raise AssertionError(f"COMMITs kept crossing the proxy for {limit} s")


def psp_b_notifications_pending(net: NetworkStack) -> int:
    stats = httpx.get(f"{net.psp_b.url}/admin/stats", timeout=10).json()
    pending: int = stats["notifications"]["pending"]
    return pending


def test_a_connection_lost_inside_a_transaction_answers_503_not_500(
    net: NetworkStack, shop: ApiMerchant
) -> None:
    """The connection dies between BEGIN and COMMIT (here: at the statement that carries the
    idempotency key): asyncpg's transaction exit then raises `InterfaceError: the underlying
    connection is closed` over the real error, which once answered 500."""
    token = tokenize(net.vault, shop)
    warm = authorize(net, shop, new_key(), token)  # key and routing caches warm: no read first
    assert warm.status == 201, warm
    key = new_key()
    net.proxies["postgres"].reset_on(key.encode(), deliver=False)
    lost = authorize(net, shop, key, token)
    assert (lost.status, lost.code) == (503, "service_unavailable"), lost
    net.proxies["postgres"].heal()
    again = authorize(net, shop, key, token)
    assert again.status == 201, again
    assert_one_payment_for_the_key(net, shop, key, again)


@pytest.mark.parametrize(
    ("hop", "request_line"),
    [
        ("psp_a_forward", b"POST /v1/authorizations"),
        ("psp_b_forward", b"POST /v1/payments"),
        ("vault", b"POST /v1/forward"),
    ],
)
def test_a_reset_after_the_psp_authorized_never_charges_twice(
    hop: str,
    request_line: bytes,
    net: NetworkStack,
    shop: ApiMerchant,
    shop_b: ApiMerchant,
) -> None:
    """The authorization reaches the PSP, which approves it; the answer is lost to a reset (on
    the vault's line to the PSP, or on the API's to the vault). The payment is `processing`,
    the retry replays that, the worker settles it from the PSP's record: one authorization."""
    merchant = shop_b if hop == "psp_b_forward" else shop
    token = tokenize(net.vault, merchant)
    key = new_key()
    resets = net.proxies[hop].resets
    net.proxies[hop].reset_on(request_line, deliver=True)
    answer = authorize(net, merchant, key, token)
    assert (answer.status, answer.body.get("status")) == (202, "processing"), answer
    assert net.proxies[hop].resets == resets + 1
    again = authorize(net, merchant, key, token)
    assert (again.status, again.body["id"]) == (202, answer.body["id"]), again
    payment_id = answer.body["id"]
    wait_for(lambda: payment_of(net, merchant, payment_id)["status"] == "captured", 20)
    payment = payment_of(net, merchant, payment_id)
    assert len(payment["attempts"]) == 1  # never failed over after an unknown outcome
    assert approved_at_psp(net, payment) == 1


@pytest.mark.parametrize("operation", ["capture", "refund"])
def test_a_reset_after_the_psp_captured_or_refunded_never_does_it_twice(
    operation: str, net: NetworkStack, shop: ApiMerchant
) -> None:
    """The API's capture or refund reaches PSP A, which does it; the answer is lost. The client
    gets `503 processor_unavailable` and retries with the same key, first while PSP A cannot be
    reached at all: that retry's request surely did not arrive, but the first one did, so it is
    still `503` (once it was `502`: the refund marked failed and its amount given back while PSP
    A had refunded it). Once PSP A answers, the retry gets the one it asked for."""
    token = tokenize(net.vault, shop)
    authorized = authorize(net, shop, new_key(), token, capture=operation == "refund")
    payment_id = authorized.body["id"]
    key = new_key()
    path = f"/v1/payments/{payment_id}/{'capture' if operation == 'capture' else 'refunds'}"
    with paused_worker(net):  # the client's retries, not the completer, finish it
        net.proxies["psp_a"].reset_on(b"/capture" if operation == "capture" else b"/refunds")
        lost = send(net, shop, "POST", path, {"amount": 600}, key)
        assert (lost.status, lost.code) == (503, "processor_unavailable"), lost
        net.proxies["psp_a"].down()
        unreachable = send(net, shop, "POST", path, {"amount": 600}, key)
        assert (unreachable.status, unreachable.code) == (503, "processor_unavailable"), unreachable
        net.proxies["psp_a"].heal()
        retried = send(net, shop, "POST", path, {"amount": 600}, key)
    assert retried.status in (200, 201), retried
    payment = payment_of(net, shop, payment_id)
    [record] = authorizations_at(net.psp_a, "psp_a", payment["attempts"][0]["reference"])
    if operation == "capture":
        assert (payment["amount_captured"], record["amount_captured"]) == (600, 600)
    else:
        assert (payment["amount_refunded"], record["amount_refunded"]) == (600, 600)
        assert [(r["id"], r["status"]) for r in payment["refunds"]] == [
            (retried.body["id"], "succeeded")
        ]


@pytest.mark.parametrize("operation", ["capture", "refund"])
def test_a_psp_b_confirmation_that_arrives_before_its_operation_is_recorded_is_not_lost(
    operation: str, net: NetworkStack, shop_b: ApiMerchant
) -> None:
    """PSP B confirms a capture (refund) by a notification 200 ms after it received it. With
    the database slow, the API has not yet recorded that it waits for one when it comes: the
    notification must not be swallowed (it once was, acknowledged with nothing to apply: the
    operation stayed pending for ever, the ledger never booked it). PSP B sends it again."""
    token = tokenize(net.vault, shop_b)
    authorized = authorize(net, shop_b, new_key(), token, capture=operation == "refund")
    assert authorized.status == 201, authorized
    payment_id = authorized.body["id"]
    if operation == "refund":
        wait_for(lambda: events_of(net, shop_b, payment_id, "payment.captured") == 1, 15)
    time.sleep(0.5)  # the authorization's own notification is in, the database is quiet
    confirmed = "payment.captured" if operation == "capture" else "refund.succeeded"
    before = events_of(net, shop_b, payment_id, confirmed)
    path = f"/v1/payments/{payment_id}/{'capture' if operation == 'capture' else 'refunds'}"
    net.proxies["postgres"].latency(150, stream="downstream")  # each round trip + 150 ms
    answer = send(net, shop_b, "POST", path, {"amount": 500}, new_key())
    net.proxies["postgres"].heal()
    assert answer.status in (200, 201), answer
    wait_for(lambda: events_of(net, shop_b, payment_id, confirmed) == before + 1, 20)
    payment = payment_of(net, shop_b, payment_id)
    if operation == "refund":
        assert [r["status"] for r in payment["refunds"]] == ["succeeded"], payment
    else:
        assert payment["amount_captured"] == 500, payment


def events_of(net: NetworkStack, merchant: ApiMerchant, object_id: str, event_type: str) -> int:
    """How many `event_type` events the API published about `object_id` (a payment)."""
    body = send(net, merchant, "GET", f"/v1/events?type={event_type}&limit=100").body
    return sum(1 for event in body["data"] if payment_in(event) == object_id)


def payment_in(event: dict[str, Any]) -> str | None:
    obj = event.get("data", {}).get("object", {})
    found = obj.get("payment") or obj.get("id")
    return str(found) if found else None


# --- a load while faults come and go -------------------------------------------------------

FAULTS_UNDER_LOAD = ("timeout", "reset", "down") + (("latency", "limit") if FULL else ())


def test_a_load_under_network_faults_keeps_every_payment_whole(
    net: NetworkStack, shop: ApiMerchant, tokens: dict[str, str]
) -> None:
    """Authorizations, captures, cancels and refunds from concurrent clients retrying with their
    keys, while every hop in turn times out, resets or goes down (and heals): afterwards the
    history checker finds every `ok` applied once, every `failed` never, every `unknown` at most
    once, the PSPs agreeing with Tessera and the ledger balanced; no answer was a 500."""
    load_shop = create_merchant(net.direct_env, net.vault, tokens["admin"], "Network load")
    configure_routing(net.direct_env, load_shop, "--processors", "psp_a,psp_b")
    numbers = [APPROVED, "5555555555554444", "4000000000000002"]
    history = History()
    workload = Workload(
        net.api.url,
        load_shop.auth,
        [tokenize(net.vault, load_shop, n) for n in numbers],
        history,
        concurrency=4,
        give_up_seconds=20,
        seed=9,
    )
    schedule = list(itertools.product(net.proxies, FAULTS_UNDER_LOAD))
    random.Random(3).shuffle(schedule)
    injected: list[str] = []
    stop = threading.Event()

    def inject() -> None:
        for hop, fault in itertools.cycle(schedule):
            if stop.wait(0.6):
                return
            arm(net.proxies[hop], fault)
            injected.append(f"{hop}-{fault}")
            stop.wait(0.9)
            net.proxies[hop].heal()

    injector = threading.Thread(target=inject, daemon=True)
    workload.run_in_background()
    injector.start()
    time.sleep(LOAD_SECONDS)
    stop.set()
    injector.join(10)
    net.heal_all()
    workload.stop()
    assert not workload.errors, workload.errors
    sources = Sources(
        api_url=net.api.url,
        auth=load_shop.auth,
        merchant_id=load_shop.id,
        api_database_url=net.direct_env["TESSERA_API_DATABASE_URL"],
        psp_a_url=net.psp_a.url,
        psp_b_url=net.psp_b.url,
    )
    result = check(history, sources, settle_seconds=60)
    result.print(f"network faults, {LOAD_SECONDS:.0f} s, {len(injected)} faults injected")
    assert result.ok, result.summary()
    assert len(history.operations) >= 10
    assert "500" not in result.answers, result.answers
    for hop in net.proxies:
        assert_no_leaks(net, hop)


def test_every_payment_of_the_campaign_settles_as_the_psps_hold_it(
    net: NetworkStack, shop: ApiMerchant, shop_b: ApiMerchant
) -> None:
    """What the faults above left unknown, the worker settled from the PSPs' records: nothing is
    `processing`, an approved payment has exactly one authorization at the PSPs, a failed or
    declined one none, and no two payments share a key."""

    def unsettled() -> list[str]:
        return [
            p["id"]
            for merchant in (shop, shop_b)
            for p in list_payments(net, merchant)
            if p["status"] == "processing"
        ]

    deadline = time.monotonic() + 30
    while unsettled() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not unsettled()
    for merchant in (shop, shop_b):
        payments = list_payments(net, merchant)
        references = [p["reference"] for p in payments if p["reference"]]
        assert len(references) == len(set(references))
        for payment in payments:
            approved = payment["status"] not in ("declined", "failed")
            assert approved_at_psp(net, payment) == (1 if approved else 0), payment


def test_no_card_number_reached_a_log_of_the_campaign(net: NetworkStack) -> None:
    """Through every fault above, no card number or CVC reached the API's or vault's logs."""
    pan = re.compile(r"(?<!\d)(?:4242424242424242|5555555555554444|4000000000000002)(?!\d)")
    for process in (net.api, net.vault, net.worker):
        text = Path(process.log_path).read_text(errors="replace")
        assert not pan.search(text), process.log_path
