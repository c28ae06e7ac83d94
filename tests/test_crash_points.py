"""Issue 9, campaign 1: a crash at every step of authorize, capture and refund.

Each case arms one failpoint (`tessera/runtime/failpoints.py`) in a fresh API (or worker)
process, sends it one request and watches it SIGKILL itself at that point; an unarmed API then
gets the client's retry with the same Idempotency-Key until it answers for good. For every case:

- the process died by SIGKILL at the named point (a misspelt or unreachable point fails);
- at a COMMIT point, `pg_xact_status` of the transaction it died in decides what must be in the
  database: committed, the transaction's write is there; aborted, it is not;
- the PSP simulator holds exactly one authorization for the payment (scanning all of them by the
  case's own amount), and exactly one capture or refund of the right amount;
- exactly one settled outcome: the retry's answer is what a later replay returns, byte for byte,
  and what Postgres stored for the key; the payment's state and its one settling event agree;
- no key is left stuck: it ends `finished`, and the ledger check finds every payment balanced.

Cases run side by side, in API databases of their own (a worker's cases one database each, since
a worker takes whatever it finds): each case waits out an 8 s lease, and starting a process is
what costs. `TESSERA_CRASH_MATRIX=full` (`make crash`) walks every point with capture, refund and
cancel on both processors and more worker points; the default covers every point once.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest

from api.services.ledger import LedgerReport
from api.services.routing import Fee, ProcessorFees, RoutingConfig
from tests.conftest import ApiMerchant
from tests.support.crash_lab import LEASE_SECONDS, Lab, post, thread_client
from tests.support.payments import APPROVED, SLOW, new_key, tokenize
from tests.support.processes import ServiceProcess
from tests.support.warm_start import WarmProcess

FULL = os.environ.get("TESSERA_CRASH_MATRIX", "") == "full"
#: Cases preparing their payment at once (so a busy survivor never times the preparation out).
PREPARING = threading.BoundedSemaphore(3)

AUTHORIZE_POINTS = (
    "authorize_key_claimed",
    "authorize_attempt_written",
    "authorize_start_before_commit",
    "authorize_start_during_commit",
    "authorize_start_after_commit",
    "after_processor_call",
    "authorize_record_before_commit",
    "authorize_record_during_commit",
    "authorize_record_after_commit",
    "authorize_before_response",
)
OPERATION_POINTS = (
    "operation_key_claimed",
    "operation_state_written",
    "operation_start_before_commit",
    "operation_start_during_commit",
    "operation_start_after_commit",
    "after_operation_call",
    "operation_record_before_commit",
    "operation_record_during_commit",
    "operation_record_after_commit",
    "operation_before_response",
)
#: What a transaction's write leaves behind, committed or aborted: (probe, committed, aborted).
COMMIT_PROBES = {
    "authorize_start": ("key", "payment_created", "none"),
    "authorize_record": ("key", "finished", "payment_created"),
    "authorize_failover": ("attempts", "2", "1"),
    "operation_start": ("key", "operation_started", "none"),
    "operation_record": ("key", "finished", "operation_started"),
    "reconcile_record": ("status", "settled", "processing"),
}
#: The key's state at a death outside any COMMIT point.
LEFT_AT = {
    "authorize_key_claimed": "none",
    "authorize_attempt_written": "none",
    "after_processor_call": "payment_created",
    "authorize_before_response": "finished",
    "operation_key_claimed": "none",
    "operation_state_written": "none",
    "after_operation_call": "operation_started",
    "operation_before_response": "finished",
    "reconcile_after_inquiry": "finished",
}
SETTLING_EVENT = {
    "authorize": "payment.captured",
    "capture": "payment.captured",
    "refund": "refund.succeeded",
    "cancel": "payment.canceled",
}
FAILOVER_CARD = "4000000000000119"  # PSP A fails it without processing, PSP B approves it


@dataclass(frozen=True)
class Case:
    """One crash: `api_point` kills the API serving the request, then `worker_point` kills
    the worker that picks up what it left (either may be None)."""

    operation: str
    api_point: str | None
    worker_point: str | None = None
    processor: str = "psp_a"
    card: str = APPROVED

    @property
    def name(self) -> str:
        parts = [self.operation, self.api_point or "answered"]
        if self.worker_point:
            parts.append(f"worker@{self.worker_point}")
        if self.processor != "psp_a":
            parts.append(self.processor)
        return "-".join(parts)

    @property
    def merchant_kind(self) -> str:
        return "failover" if self.card == FAILOVER_CARD else self.processor


def _cases() -> list[Case]:
    cases = [Case("authorize", point) for point in AUTHORIZE_POINTS]
    cases += [
        Case("authorize", f"authorize_failover_{when}_commit", card=FAILOVER_CARD)
        for when in (("before", "during", "after") if FULL else ("during",))
    ]
    if FULL:
        for operation in ("capture", "refund", "cancel"):
            cases += [Case(operation, point) for point in OPERATION_POINTS]
        cases += [Case("authorize", point, processor="psp_b") for point in AUTHORIZE_POINTS]
        for operation in ("capture", "refund", "cancel"):
            cases += [Case(operation, p, processor="psp_b") for p in OPERATION_POINTS]
    else:  # each operation point once, capture and refund taking turns
        cases += [
            Case("capture" if i % 2 == 0 else "refund", point)
            for i, point in enumerate(OPERATION_POINTS)
        ]
        cases += [
            Case(operation, point, processor="psp_b")
            for operation, point in (
                ("capture", "after_operation_call"),
                ("refund", "operation_record_before_commit"),
            )
        ]
    worker_cases = [
        Case("authorize", None, "reconcile_record_before_commit", card=SLOW),
        Case("authorize", "authorize_start_after_commit", "after_processor_call"),
        Case("refund", "operation_start_after_commit", "operation_record_during_commit"),
    ]
    if FULL:
        worker_cases += [
            Case("authorize", None, "reconcile_after_inquiry", card=SLOW),
            Case("authorize", None, "reconcile_record_during_commit", card=SLOW),
            Case("authorize", None, "reconcile_record_after_commit", card=SLOW),
            Case("authorize", "after_processor_call", "authorize_record_before_commit"),
            Case("authorize", "authorize_start_during_commit", "authorize_before_response"),
            Case("capture", "after_operation_call", "after_operation_call"),
            Case("capture", "operation_start_after_commit", "operation_record_after_commit"),
            Case("refund", "after_operation_call", "operation_record_before_commit"),
        ]
    return cases + worker_cases


#: `TESSERA_CRASH_ONLY=refund` runs only the cases whose name contains it (when debugging).
CASES = [c for c in _cases() if os.environ.get("TESSERA_CRASH_ONLY", "") in c.name]


@dataclass
class Report:
    """What one case saw; `problems` lists every guarantee it found broken."""

    case: Case
    deaths: list[str] = field(default_factory=list)
    retries: Counter[int] = field(default_factory=Counter)
    answer: str = ""
    final: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


# --- one case -------------------------------------------------------------------------------


def _died_at(process: WarmProcess, point: str, report: Report) -> str | None:
    """Wait for the armed process to die; check it died by SIGKILL at `point`; its xid."""
    code = process.exit_code(timeout=40)
    lines = [line for line in process.output().splitlines() if line.startswith('{"failpoint"')]
    said = json.loads(lines[-1]) if lines else {}
    report.check(code == -9, f"{point}: the process was not SIGKILLed there (exit {code})")
    report.check(said.get("failpoint") == point, f"{point}: the failpoint did not fire: {said}")
    xid = said.get("xid")
    return str(xid) if xid else None


def _expect_left(
    lab: Lab,
    point: str,
    xid: str | None,
    merchant: ApiMerchant,
    key: str,
    payment_id: str | None,
    report: Report,
) -> None:
    """What the death left in Postgres is what the point (and pg_xact_status) says it must."""
    transaction = point.rsplit("_", 2)[0]
    if transaction in COMMIT_PROBES:
        what, if_committed, if_aborted = COMMIT_PROBES[transaction]
        report.check(xid is not None, f"{point}: no transaction id was logged")
        status = lab.xact_status(xid) if xid else "unknown"
        if point.endswith("_before_commit"):
            report.check(status == "aborted", f"{point}: transaction {status}, not aborted")
        if point.endswith("_after_commit"):
            report.check(status == "committed", f"{point}: transaction {status}, not committed")
        expected = if_committed if status == "committed" else if_aborted
        found = lab.probe(what, merchant, key, payment_id)
        report.check(found == expected, f"{point}: xact {status}, {what} {found} != {expected}")
        report.deaths.append(f"{point} [xact {status}, {what} {found}]")
        return
    found = lab.key_state(merchant, key)
    report.check(found == LEFT_AT[point], f"{point}: key {found}, expected {LEFT_AT[point]}")
    report.deaths.append(f"{point} [key {found}]")


def _settle(
    lab: Lab, merchant: ApiMerchant, path: str, body: dict[str, Any] | None, key: str, r: Report
) -> httpx.Response:
    """The client's retries with the same key until an answer that is not "try again"."""
    assert lab.survivor is not None
    deadline = time.monotonic() + 4 * LEASE_SECONDS + 20
    while True:
        try:
            response = post(lab.survivor, merchant, path, body, key, timeout=20)
        except httpx.HTTPError:
            response = None
        if response is not None:
            r.retries[response.status_code] += 1
            busy = (
                response.status_code == 409
                and response.json()["error"]["code"] == "idempotency_key_in_use"
            )
            if not busy and response.status_code != 503:
                return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{r.case.name}: no settled answer in time: {r.retries}")
        time.sleep(0.5)


