"""Tessera under load: five kinds of users, the business checks at the end, and pass/fail.

Run it through `make loadtest` (a short headless run against `make up`, with a merchant of its
own), or by hand:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \\
        --secret-key sk_test_… --publishable-key pk_test_…            # the web UI, :8089
    locust -f loadtests/locustfile.py,loadtests/shapes.py --shape spike --headless …

Users (weights from the command line: --shopper-weight 6 --renewal-weight 3 …):
- shopper: tokenizes a card at the vault with the publishable key, creates a payment with an
  idempotency key (capture: false), captures it;
- renewal: a customer-present setup keeps the card as a payment method (`setup_future_usage`),
  then each task charges it as a merchant-initiated renewal (`payment_method`, `off_session`,
  `mit_reason`: no CVC, the setup's network transaction id), as a monthly renewal run does;
- refund desk: a captured payment, a partial refund, then a refund of the rest;
- flaky client: one request sent several times with one idempotency key, some at once;
- back office: lists payments and reads one.
Cards come from the simulators' table, so the outcomes are known: 90 % approve, 5 % decline
`do_not_honor`, 5 % `insufficient_funds`.

At the end (on the master, or the only process) the business checks read every payment of the
merchant back from the API: no idempotency key made two payments, no refund total exceeds its
capture, and each payment's outcome is the one its card must give. The run fails (exit code 1)
when a check fails or the error rate or p99 is over its threshold; the summary (JSON) and the
CSV/HTML reports go to --results-dir.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import gevent
import requests
from gevent.pool import Group
from locust import FastHttpUser, constant_throughput, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

ROOT = Path(__file__).resolve().parents[1]

#: Card number -> the decline code it must give (None: approved). The simulators' own table.
CARDS: dict[str, str | None] = {
    "4242424242424242": None,
    "4000000000000002": "do_not_honor",
    "4000000000009995": "insufficient_funds",
}
MIX = (("4242424242424242", 90), ("4000000000000002", 5), ("4000000000009995", 5))
EXPECTED_BY_LAST4 = {number[-4:]: code for number, code in CARDS.items()}
WEIGHTS = {"shopper": 6, "renewal": 3, "refund": 1, "flaky": 1, "backoffice": 2}
#: The business checks' result, written at test stop (one run per process).
BUSINESS: dict[str, Any] = {}
APPROVED_STATUSES = {"authorized", "captured", "partially_refunded", "refunded", "canceled"}


def pick_card() -> str:
    numbers = [number for number, _ in MIX]
    weights = [weight for _, weight in MIX]
    return random.choices(numbers, weights)[0]


def demo_keys() -> dict[str, str]:
    path = ROOT / ".run" / "demo.json"
    if path.exists():
        loaded: dict[str, str] = json.loads(path.read_text())
        return loaded
    return {}


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    keys = demo_keys()
    group = parser.add_argument_group("Tessera")
    group.add_argument(
        "--vault-url", default="http://127.0.0.1:8100", env_var="TESSERA_LOAD_VAULT_URL"
    )
    group.add_argument(
        "--secret-key", default=keys.get("secret_key", ""), env_var="TESSERA_LOAD_SECRET_KEY"
    )
    group.add_argument(
        "--publishable-key",
        default=keys.get("publishable_key", ""),
        env_var="TESSERA_LOAD_PUBLISHABLE_KEY",
    )
    for name, weight in WEIGHTS.items():
        group.add_argument(f"--{name}-weight", type=int, default=weight)
    group.add_argument(
        "--pace", type=float, default=0.0, help="tasks/s per user (0: each waits for nothing)"
    )
    group.add_argument("--max-error-rate", type=float, default=0.01)
    group.add_argument("--max-p99-ms", type=float, default=2000.0)
    group.add_argument("--results-dir", default="", help="where summary.json is written")
    group.add_argument("--skip-business-checks", action="store_true", default=False)
    # Read by loadtests/shapes.py when it is loaded too.
    group.add_argument("--shape", choices=["ramp", "spike", "soak"], default="ramp")
    group.add_argument("--peak-users", type=int, default=50)
    group.add_argument("--shape-seconds", type=int, default=0, help="0: the shape's own")


@events.init.add_listener
def apply_options(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    for user_class, name in (
        (Shopper, "shopper"),
        (Renewal, "renewal"),
        (RefundDesk, "refund"),
        (FlakyClient, "flaky"),
        (BackOffice, "backoffice"),
    ):
        user_class.weight = getattr(options, f"{name}_weight")


class TesseraUser(FastHttpUser):
    abstract = True
    # Locust's own failure rules: a 402 decline is an expected answer, checked per request.
    network_timeout = 30.0
    connection_timeout = 10.0

    def wait_time(self) -> float:
        """`--pace`, read at each wait rather than at start-up: in a distributed run a worker
        learns the master's options only when its users are spawned."""
        options = self.environment.parsed_options
        pace = float(options.pace) if options is not None else 0.0
        return constant_throughput(pace)(self) if pace > 0 else 0.0

    def on_start(self) -> None:
        options = self.environment.parsed_options
        assert options is not None
        if not options.secret_key or not options.publishable_key:
            raise RuntimeError("set --secret-key and --publishable-key (make loadtest does)")
        self.api_auth = {"Authorization": f"Bearer {options.secret_key}"}
        self.vault_auth = {"Authorization": f"Bearer {options.publishable_key}"}
        self.vault_url = options.vault_url.rstrip("/")

    def tokenize(self, number: str) -> str | None:
        body = {"number": number, "exp_month": 12, "exp_year": 2040, "cvc": "123"}
        with self.rest(
            "POST",
            f"{self.vault_url}/v1/tokens",
            json=body,
            headers=self.vault_auth,
            name="vault POST /v1/tokens",
        ) as response:
            if response.status_code != 201:
                response.failure(f"tokenize: {response.status_code}")
                return None
            token: str = response.js["id"]
            return token

    def pay(
        self,
        token: str | None,
        number: str,
        *,
        capture: bool,
        key: str | None = None,
        setup: bool = False,
        payment_method: str | None = None,
    ) -> dict[str, Any] | None:
        """A payment whose outcome must match its card: 201 (or 202) approved, 402 declined.
        `setup`: keep the card as a payment method; `payment_method`: a renewal on it."""
        key = key or f"load-{uuid.uuid4()}"
        body: dict[str, Any] = {
            "amount": random.randint(100, 20_000),
            "currency": "EUR",
            "capture": capture,
            "reference": key,
        }
        name = "POST /v1/payments"
        if payment_method is not None:
            body.update(payment_method=payment_method, off_session=True, mit_reason="recurring")
            name = "POST /v1/payments (renewal)"
        else:
            body["token"] = token
        if setup:
            body["setup_future_usage"] = "off_session"
            name = "POST /v1/payments (setup)"
        expected = CARDS[number]
        with self.rest(
            "POST",
            "/v1/payments",
            json=body,
            headers={**self.api_auth, "Idempotency-Key": key},
            name=name,
        ) as response:
            if expected is None and response.status_code in (201, 202):
                payment: dict[str, Any] = response.js
                return payment
            if expected is not None and response.status_code == 402:
                code = response.js["error"].get("decline_code")
                if code == expected:
                    response.success()  # the decline this card must give
                else:
                    response.failure(f"declined {code}, the card gives {expected}")
                return None
            response.failure(f"payment: {response.status_code} for a card that gives {expected}")
            return None

    def post(self, path: str, name: str, body: dict[str, Any] | None = None) -> Any:
        with self.rest(
            "POST",
            path,
            json=body or {},
            headers={**self.api_auth, "Idempotency-Key": f"load-{uuid.uuid4()}"},
            name=name,
        ) as response:
            if response.status_code not in (200, 201):
                response.failure(f"{name}: {response.status_code}")
                return None
            return response.js


