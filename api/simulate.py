"""`tessera routing simulate --traffic FILE`: the router against "always PSP A" and "always
PSP B", on the running stack (`make up`), with the simulators set to the file's auth rates.

Each strategy is a merchant of its own (created like any merchant), routed by its own config,
paying for the same traffic mix through the real API, vault and simulators; the router learns as
it goes, as in production. Printed per strategy: payments, auth rate, total fees, and the
expected value actually realised: the sum of (amount - fee) over approved payments.
"""

from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from api.services.routing import Fee

STRATEGIES = {
    "router": ("psp_a", "psp_b"),
    "always psp_a": ("psp_a",),
    "always psp_b": ("psp_b",),
}


@dataclass
class Result:
    strategy: str
    payments: int = 0
    approved: int = 0
    fees: int = 0
    value: int = 0
    by_processor: dict[str, int] | None = None


def parse_fee(text: str) -> Fee:
    fixed, _, bp = text.partition("+")
    return Fee(int(fixed), int(bp))


def run(
    traffic_file: str, api_url: str, vault_url: str, simulators: dict[str, str]
) -> list[Result]:
    from api.cli import configure_routing_for, create_merchant

    traffic: dict[str, Any] = json.loads(Path(traffic_file).read_text())
    rng = random.Random(traffic.get("seed", 1))
    fees = {name: parse_fee(p["fee"]) for name, p in traffic["processors"].items()}
    for name, processor in traffic["processors"].items():
        config = {"approval_rate": processor["approval_rate"], "seed": traffic.get("seed", 1)}
        httpx.post(simulators[name] + "/admin/config", json=config).raise_for_status()
    cards = list(traffic["cards"].items())
    amount, currency = int(traffic["amount"]), traffic["currency"]
    results = []
    with httpx.Client(timeout=30) as http:
        for strategy, processors in STRATEGIES.items():
            keys = create_merchant(f"Simulation: {strategy}", [])
            configure_routing_for(keys["merchant_id"], processors, {n: fees[n] for n in processors})
            tokens = {
                number: http.post(
                    vault_url + "/v1/tokens",
                    json={"number": number, "exp_month": 12, "exp_year": 2040},
                    headers={"authorization": f"Bearer {keys['publishable_key']}"},
                ).json()["id"]
                for number, _ in cards
            }
            result = Result(strategy, by_processor={})
            auth = {"authorization": f"Bearer {keys['secret_key']}"}
            for _ in range(int(traffic["payments_per_strategy"])):
                number = rng.choices([c for c, _ in cards], weights=[w for _, w in cards])[0]
                body = {"amount": amount, "currency": currency, "token": tokens[number]}
                response = http.post(
                    api_url + "/v1/payments",
                    json=body,
                    headers={**auth, "idempotency-key": secrets.token_hex(12)},
                )
                result.payments += 1
                if response.status_code == 201:
                    processor = response.json()["processor"]
                    fee = fees[processor].of(amount)
                    result.approved += 1
                    result.fees += fee
                    result.value += amount - fee
                    assert result.by_processor is not None
                    result.by_processor[processor] = result.by_processor.get(processor, 0) + 1
            results.append(result)
    for name in traffic["processors"]:
        httpx.post(
            simulators[name] + "/admin/config", json={"approval_rate": {}}
        ).raise_for_status()
    return results


def report(results: list[Result]) -> str:
    lines = [
        f"{'strategy':<14} {'payments':>8} {'auth rate':>9} {'fees':>9} {'value':>11}  approved at"
    ]
    for r in results:
        rate = r.approved / r.payments if r.payments else 0.0
        where = ", ".join(f"{k} {v}" for k, v in sorted((r.by_processor or {}).items()))
        lines.append(
            f"{r.strategy:<14} {r.payments:>8} {rate:>9.1%} {r.fees / 100:>9.2f} "
            f"{r.value / 100:>11.2f}  {where}"
        )
    return "\n".join(lines)