def _get(lab: Lab, merchant: ApiMerchant, path: str) -> Any:
    assert lab.survivor is not None
    response = thread_client().get(lab.survivor.url + path, headers=merchant.auth, timeout=10)
    response.raise_for_status()
    return response.json()


def _events(lab: Lab, merchant: ApiMerchant, object_id: str) -> list[str]:
    data = _get(lab, merchant, f"/v1/events?object={object_id}&limit=100")["data"]
    return [str(e["type"]) for e in data]


def _wait_for_event(lab: Lab, merchant: ApiMerchant, object_id: str, event: str) -> list[str]:
    """A PSP B operation settles by notification, a reconciled payment by the worker."""
    deadline = time.monotonic() + 20
    while True:
        events = _events(lab, merchant, object_id)
        if event in events or time.monotonic() > deadline:
            return events
        time.sleep(0.2)


@dataclass(frozen=True)
class Request:
    path: str
    body: dict[str, Any] | None
    payment_id: str | None
    amount: int
    moved: int  # what the operation moves: the capture's or refund's amount


def _prepare(lab: Lab, case: Case, merchant: ApiMerchant, amount: int) -> Request:
    """The request the case crashes in; an operation's payment is made first, unarmed."""
    assert lab.survivor is not None
    token = tokenize(lab.vault, merchant, case.card)
    pay = {"amount": amount, "currency": "EUR", "token": token}
    if case.operation == "authorize":
        return Request("/v1/payments", pay, None, amount, amount)
    pay["capture"] = case.operation == "refund"
    made = post(lab.survivor, merchant, "/v1/payments", pay)
    assert made.status_code == 201, made.text
    payment_id = made.json()["id"]
    action = "refunds" if case.operation == "refund" else case.operation
    path = f"/v1/payments/{payment_id}/{action}"
    if case.operation == "cancel":
        return Request(path, None, payment_id, amount, amount)
    moved = amount - 100 if case.operation == "capture" else 100
    return Request(path, {"amount": moved}, payment_id, amount, moved)


