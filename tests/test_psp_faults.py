"""Fault injection in both PSP simulators, against real `python -m sandbox.psp_a` and
`python -m sandbox.psp_b` processes: every test runs once per simulator.

`POST /admin/config` stages an outage at run time: `fail_all_5xx`, `timeout_rate` with
`timeout_seconds`, `latency_ms`/`jitter_ms`, `approval_rate` per brand and the `seed` that makes
the random ones reproducible. One process per simulator serves the module; each test gets its
simulator back with every fault off (`sim` fixture). The two protocols differ, so `Sim` adapts:
a payment, its outcome in one vocabulary (`approved`, `declined:<code>`), the inquiry.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from sandbox.psp_a import FAULT_FIELDS
from tests.support.processes import ServiceProcess, free_port

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"
INSUFFICIENT_FUNDS = "4000000000009995"
NEXT_YEAR = time.gmtime().tm_year + 1
NO_FAULTS: dict[str, Any] = {
    "fail_all_5xx": False,
    "timeout_rate": 0,
    "timeout_seconds": 30,
    "approval_rate": {},
    "seed": None,
    "latency_ms": 0,
    "jitter_ms": 0,
}
#: PSP B's refusal reasons in PSP A's decline codes.
REASONS = {
    "Do Not Honor": "do_not_honor",
    "Not enough balance": "insufficient_funds",
    "Expired Card": "expired_card",
    "CVC Declined": "incorrect_cvc",
}


def reference() -> str:
    return f"ref_{secrets.token_hex(8)}"


@dataclass
class Sim:
    """One simulator process and what differs between the two protocols."""

    name: str
    process: ServiceProcess
    key: str
    #: Keyless, for /healthz and /admin (one client: a new one per request costs milliseconds).
    admin: httpx.Client

    @property
    def headers(self) -> dict[str, str]:
        if self.name == "psp_a":
            return {"authorization": f"Bearer {self.key}"}
        return {"x-api-key": self.key}

    @property
    def payments_path(self) -> str:
        return "/v1/authorizations" if self.name == "psp_a" else "/v1/payments"

    @property
    def config_error_status(self) -> int:
        return 400 if self.name == "psp_a" else 422

    def client(self, timeout: float = 10) -> httpx.Client:
        return httpx.Client(base_url=self.process.url, headers=self.headers, timeout=timeout)

    def async_client(self, timeout: float = 10) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.process.url, headers=self.headers, timeout=timeout)

    def body(self, number: str = VISA, ref: str | None = None) -> dict[str, Any]:
        ref = ref or reference()
        if self.name == "psp_a":
            return {
                "reference": ref,
                "amount": 1000,
                "currency": "EUR",
                "capture": False,
                "card": {"number": number, "exp_month": 12, "exp_year": NEXT_YEAR},
            }
        return {
            "merchantReference": ref,
            "amount": {"value": 1000, "currency": "EUR"},
            "paymentMethod": {"number": number, "expiryMonth": 12, "expiryYear": NEXT_YEAR},
        }

    @staticmethod
    def reference_of(body: dict[str, Any]) -> str:
        ref: str = body.get("reference") or body["merchantReference"]
        return ref

    def outcome(self, response: httpx.Response) -> str:
        """`approved` or `declined:<code>`, whichever simulator answered."""
        assert response.status_code in (200, 201), response.text
        answer = response.json()
        if self.name == "psp_a":
            if answer["status"] == "declined":
                return f"declined:{answer['decline_code']}"
            assert answer["status"] == "approved"
            return "approved"
        if answer["resultCode"] == "Refused":
            return f"declined:{REASONS[answer['refusalReason']]}"
        assert answer["resultCode"] == "Authorised"
        return "approved"

    def pay(self, http: httpx.Client, number: str = VISA, ref: str | None = None) -> httpx.Response:
        return http.post(self.payments_path, json=self.body(number, ref))

    def inquire(self, http: httpx.Client, ref: str) -> httpx.Response:
        name = "reference" if self.name == "psp_a" else "merchantReference"
        return http.get(self.payments_path, params={name: ref})

    def recorded(self, ref: str) -> list[dict[str, Any]]:
        if self.name == "psp_a":
            path, name, key = "/admin/authorizations", "reference", "authorizations"
        else:
            path, name, key = "/admin/payments", "merchantReference", "payments"
        response = self.admin.get(path, params={name: ref})
        found: list[dict[str, Any]] = response.json()[key]
        return found

    @staticmethod
    def error_code(response: httpx.Response) -> str:
        body = response.json()
        code: str = body["error"]["code"] if "error" in body else body["errorCode"]
        return code

    def configure(self, **changes: Any) -> dict[str, Any]:
        response = self.admin.post("/admin/config", json=changes)
        assert response.status_code == 200, response.text
        config: dict[str, Any] = response.json()
        return config

    def injected(self) -> dict[str, int]:
        stats = self.admin.get("/admin/stats").json()
        counts: dict[str, int] = stats.get("injected", {"errors": 0, "timeouts": 0, "declines": 0})
        return counts


@pytest.fixture(scope="module")
def simulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sim]]:
    logs = tmp_path_factory.mktemp("psp_faults")
    sims: dict[str, Sim] = {}
    try:
        for name in ("psp_a", "psp_b"):
            port, key, prefix = free_port(), f"{name}_{secrets.token_hex(12)}", name.upper()
            env = {
                f"TESSERA_{prefix}_HOST": "127.0.0.1",
                f"TESSERA_{prefix}_PORT": str(port),
                f"TESSERA_{prefix}_API_KEY": key,
                f"TESSERA_{prefix}_LATENCY_MS": "0",
                f"TESSERA_{prefix}_JITTER_MS": "0",
            }
            process = ServiceProcess(f"sandbox.{name}", env, port, logs / f"{name}.log", args=[])
            admin = httpx.Client(base_url=process.url, timeout=10)
            sims[name] = Sim(name, process.start(ready_path="/healthz"), key, admin)
        yield sims
    finally:
        for sim in sims.values():
            sim.admin.close()
            sim.process.stop()


@pytest.fixture(params=["psp_a", "psp_b"])
def sim(request: pytest.FixtureRequest, simulators: dict[str, Sim]) -> Iterator[Sim]:
    """Each simulator in turn; every fault is off again afterwards."""
    chosen = simulators[request.param]
    yield chosen
    chosen.configure(**NO_FAULTS)


# --- fail_all_5xx ------------------------------------------------------------------------------


def test_fail_all_5xx_answers_every_v1_request_500_without_processing_it(sim: Sim) -> None:
    before = sim.injected()["errors"]
    assert sim.configure(fail_all_5xx=True)["fail_all_5xx"] is True
    with sim.client() as http:
        ref = reference()
        response = sim.pay(http, ref=ref)
        assert (response.status_code, sim.error_code(response)) == (500, "processing_error")
        assert sim.recorded(ref) == [], "nothing processed, nothing recorded"
        inquiry = sim.inquire(http, ref)
        assert (inquiry.status_code, sim.error_code(inquiry)) == (500, "processing_error")
        assert sim.admin.get("/healthz").status_code == 200
        assert sim.admin.get("/admin/stats").status_code == 200
        assert sim.injected()["errors"] == before + 2

        sim.configure(fail_all_5xx=False)
        assert sim.outcome(sim.pay(http, ref=ref)) == "approved", "the reference stayed free"


def test_fail_all_5xx_still_refuses_a_wrong_key_first(sim: Sim) -> None:
    sim.configure(fail_all_5xx=True)
    response = httpx.post(sim.process.url + sim.payments_path, json=sim.body())
    assert (response.status_code, sim.error_code(response)) == (401, "unauthorized")


def test_fail_all_5xx_waits_the_configured_latency_first(sim: Sim) -> None:
    sim.configure(fail_all_5xx=True, latency_ms=150)
    with sim.client() as http:
        started = time.monotonic()
        assert sim.pay(http).status_code == 500
        assert time.monotonic() - started >= 0.15


# --- timeout_rate --------------------------------------------------------------------------------


async def test_a_timed_out_authorization_is_recorded_before_its_answer_is_held(sim: Sim) -> None:
    sim.configure(timeout_rate=1, timeout_seconds=0.6)
    body = sim.body()
    async with sim.async_client() as http:
        started = time.monotonic()
        pending = asyncio.create_task(http.post(sim.payments_path, json=body))
        await asyncio.sleep(0.25)
        [stored] = sim.recorded(sim.reference_of(body))
        assert not pending.done()
        response = await pending
        elapsed = time.monotonic() - started
    assert elapsed >= 0.6
    assert sim.outcome(response) == "approved", "the held answer is the real one"
    assert sim.recorded(sim.reference_of(body)) == [stored]
    assert sim.injected()["timeouts"] >= 1


def test_a_client_that_gives_up_has_an_unknown_outcome_the_inquiry_settles(sim: Sim) -> None:
    sim.configure(timeout_rate=1, timeout_seconds=1.0)
    ref = reference()
    with sim.client(timeout=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
        sim.pay(impatient, ref=ref)
    sim.configure(timeout_rate=0)
    with sim.client() as http:
        inquiry = sim.inquire(http, ref)
        assert inquiry.status_code == 200
        assert sim.outcome(inquiry) == "approved"
        assert sim.outcome(sim.pay(http, ref=ref)) == "approved", "a retry replays it"
    assert len(sim.recorded(ref)) == 1


def test_time_outs_hold_v1_answers_of_every_kind_but_never_health_or_admin(sim: Sim) -> None:
    sim.configure(timeout_rate=1, timeout_seconds=0.3)
    with sim.client() as http:
        started = time.monotonic()
        unknown = sim.inquire(http, reference())
        assert time.monotonic() - started >= 0.3
        assert (unknown.status_code, sim.error_code(unknown)) == (404, "not_found")
        started = time.monotonic()
        keyless = sim.admin.get(sim.payments_path)
        assert time.monotonic() - started >= 0.3
        assert (keyless.status_code, sim.error_code(keyless)) == (401, "unauthorized")
        started = time.monotonic()
        sim.admin.get("/healthz")
        sim.admin.get("/admin/stats")
        sim.admin.get("/admin/config")
        assert time.monotonic() - started < 0.3


def test_the_timeout_rate_holds_that_fraction_reproducibly_with_a_seed(sim: Sim) -> None:
    # timeout_seconds 0: a chosen request is counted but not held, so the draws can be read fast.
    sim.configure(timeout_rate=0.4, timeout_seconds=0, seed=7)

    def pattern() -> list[int]:
        held = []
        with sim.client() as http:
            for _ in range(40):
                before = sim.injected()["timeouts"]
                sim.inquire(http, "nothing")
                held.append(sim.injected()["timeouts"] - before)
        return held

    first = pattern()
    assert 5 <= sum(first) <= 30
    sim.configure(seed=7)
    assert pattern() == first, "the same seed gives the same requests"
    sim.configure(seed=8)
    assert pattern() != first


# --- latency -----------------------------------------------------------------------------------


def test_latency_delays_every_v1_request_but_not_admin(sim: Sim) -> None:
    sim.configure(latency_ms=200, jitter_ms=20)
    with sim.client() as http:
        started = time.monotonic()
        sim.pay(http)
        assert time.monotonic() - started >= 0.18
        started = time.monotonic()
        sim.inquire(http, reference())
        assert time.monotonic() - started >= 0.18
    started = time.monotonic()
    sim.admin.get("/admin/stats")
    assert time.monotonic() - started < 0.18


# --- approval_rate -------------------------------------------------------------------------------


def test_an_approval_rate_of_zero_declines_every_approval_of_that_brand_only(sim: Sim) -> None:
    before = sim.injected()["declines"]
    sim.configure(approval_rate={"visa": 0})
    with sim.client() as http:
        assert [sim.outcome(sim.pay(http, VISA)) for _ in range(3)] == ["declined:do_not_honor"] * 3
        assert sim.outcome(sim.pay(http, MASTERCARD)) == "approved"
        assert sim.outcome(sim.pay(http, INSUFFICIENT_FUNDS)) == "declined:insufficient_funds"
    assert sim.injected()["declines"] == before + 3
    sim.configure(approval_rate={"visa": 1})
    with sim.client() as http:
        assert sim.outcome(sim.pay(http, VISA)) == "approved"


def test_an_approval_rate_with_a_seed_gives_the_same_outcomes_again(sim: Sim) -> None:
    sim.configure(approval_rate={"mastercard": 0.5}, seed=42)

    def outcomes() -> list[str]:
        with sim.client() as http:
            return [sim.outcome(sim.pay(http, MASTERCARD)) for _ in range(30)]

    first = outcomes()
    assert set(first) == {"approved", "declined:do_not_honor"}
    assert 5 <= first.count("approved") <= 25
    sim.configure(seed=42)
    assert outcomes() == first, "setting the seed restarts the sequence"
    assert sim.admin.post("/admin/reset").status_code == 200
    assert outcomes() == first, "so does a reset (the config, seed included, stays)"


def test_a_replay_is_not_drawn_again(sim: Sim) -> None:
    sim.configure(approval_rate={"visa": 0.5}, seed=3)
    with sim.client() as http:
        refs = [reference() for _ in range(6)]
        first = [sim.outcome(sim.pay(http, ref=ref)) for ref in refs]
        again = [sim.outcome(sim.pay(http, ref=ref)) for ref in refs]
    assert again == first
    assert all(len(sim.recorded(ref)) == 1 for ref in refs)


# --- the config endpoint -----------------------------------------------------------------------


def test_the_config_lists_the_fault_fields_that_are_set_and_all_of_them_on_request(
    sim: Sim,
) -> None:
    plain = sim.admin.get("/admin/config").json()
    assert not set(plain) & set(FAULT_FIELDS), "an unfaulted simulator's config reads as before"
    changed = sim.configure(timeout_rate=0.25, approval_rate={"amex": 0.9})
    assert changed == {**plain, "timeout_rate": 0.25, "approval_rate": {"amex": 0.9}}
    replaced = sim.configure(approval_rate={"jcb": 0.1})
    assert replaced["approval_rate"] == {"jcb": 0.1}, "the map is replaced, not merged"
    full = sim.admin.get("/admin/config", params={"all": "true"}).json()
    assert full == {
        **plain,
        "fail_all_5xx": False,
        "timeout_rate": 0.25,
        "timeout_seconds": 30,
        "approval_rate": {"jcb": 0.1},
        "seed": None,
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"fail_all_5xx": "yes"},
        {"timeout_rate": 1.5},
        {"timeout_rate": -0.1},
        {"timeout_seconds": -1},
        {"timeout_seconds": 7200},
        {"approval_rate": {"visa": 2}},
        {"approval_rate": {"maestro": 0.5}},
        {"approval_rate": 0.5},
        {"seed": "x"},
        {"timeout_rate": 0.5, "refuse_connections": True},
    ],
    ids=str,
)
def test_a_bad_fault_setting_is_refused_and_nothing_changes(sim: Sim, bad: dict[str, Any]) -> None:
    before = sim.admin.get("/admin/config", params={"all": "1"}).json()
    response = sim.admin.post("/admin/config", json=bad)
    assert response.status_code == sim.config_error_status, response.text
    assert sim.admin.get("/admin/config", params={"all": "1"}).json() == before
