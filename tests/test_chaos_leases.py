"""Campaign 4 (issue 9), the paused lock holder: a process frozen (SIGSTOP) while it holds a
lease, until the lease expired and another process took the work over; then it goes on.

Tessera keeps no locks in Redis (`grep -rn redis api vault tessera`: a replay cache, the
router's windows, the breakers, the vault's CVCs); the locks that decide are Postgres leases: an
idempotency key's `locked_until`, which a client's retry or the worker's completer takes over
once it has run out. The frozen process is made to stop itself at a chosen point
(`TESSERA_FAILPOINTS=<point>:stop`), so the pause falls exactly where a late write would do
harm; the test sends SIGCONT once the key was taken over and finished. Postgres decides: the
late process must write nothing and answer with what the other recorded (fencing: every taker
of a key gets its own lease, checked before each write).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import create_merchant, start_service
from tests.support.payments import configure_routing, pay, tokenize
from tests.support.processes import ServiceProcess

#: The frozen process's lease on its key (and the worker's): short, so the test waits little.
LEASE_SECONDS = 7  # the shortest the settings allow with a 1 s processor time-out
SHORT_LEASE = {
    "TESSERA_API_IDEMPOTENCY_LEASE_SECONDS": str(LEASE_SECONDS),
    "TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": "1",
}


@pytest.fixture(scope="module")
def frozen_api(
    api_env: dict[str, str], vault: ServiceProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """A second API process on the session's databases that stops itself (SIGSTOP) at either
    failpoint: after an operation's processor call, and before a payment fails over."""
    extra = {
        "TESSERA_API_VAULT_URL": vault.url,
        "TESSERA_FAILPOINTS": "after_operation_call:stop,before_failover:stop",
        **SHORT_LEASE,
    }
    process = start_service("api", api_env, tmp_path_factory.mktemp("frozen-api"), extra)
    yield process
    assert process.process is not None
    process.process.send_signal(signal.SIGCONT)  # a stopped process cannot see SIGTERM
    process.stop()


def test_a_frozen_capture_is_fenced_off_after_its_lease(
    api: ServiceProcess,
    api_env: dict[str, str],
    vault: ServiceProcess,
    tokens: dict[str, str],
    frozen_api: ServiceProcess,
    workers: Callable[..., ServiceProcess],
) -> None:
    """The capture's process freezes after PSP A captured, before it records that. Its lease
    runs out; the worker's completer takes the key over, asks PSP A again (captures are
    idempotent there) and records the capture. Then the frozen process goes on: it must not
    book the capture a second time (ledger postings, event) and answers the recorded capture."""
    merchant = create_merchant(api_env, vault, tokens["admin"], "Frozen capture")
    authorized = pay(api, vault, merchant, amount=4200, capture=False)
    assert authorized.status_code == 201, authorized.text
    payment_id = authorized.json()["id"]
    frozen = frozen_api
    late = _in_background(
        lambda: httpx.post(
            f"{frozen.url}/v1/payments/{payment_id}/capture",
            headers={**merchant.auth, "idempotency-key": "frozen-capture"},
            timeout=90,
        )
    )
    try:
        _wait_until_stopped(frozen)
        workers(**SHORT_LEASE)
        _wait_for(lambda: _key_finished(api_env, "frozen-capture"), LEASE_SECONDS + 20, "takeover")
    finally:
        _resume(frozen)
    answer = late()

    postings = _counts(
        api_env,
        "SELECT kind, count(*) FROM ledger_postings WHERE payment_id = $1 GROUP BY kind",
        payment_id,
    )
    events = _counts(
        api_env, "SELECT type, count(*) FROM events WHERE object_id = $1 GROUP BY type", payment_id
    )
    print(f"frozen capture: late answer {answer.status_code}, postings {postings}, events {events}")
    assert postings == {"authorization": 1, "release": 1, "capture": 1}
    assert events == {"payment.authorized": 1, "payment.captured": 1}
    assert answer.status_code == 200, answer.text
    assert answer.headers.get("idempotent-replayed") == "true"
    assert answer.json()["amount_captured"] == 4200