def run_case(lab: Lab, case: Case, amount: int) -> Report:
    report = Report(case)
    merchant = lab.merchants[case.merchant_kind]
    with PREPARING:
        request = _prepare(lab, case, merchant, amount)
    key = new_key()
    began = time.monotonic()
    first: httpx.Response | None = None
    if case.api_point is not None:
        armed = lab.start("api", case.api_point)
        try:
            first = post(armed, merchant, request.path, request.body, key, timeout=30)
        except httpx.HTTPError:
            first = None
        report.check(first is None, f"{case.api_point}: the armed API answered")
        xid = _died_at(armed, case.api_point, report)
        _expect_left(lab, case.api_point, xid, merchant, key, request.payment_id, report)
    else:  # the API answers (processing); the worker is the one to die
        assert lab.survivor is not None
        first = post(lab.survivor, merchant, request.path, request.body, key)
        report.check(first.status_code == 202, f"expected 202 processing: {first.text}")
    if case.worker_point is not None:
        worker = lab.start("worker", case.worker_point)
        xid = _died_at(worker, case.worker_point, report)
        _expect_left(lab, case.worker_point, xid, merchant, key, request.payment_id, report)
        if case.api_point is None:  # the reconciler's case: an unarmed worker settles it
            lab.start("worker")
    answer = _settle(lab, merchant, request.path, request.body, key, report)
    report.seconds = time.monotonic() - began
    _check_outcome(lab, case, merchant, key, request, answer, report)
    return report