class Shopper(TesseraUser):
    @task
    def checkout(self) -> None:
        number = pick_card()
        token = self.tokenize(number)
        if token is None:
            return
        payment = self.pay(token, number, capture=False)
        if payment is not None and payment["status"] == "authorized":
            self.post(f"/v1/payments/{payment['id']}/capture", "POST /v1/payments/{id}/capture")


class Renewal(TesseraUser):
    """A subscription: the setup stores the card as a payment method (a customer-initiated
    payment with the CVC), then every period charges it while the customer is away."""

    number = "4242424242424242"

    def on_start(self) -> None:
        super().on_start()
        self.payment_method: str | None = None
        token = self.tokenize(self.number)
        if token is None:
            return
        setup = self.pay(token, self.number, capture=True, setup=True)
        if setup is not None:
            self.payment_method = setup.get("payment_method")

    @task
    def renew(self) -> None:
        if self.payment_method is not None:
            self.pay(None, self.number, capture=True, payment_method=self.payment_method)


class RefundDesk(TesseraUser):
    def on_start(self) -> None:
        super().on_start()
        self.token = self.tokenize("4242424242424242")

    @task
    def refund_in_two_steps(self) -> None:
        if self.token is None:
            return
        payment = self.pay(self.token, "4242424242424242", capture=True)
        if payment is None or payment["status"] != "captured":
            return
        part = random.randint(1, payment["amount_captured"] - 1)
        refund_path = f"/v1/payments/{payment['id']}/refunds"
        name = "POST /v1/payments/{id}/refunds"
        if self.post(refund_path, name, {"amount": part}) is not None:
            self.post(refund_path, name)  # the rest