def test_a_frozen_authorization_does_not_fail_over_after_its_lease(
    api: ServiceProcess,
    api_env: dict[str, str],
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    tokens: dict[str, str],
    frozen_api: ServiceProcess,
) -> None:
    """The payment's process freezes after PSP A failed (a definite failure: its next step
    would be PSP B). PSP A recovers, the lease runs out, and the client's retry takes the key
    over: PSP A approves. Then the frozen process goes on: failing over to PSP B now would
    authorize the card a second time. It must write nothing and answer the recorded payment."""
    merchant = create_merchant(api_env, vault, tokens["admin"], "Frozen failover")
    # PSP B's fee makes PSP A the router's first choice every time.
    configure_routing(api_env, merchant, "--processors", "psp_a,psp_b", "--fee", "psp_b=0+9000")
    token = tokenize(vault, merchant)
    body = {"amount": 5100, "currency": "EUR", "token": token}
    headers = {**merchant.auth, "idempotency-key": "frozen-pay"}
    frozen = frozen_api
    _psp_a_fails(psp_a, True)
    try:
        late = _in_background(
            lambda: httpx.post(f"{frozen.url}/v1/payments", json=body, headers=headers, timeout=90)
        )
        _wait_until_stopped(frozen)
        _psp_a_fails(psp_a, False)
        retried = _retry_until_answered(api.url + "/v1/payments", body, headers)
    finally:
        _psp_a_fails(psp_a, False)
        _resume(frozen)
    answer = late()

    payment_id = retried.json()["id"]
    approvals = _approvals(psp_a, psp_b, payment_id)
    payment = httpx.get(f"{api.url}/v1/payments/{payment_id}", headers=merchant.auth).json()
    print(
        f"frozen failover: retry {retried.status_code}, late answer {answer.status_code}, "
        f"approvals {approvals}, attempts {[a['processor'] for a in payment['attempts']]}"
    )
    assert retried.status_code == 201, retried.text
    assert approvals == {"psp_a": 1, "psp_b": 0}, "the card was authorized twice"
    assert [a["processor"] for a in payment["attempts"]] == ["psp_a"]
    assert payment["status"] == "captured"
    assert answer.status_code == 201, answer.text
    assert answer.headers.get("idempotent-replayed") == "true"
    assert answer.json()["id"] == payment_id


# --- helpers ---------------------------------------------------------------------------------


def _resume(process: ServiceProcess) -> None:
    assert process.process is not None
    process.process.send_signal(signal.SIGCONT)


def _psp_a_fails(psp_a: ServiceProcess, failing: bool) -> None:
    httpx.post(psp_a.url + "/admin/config", json={"fail_all_5xx": failing}).raise_for_status()


def _wait_until_stopped(process: ServiceProcess, seconds: float = 30) -> None:
    """Until the process stopped itself at its failpoint (state T in /proc)."""
    assert process.process is not None
    stat = Path(f"/proc/{process.process.pid}/stat")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.05)
    raise AssertionError(f"the API did not reach its failpoint:\n{process.output()[-3000:]}")


def _in_background(call: Callable[[], httpx.Response]) -> Callable[[], httpx.Response]:
    """Send a request from a thread; the returned function waits for its answer."""
    answer: list[httpx.Response | BaseException] = []

    def run() -> None:
        try:
            answer.append(call())
        except BaseException as exc:
            answer.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> httpx.Response:
        thread.join(90)
        assert answer, "the frozen request never answered"
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return answer[0]

    return result


def _retry_until_answered(
    url: str, body: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    """A client's retries with the same key while the frozen process holds it (409 in use)."""
    deadline = time.monotonic() + LEASE_SECONDS + 30
    while time.monotonic() < deadline:
        response = httpx.post(url, json=body, headers=headers, timeout=30)
        if response.status_code not in (409, 503):
            return response
        time.sleep(0.5)
    raise AssertionError("the retry never got past the frozen process's lease")


def _rows(api_env: dict[str, str], query: str, *args: Any) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(api_env["TESSERA_API_DATABASE_URL"])
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def _counts(api_env: dict[str, str], query: str, *args: Any) -> dict[str, int]:
    return {row[0]: row[1] for row in _rows(api_env, query, *args)}


def _key_finished(api_env: dict[str, str], key: str) -> bool:
    rows = _rows(api_env, "SELECT recovery_point FROM idempotency_keys WHERE key = $1", key)
    return bool(rows) and rows[0]["recovery_point"] == "finished"


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"the {what} did not happen in {seconds} s")


def _approvals(psp_a: ServiceProcess, psp_b: ServiceProcess, payment_id: str) -> dict[str, int]:
    """Authorizations each simulator holds for the payment's references."""
    auths = httpx.get(psp_a.url + "/admin/authorizations").json()["authorizations"]
    body = httpx.get(psp_b.url + "/admin/payments").json()
    payments = body["payments"] if isinstance(body, dict) else body
    return {
        "psp_a": sum(
            1
            for a in auths
            if a["reference"].startswith(payment_id) and a["status"] in ("approved", "captured")
        ),
        "psp_b": sum(
            1
            for p in payments
            if p["merchantReference"].startswith(payment_id) and p["resultCode"] == "Authorised"
        ),
    }