def _check_outcome(
    lab: Lab,
    case: Case,
    merchant: ApiMerchant,
    key: str,
    request: Request,
    answer: httpx.Response,
    report: Report,
) -> None:
    name = case.name
    assert lab.survivor is not None
    replay = post(lab.survivor, merchant, request.path, request.body, key)
    report.check(
        (replay.status_code, replay.content) == (answer.status_code, answer.content),
        f"{name}: a later replay differs from the retry's answer",
    )
    report.check(replay.headers.get("idempotent-replayed") == "true", f"{name}: not replayed")
    stored = lab.stored_response(merchant, key)
    report.check(
        stored == (answer.status_code, answer.content),
        f"{name}: Postgres stored {stored and stored[0]} for the key, the client got "
        f"{answer.status_code}",
    )
    report.check(lab.key_state(merchant, key) == "finished", f"{name}: key left stuck")
    body = answer.json()
    expected_status = {"authorize": 202 if case.card == SLOW else 201, "refund": 201}
    report.check(
        answer.status_code == expected_status.get(case.operation, 200),
        f"{name}: answer {answer.status_code} {answer.text[:200]}",
    )
    payment_id = request.payment_id or body.get("id") or body.get("payment")
    if not isinstance(payment_id, str):
        report.problems.append(f"{name}: no payment in the answer")
        return
    settled_object = body["id"] if case.operation == "refund" else payment_id
    event = SETTLING_EVENT[case.operation]
    events = _wait_for_event(lab, merchant, settled_object, event)
    report.check(events.count(event) == 1, f"{name}: {events.count(event)} {event} events")
    payment = _get(lab, merchant, f"/v1/payments/{payment_id}")
    report.answer = f"{answer.status_code}"
    report.final = payment["status"]
    _check_payment(case, request, payment, report)


def _check_payment(case: Case, request: Request, payment: Any, report: Report) -> None:
    name = case.name
    expected: dict[str, tuple[str, int, int]] = {
        "authorize": ("captured", request.amount, 0),
        "capture": ("captured", request.moved, 0),
        "refund": ("partially_refunded", request.amount, request.moved),
        "cancel": ("canceled", 0, 0),
    }
    status, captured, refunded = expected[case.operation]
    found = (payment["status"], payment["amount_captured"], payment["amount_refunded"])
    report.check(found == (status, captured, refunded), f"{name}: payment {found}")
    if case.operation == "refund":
        refunds = [(r["amount"], r["status"]) for r in payment["refunds"]]
        report.check(refunds == [(request.moved, "succeeded")], f"{name}: refunds {refunds}")


# --- the processors' side ---------------------------------------------------------------------