class FlakyClient(TesseraUser):
    """Retries like a client with a short time-out: the same key, again and at once."""

    @task
    def retry_storm(self) -> None:
        number = pick_card()
        token = self.tokenize(number)
        if token is None:
            return
        key = f"load-flaky-{uuid.uuid4()}"
        body = {"amount": 1234, "currency": "EUR", "token": token, "reference": key}
        answers: list[tuple[int, str | None]] = []

        def send(name: str) -> None:
            with self.rest(
                "POST",
                "/v1/payments",
                json=body,
                headers={**self.api_auth, "Idempotency-Key": key},
                name=name,
            ) as response:
                status = response.status_code
                if status == 409 and response.js["error"]["code"] == "idempotency_key_in_use":
                    response.success()  # the first is still in flight: a retry's fair answer
                    return
                if status not in (201, 202, 402):
                    response.failure(f"retry: {status}")
                    return
                response.success()  # a decline is this card's answer too
                data = response.js
                answers.append((status, data.get("id") or data.get("error", {}).get("payment")))

        send("POST /v1/payments (first)")
        group = Group()
        for _ in range(3):
            group.spawn(send, "POST /v1/payments (retry, concurrent)")
        group.join()
        send("POST /v1/payments (retry)")
        if len({payment for _, payment in answers}) > 1:
            events.request.fire(
                request_type="CHECK",
                name="one key, one payment",
                response_time=0,
                response_length=0,
                exception=AssertionError(f"one key, several payments: {answers}"),
            )


class BackOffice(TesseraUser):
    @task
    def browse(self) -> None:
        with self.rest(
            "GET", "/v1/payments?limit=20", headers=self.api_auth, name="GET /v1/payments"
        ) as response:
            if response.status_code != 200:
                response.failure(f"list: {response.status_code}")
                return
            payments = response.js["data"]
        if payments:
            chosen = random.choice(payments)["id"]
            self.client.get(
                f"/v1/payments/{chosen}", headers=self.api_auth, name="GET /v1/payments/{id}"
            )


# --- the end of a run --------------------------------------------------------------------------


