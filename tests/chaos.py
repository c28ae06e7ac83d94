"""`make chaos`: traffic through the whole stack while the first PSP fails and recovers and the
API and worker processes are each SIGKILLed and restarted once. Afterwards every payment must be
in a final state, match what the simulators hold, and have at most one authorization. Prints a
report with counts; exits 1 on any violation. Duration: CHAOS_SECONDS (default 300).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tessera.devstack import StackConfig, service_env
from tests.support.processes import ServiceProcess
from tests.support.stack import start_stack

CARDS = (
    ["4242424242424242"] * 6 + ["5555555555554444"] * 3 + ["4000000000000002", "4000000000000119"]
)
FINAL = {
    "authorized",
    "captured",
    "partially_refunded",
    "refunded",
    "canceled",
    "declined",
    "failed",
}


async def client_loop(
    api: str,
    auth: dict[str, str],
    tokens: dict[str, str],
    deadline: float,
    seen: dict[str, str],
    stats: Counter[str],
) -> None:
    rng = random.Random()
    async with httpx.AsyncClient(timeout=20) as http:
        while time.monotonic() < deadline:
            number = rng.choice(CARDS)
            body = {"amount": rng.randint(100, 20_000), "currency": "EUR", "token": tokens[number]}
            key = secrets.token_hex(12)
            for attempt in range(8):  # a client with retries: same key every time
                try:
                    response = await http.post(
                        api + "/v1/payments",
                        json=body,
                        headers={**auth, "idempotency-key": key},
                    )
                except httpx.HTTPError:
                    stats["network_errors"] += 1
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue
                stats[f"http_{response.status_code}"] += 1
                if response.status_code in (409, 503) or (
                    response.status_code >= 500
                    and (response.json().get("error", {}).get("code") not in ("processor_error",))
                ):
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue
                data = response.json()
                payment_id = data.get("id") or data.get("error", {}).get("payment")
                if payment_id:
                    seen[payment_id] = key
                break
            else:
                stats["gave_up"] += 1


def check_ledger(env: dict[str, str]) -> dict[str, Any]:
    """`tessera ledger check` on the chaos stack's database: money balanced through it all."""
    result = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "ledger", "check"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    report: dict[str, Any] = json.loads(result.stdout) if result.stdout.strip() else {}
    if not report:
        report = {"mismatches": [f"the check failed: {result.stderr[-500:]}"]}
    return report