def _psp_records(psp_a: ServiceProcess, psp_b: ServiceProcess) -> dict[str, list[dict[str, Any]]]:
    """Everything each simulator holds, as (amount, reference, captured, refunded) records."""
    a = httpx.get(psp_a.url + "/admin/authorizations", timeout=30).json()["authorizations"]
    body = httpx.get(psp_b.url + "/admin/payments", timeout=30).json()
    b_payments = body["payments"] if isinstance(body, dict) else body
    records: dict[str, list[dict[str, Any]]] = {"psp_a": [], "psp_b": []}
    for auth in a:
        records["psp_a"].append(
            {
                "amount": auth["amount"],
                "reference": auth["reference"],
                "status": auth["status"],
                "captures": [auth["amount_captured"]] if auth["amount_captured"] else [],
                "refunds": [auth["amount_refunded"]] if auth["amount_refunded"] else [],
            }
        )
    for payment in b_payments:
        live = [m for m in payment.get("modifications", []) if m["status"] != "failed"]
        captures = [m["amount"]["value"] for m in live if m["type"] == "capture"]
        if payment.get("captureImmediately") and payment["resultCode"] == "Authorised":
            captures = [payment["amount"]["value"]]
        records["psp_b"].append(
            {
                "amount": payment["amount"]["value"],
                "reference": payment["merchantReference"],
                "status": payment["resultCode"],
                "captures": captures,
                "refunds": [m["amount"]["value"] for m in live if m["type"] == "refund"],
                "cancels": len([m for m in live if m["type"] == "cancel"]),
            }
        )
    return records


def _check_processor(
    case: Case, request: Request, records: dict[str, list[dict[str, Any]]], report: Report
) -> int:
    """Exactly one authorization for the case's amount at any processor, with the capture and
    refund the case made, once. Returns how many authorizations the processors hold for it."""
    mine = [
        (processor, record)
        for processor, held in records.items()
        for record in held
        if record["amount"] == request.amount
    ]
    approved = [(p, r) for p, r in mine if r["status"] not in ("declined", "Refused", "Error")]
    report.check(len(approved) == 1, f"{case.name}: {len(approved)} authorizations at the PSPs")
    if len(approved) != 1:
        return len(approved)
    _, record = approved[0]
    captures = {
        "authorize": [request.amount],
        "capture": [request.moved],
        "refund": [request.amount],
        "cancel": [],
    }[case.operation]
    refunds = [request.moved] if case.operation == "refund" else []
    report.check(record["captures"] == captures, f"{case.name}: captures {record['captures']}")
    report.check(record["refunds"] == refunds, f"{case.name}: refunds {record['refunds']}")
    if case.operation == "cancel":
        canceled = record.get("cancels", 1 if record["status"] == "voided" else 0)
        report.check(canceled == 1, f"{case.name}: {canceled} cancels at the processor")
    return len(approved)


# --- the campaign -----------------------------------------------------------------------------


@dataclass
class Campaign:
    reports: dict[str, Report]
    ledgers: dict[str, LedgerReport]
    seconds: float
    authorizations: int