def all_payments(host: str, secret_key: str) -> list[dict[str, Any]]:
    payments: list[dict[str, Any]] = []
    cursor = None
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {secret_key}"
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["starting_after"] = cursor
        page = session.get(f"{host}/v1/payments", params=params, timeout=30).json()
        payments += page["data"]
        if not page["has_more"]:
            return payments
        cursor = page["data"][-1]["id"]


def business_checks(payments: list[dict[str, Any]]) -> dict[str, Any]:
    """What must hold whatever the load: read back from the API."""
    by_key = Counter(p["reference"] for p in payments if p["reference"])
    duplicated = sorted(key for key, count in by_key.items() if count > 1)
    over_refunded = [
        p["id"]
        for p in payments
        if p["amount_refunded"] > p["amount_captured"]
        or sum(r["amount"] for r in p["refunds"] if r["status"] != "failed") > p["amount_captured"]
    ]
    sent: Counter[str] = Counter()
    observed: Counter[str] = Counter()
    wrong_outcome = []
    for payment in payments:
        expected = EXPECTED_BY_LAST4.get(payment["card"]["last4"], "unknown card")
        sent[expected or "approved"] += 1
        if payment["status"] == "declined":
            observed[payment["decline_code"]] += 1
            matches = payment["decline_code"] == expected
        elif payment["status"] in APPROVED_STATUSES:
            observed["approved"] += 1
            matches = expected is None
        else:  # processing or failed: no outcome to compare
            observed[payment["status"]] += 1
            continue
        if not matches:
            wrong_outcome.append(payment["id"])
    return {
        "payments": len(payments),
        "idempotency_keys_with_several_payments": duplicated[:20],
        "refunds_over_capture": over_refunded[:20],
        "outcomes_by_card": dict(sent),
        "outcomes_observed": dict(observed),
        "outcomes_not_matching_their_card": wrong_outcome[:20],
        "ok": not (duplicated or over_refunded or wrong_outcome),
    }


@events.test_stop.add_listener
def check_the_business(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if isinstance(environment.runner, WorkerRunner) or options is None:
        return
    if options.skip_business_checks:
        BUSINESS.update(skipped=True, ok=True)
        return
    gevent.sleep(1.0)  # the last responses are in; nothing is still being written
    payments = all_payments(environment.host or "", options.secret_key)
    BUSINESS.update(business_checks(payments))


@events.quitting.add_listener
def verdict(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if isinstance(environment.runner, WorkerRunner) or options is None:
        return
    total = environment.stats.total
    p99 = total.get_response_time_percentile(0.99) or 0.0
    business = BUSINESS or {"ok": False, "missing": True}
    summary = {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "failure_ratio": round(total.fail_ratio, 5),
        "requests_per_second": round(total.total_rps, 1),
        "p50_ms": total.get_response_time_percentile(0.5),
        "p99_ms": p99,
        "thresholds": {"max_error_rate": options.max_error_rate, "max_p99_ms": options.max_p99_ms},
        "endpoints": {
            name: {
                "requests": entry.num_requests,
                "failures": entry.num_failures,
                "rps": round(entry.total_rps, 1),
                "p50_ms": entry.get_response_time_percentile(0.5),
                "p99_ms": entry.get_response_time_percentile(0.99),
            }
            for (name, _method), entry in sorted(environment.stats.entries.items())
        },
        "business_checks": business,
    }
    problems = []
    if total.fail_ratio > options.max_error_rate:
        problems.append(f"error rate {total.fail_ratio:.2%} > {options.max_error_rate:.2%}")
    if p99 > options.max_p99_ms:
        problems.append(f"p99 {p99:.0f} ms > {options.max_p99_ms:.0f} ms")
    if not business.get("ok"):
        problems.append("a business check failed")
    summary["verdict"] = "fail: " + "; ".join(problems) if problems else "pass"
    if options.results_dir:
        path = Path(options.results_dir) / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
    if problems:
        environment.process_exit_code = 1