def main() -> int:
    seconds = float(os.environ.get("CHAOS_SECONDS", "300"))
    work = Path(tempfile.mkdtemp(prefix="tessera-chaos-"))
    extra = {
        "TESSERA_API_AUTHORIZATION_TIMEOUT_SECONDS": "3",
        "TESSERA_API_IDEMPOTENCY_LEASE_SECONDS": "10",
        "TESSERA_API_PROCESSOR_CUTOFF_SECONDS": "20",
        "TESSERA_API_WORKER_INTERVAL_SECONDS": "0.5",
        "TESSERA_VAULT_FORWARD_TIMEOUT_SECONDS": "3",
    }
    stack = start_stack(service_env(StackConfig.from_env()), work, worker=True, extra=extra)
    urls, procs = stack.urls, stack.processes
    violations: list[str] = []
    stats: Counter[str] = Counter()
    seen: dict[str, str] = {}
    try:
        merchant = stack.create_merchant(
            "Chaos", "--processors", "psp_a,psp_b", "--fee", "psp_b=0+3000"
        )
        tokens = {
            number: httpx.post(
                urls["vault"] + "/v1/tokens",
                json={"number": number, "exp_month": 12, "exp_year": 2040},
                headers={"authorization": f"Bearer {merchant['publishable_key']}"},
            ).json()["id"]
            for number in set(CARDS)
        }
        auth = {"authorization": f"Bearer {merchant['secret_key']}"}
        start = time.monotonic()
        deadline = start + seconds

        async def traffic_and_chaos() -> None:
            clients = [
                asyncio.create_task(client_loop(urls["api"], auth, tokens, deadline, seen, stats))
                for _ in range(8)
            ]
            schedule = [
                (
                    0.2,
                    "psp_a fails",
                    lambda: httpx.post(
                        urls["psp_a"] + "/admin/config", json={"fail_all_5xx": True}
                    ),
                ),
                (
                    0.4,
                    "psp_a recovers",
                    lambda: httpx.post(
                        urls["psp_a"] + "/admin/config", json={"fail_all_5xx": False}
                    ),
                ),
                (0.5, "api killed", lambda: kill_and_restart(procs["api"], "/readyz")),
                (0.7, "worker killed", lambda: kill_and_restart(procs["worker"], "")),
            ]
            for fraction, label, action in schedule:
                await asyncio.sleep(max(0.0, start + fraction * seconds - time.monotonic()))
                print(f"chaos: {label} at {time.monotonic() - start:.0f}s", flush=True)
                await asyncio.to_thread(action)
                stats[f"fault: {label}"] += 1
            await asyncio.gather(*clients)

        asyncio.run(traffic_and_chaos())
        print("chaos: traffic over; waiting for the worker to settle what is unknown", flush=True)
        settle_deadline = time.monotonic() + 120
        payments = list_payments(urls["api"], auth)
        while time.monotonic() < settle_deadline and any(
            p["status"] == "processing" for p in payments
        ):
            time.sleep(2)
            payments = list_payments(urls["api"], auth)
        statuses = Counter(p["status"] for p in payments)
        approvals = approvals_by_reference(urls)
        double = mismatched = 0
        for payment in payments:
            if payment["status"] not in FINAL:
                violations.append(f"{payment['id']} is still {payment['status']}")
            count = sum(approvals.get(a["reference"], 0) for a in payment["attempts"])
            if count > 1:
                double += 1
                violations.append(f"{payment['id']} has {count} authorizations")
            approved = payment["status"] in FINAL - {"declined", "failed"}
            if approved != (count == 1):
                mismatched += 1
                violations.append(f"{payment['id']}: {payment['status']} but {count} at PSPs")
        missing = [p for p in seen if p not in {x["id"] for x in payments}]
        violations += [f"{p} was answered but does not exist" for p in missing]
        ledger = check_ledger(stack.env)
        violations += [f"ledger: {m}" for m in ledger.get("mismatches", [])]
        if ledger.get("postings_unbalanced") or ledger.get("currencies_unbalanced"):
            violations.append(f"ledger unbalanced: {ledger}")
        print("\nchaos report")
        print(f"  duration               {seconds:.0f} s, 8 clients retrying with the same key")
        print(f"  payments               {len(payments)} ({dict(sorted(statuses.items()))})")
        print(f"  client answers         {dict(sorted(stats.items()))}")
        print(f"  two authorizations     {double}")
        print(f"  differs from the PSPs  {mismatched}")
        print(f"  acknowledged but lost  {len(missing)}")
        print(
            f"  ledger                 {ledger.get('payments_checked')} payments checked, "
            f"{len(ledger.get('mismatches', []))} differ, "
            f"{ledger.get('postings_unbalanced')} unbalanced postings"
        )
        print(f"  violations             {len(violations)}")
        for violation in violations[:20]:
            print(f"    {violation}")
        print(f"  logs                   {work}")
    finally:
        stack.stop()
    return 1 if violations else 0


def kill_and_restart(process: ServiceProcess, ready: str) -> None:
    assert process.process is not None
    process.process.send_signal(signal.SIGKILL)
    process.process.wait()
    process.log_path = process.log_path.with_suffix(".restarted.log")
    process.start(ready_path=ready)


def list_payments(api: str, auth: dict[str, str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = HTTP.get(f"{api}/v1/payments?limit=100{cursor}", headers=auth).json()
        found += page["data"]
        if not page["has_more"]:
            return found
        cursor = f"&starting_after={page['data'][-1]['id']}"


#: One pooled client for the (many) verification calls.
HTTP = httpx.Client(timeout=30)


def approvals_by_reference(urls: dict[str, str]) -> Counter[str]:
    """Every authorization both simulators hold (one bulk read each), counted by our reference."""
    found: Counter[str] = Counter()
    for auth in HTTP.get(urls["psp_a"] + "/admin/authorizations").json()["authorizations"]:
        if auth["status"] in ("approved", "captured", "voided"):
            found[auth["reference"]] += 1
    body = HTTP.get(urls["psp_b"] + "/admin/payments").json()
    for payment in body["payments"] if isinstance(body, dict) else body:
        if payment.get("resultCode") == "Authorised":
            found[payment["merchantReference"]] += 1
    return found


if __name__ == "__main__":
    raise SystemExit(main())