@pytest.fixture(scope="module")
def campaign(
    api_env: dict[str, str],
    pg_admin_url: str,
    vault: ServiceProcess,
    psp_a: ServiceProcess,
    psp_b: ServiceProcess,
    tokens: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Campaign:
    began = time.monotonic()
    work = tmp_path_factory.mktemp("crash")
    main_cases = [c for c in CASES if c.worker_point is None]
    worker_cases = [c for c in CASES if c.worker_point is not None]
    names = ["crash"] + [f"crash_w{i}" for i in range(len(worker_cases))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        labs = list(
            pool.map(
                lambda n: Lab.create(n, api_env, pg_admin_url, vault, tokens["admin"], work / n),
                names,
            )
        )
    notify_before = httpx.get(psp_b.url + "/admin/config").json().get("notify_url", "")
    base = 100_000 + secrets.randbelow(8_000) * 1_000
    amounts = {case: base + 10 * i for i, case in enumerate(CASES)}
    try:
        for lab in labs:
            lab.add_merchant("psp_a", RoutingConfig(processors=("psp_a",)))
        labs[0].add_merchant("psp_b", RoutingConfig(processors=("psp_b",)))
        # PSP B's fee takes the whole amount, so the router always tries PSP A first.
        whole_amount = {"psp_b": ProcessorFees(default=Fee(basis_points=10_000))}
        labs[0].add_merchant("failover", RoutingConfig(("psp_a", "psp_b"), fees=whole_amount))
        with ThreadPoolExecutor(max_workers=8) as pool:
            survivors = list(pool.map(lambda lab: lab.start("api"), labs))
        for lab, survivor in zip(labs, survivors, strict=True):
            lab.survivor = survivor
        notify = {"notify_url": survivors[0].url + "/v1/notifications/psp_b"}
        httpx.post(psp_b.url + "/admin/config", json=notify).raise_for_status()
        jobs = [(lab, case) for lab, case in zip(labs[1:], worker_cases, strict=True)]
        # Cases whose retry waits out the dead request's lease start first (threads take the
        # start slots in order), so their leases run while the others start.
        in_order = sorted(main_cases, key=lambda case: not _waits_out_a_lease(case))
        jobs += [(labs[0], case) for case in in_order]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = {case: pool.submit(run_case, lab, case, amounts[case]) for lab, case in jobs}
            reports = {}
            for case, future in futures.items():
                try:
                    reports[case.name] = future.result()
                except Exception as exc:  # the case's failure, reported by its test
                    failed = Report(case)
                    failed.problems.append(f"{type(exc).__name__}: {exc}")
                    reports[case.name] = failed
        records = _psp_records(psp_a, psp_b)
        authorizations = 0
        for case in CASES:
            report = reports[case.name]
            prepared = Request("", None, None, amounts[case], _moved(case, amounts[case]))
            authorizations += _check_processor(case, prepared, records, report)
        ledgers = {lab.name: lab.ledger() for lab in labs}
    finally:
        restore = {"notify_url": notify_before}
        httpx.post(psp_b.url + "/admin/config", json=restore)
        for lab in labs:
            lab.stop()
    result = Campaign(reports, ledgers, time.monotonic() - began, authorizations)
    _print(request, result)
    return result


def _waits_out_a_lease(case: Case) -> bool:
    """Whether the death leaves the key leased (the retry waits until the lease runs out)."""
    point = case.api_point or ""
    transaction, _, when = point.rpartition("_")[0].rpartition("_")
    if transaction in COMMIT_PROBES:
        committed, aborted = COMMIT_PROBES[transaction][1:]
        left = aborted if when == "before" else committed
    else:
        left = LEFT_AT.get(point, "none")
    return left in ("payment_created", "operation_started", "2")


def _moved(case: Case, amount: int) -> int:
    return {"capture": amount - 100, "refund": 100}.get(case.operation, amount)


def _print(request: pytest.FixtureRequest, result: Campaign) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        _write(reporter, result)


def _write(reporter: Any, result: Campaign) -> None:
    reporter.ensure_newline()
    reporter.write_sep("-", "crash at every step")
    for name, report in result.reports.items():
        retried = ",".join(f"{s}x{n}" for s, n in sorted(report.retries.items()))
        verdict = "ok" if not report.problems else f"VIOLATED: {report.problems}"
        reporter.write_line(
            f"{name:<62} died at {' / '.join(report.deaths) or '-'}; retries {retried}; "
            f"answer {report.answer} {report.final} after {report.seconds:.1f}s; {verdict}"
        )
    kills = sum(len(r.deaths) for r in result.reports.values())
    problems = sum(len(r.problems) for r in result.reports.values())
    ledger = {
        name: (report.payments_checked, len(report.mismatches), report.postings_unbalanced)
        for name, report in result.ledgers.items()
    }
    reporter.write_line(
        f"{len(result.reports)} cases, {kills} processes SIGKILLed, "
        f"{result.authorizations} authorizations at the PSPs for {len(result.reports)} "
        f"payments, {problems} violations; ledger (payments, mismatches, unbalanced) {ledger}; "
        f"{result.seconds:.0f}s"
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_crash_at_this_step_settles_exactly_once(case: Case, campaign: Campaign) -> None:
    report = campaign.reports[case.name]
    assert report.problems == []


def test_the_ledger_balances_and_matches_every_crashed_payment(campaign: Campaign) -> None:
    for name, ledger in campaign.ledgers.items():
        assert ledger.ok, (name, msgspec.to_builtins(ledger))
        assert ledger.in_flight == 0, (name, ledger.in_flight)
