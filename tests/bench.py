"""`make bench`: numbers, printed, never asserted.

The foundation's benchmark measures the per-request floor both services share (request-id and
metrics layer, JSON access log with redaction, the readiness round trip to Postgres and Redis)
and the pure-Python costs every request will pay (redaction of a log line, id generation, Luhn).
The payment and vault issues add their own rows. HTTP load comes from wrk (C, Debian's package),
pinned to the other core than the service; its CPU use is printed.
"""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

import httpx

from core.cards import luhn_valid
from core.ids import new_id
from core.redaction import redact
from tessera.devstack import StackConfig, service_env
from tests.support.processes import ServiceProcess, free_port
from tests.support.stack import start_stack

LINE = (
    '{"method": "POST", "route": "/v1/payments/{id}/capture", "status": 200, '
    '"duration_ms": 3.2, "request_id": "req_01m89x6mx8w8b3hsan3qvysbvk", "amount": 1050}'
)


def per_second(fn: Callable[[], object], number: int = 20_000) -> float:
    seconds = min(timeit.repeat(fn, number=number, repeat=3))
    return number / seconds


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (Debian package) for the HTTP rows ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"], check=False, stdout=subprocess.DEVNULL
        )
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("make bench needs wrk: apt-get install wrk")
    return found


def _ms(text: str) -> float:
    number = float(re.sub(r"[a-z]+$", "", text))
    unit = re.sub(r"^[0-9.]+", "", text)
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _wrk_field(pattern: str, output: str) -> str:
    found = re.search(pattern, output)
    if found is None:
        raise RuntimeError(f"wrk's output has no {pattern!r}:\n{output}")
    return found[1]


def http_row(
    name: str, url: str, seconds: int = 5, connections: int = 16, script: str | None = None
) -> str:
    """wrk on core 1 (the service is pinned to core 0), keep-alive, after a 1 s warm-up."""
    wrk = wrk_binary()
    base = ["taskset", "-c", "1", wrk, "-t1", f"-c{connections}", "--latency"]
    if script:
        base += ["-s", script]
    subprocess.run([*base, "-d1s", url], check=True, capture_output=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [*base, f"-d{seconds}s", url], check=True, capture_output=True, text=True
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rate = float(_wrk_field(r"Requests/sec:\s+([0-9.]+)", out))
    p50 = _ms(_wrk_field(r"50%\s+(\S+)", out))
    p99 = _ms(_wrk_field(r"99%\s+(\S+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx[1]) if non2xx else 0
    return (
        f"{name:<28} {rate:>9.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
        f"non-2xx {errors}  generator CPU {cpu / seconds * 100:.0f}%"
    )


def main() -> None:
    print("core (one process, one core)")
    print(f"  redact a log line, no card     {per_second(lambda: redact(LINE)):>12,.0f} /s")
    with_pan = LINE.replace("1050", "4242424242424242")
    print(f"  redact a log line with a card  {per_second(lambda: redact(with_pan)):>12,.0f} /s")
    print(f"  new_id('pay')                  {per_second(lambda: new_id('pay')):>12,.0f} /s")
    pan = "4242424242424242"
    print(f"  luhn_valid (16 digits)         {per_second(lambda: luhn_valid(pan)):>12,.0f} /s")

    env = service_env(StackConfig.from_env())
    env = {**env, "TESSERA_API_LOG_LEVEL": "info", "TESSERA_VAULT_LOG_LEVEL": "info"}
    env["TESSERA_API_VAULT_SERVICE_TOKEN"] = env["TESSERA_VAULT_SERVICE_TOKEN"] = env.get(
        "TESSERA_VAULT_SERVICE_TOKEN"
    ) or secrets.token_urlsafe(32)
    print("\nHTTP: one service process on core 0, wrk on core 1, 16 keep-alive connections, 5 s")
    with tempfile.TemporaryDirectory() as logs:
        for module in ("api", "vault"):
            port = free_port()
            prefix = f"TESSERA_{module.upper()}_"
            process = ServiceProcess(
                module, {**env, f"{prefix}PORT": str(port)}, port, Path(logs) / f"{module}.log"
            ).start()
            assert process.process is not None
            os.sched_setaffinity(process.process.pid, {0})
            try:
                print(http_row(f"{module} GET /healthz", process.url + "/healthz"))
                print(http_row(f"{module} GET /readyz (db+redis)", process.url + "/readyz"))
            finally:
                process.stop()
    vault_rows(env)
    payment_rows(env)
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")


def _lua(method: str, body: str, headers: dict[str, str]) -> str:
    lines = [f'wrk.method = "{method}"', f"wrk.body = {json.dumps(body)}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def _kms_calls(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vault_kms_calls "):
            return float(line.split()[1])
    return float("nan")


def vault_rows(env: dict[str, str]) -> None:
    """Tokenize, read metadata and forward through the vault alone (a trivial destination)."""
    print("\nvault alone: one process on core 0, wrk on core 1, 16 connections, 5 s each")
    admin = {"authorization": f"Bearer {env['TESSERA_VAULT_ADMIN_TOKEN']}"}
    with tempfile.TemporaryDirectory() as work:
        psp_port, port = free_port(), free_port()
        psp = subprocess.Popen([sys.executable, "-m", "tests.support.fast_psp", str(psp_port)])
        destinations = {"bench": {"url": f"http://127.0.0.1:{psp_port}", "paths": ["/auth"]}}
        vault_env = {
            **env,
            "TESSERA_VAULT_PORT": str(port),
            "TESSERA_VAULT_FORWARD_DESTINATIONS": json.dumps(destinations),
        }
        vault = ServiceProcess("vault", vault_env, port, Path(work) / "vault.log").start()
        assert vault.process is not None
        os.sched_setaffinity(vault.process.pid, {0})
        try:
            merchant, pk = new_id("mer"), f"pk_test_{secrets.token_hex(24)}"
            httpx.post(
                vault.url + "/v1/merchants",
                json={"id": merchant, "publishable_key": pk},
                headers=admin,
            ).raise_for_status()
            card = '{"number": "4242424242424242", "exp_month": 12, "exp_year": 2040}'
            token = httpx.post(
                vault.url + "/v1/tokens",
                content=card,
                headers={"authorization": f"Bearer {pk}", "content-type": "application/json"},
            ).json()["id"]
            service = {
                "Authorization": f"Bearer {env['TESSERA_VAULT_SERVICE_TOKEN']}",
                "Tessera-Merchant": merchant,
                "Content-Type": "application/json",
            }
            forward = json.dumps(
                {
                    "destination": "bench",
                    "path": "/auth",
                    "token": token,
                    "body": {"pan": "{{card.number}}", "exp": "{{card.exp_month}}"},
                }
            )
            cases = [
                (
                    "tokenize POST /v1/tokens",
                    "/v1/tokens",
                    _lua(
                        "POST",
                        card,
                        {"Authorization": f"Bearer {pk}", "Content-Type": "application/json"},
                    ),
                ),
                ("metadata GET /v1/tokens/{id}", f"/v1/tokens/{token}", _lua("GET", "", service)),
                ("forward POST /v1/forward", "/v1/forward", _lua("POST", forward, service)),
            ]
            for name, path, lua in cases:
                script = Path(work) / "case.lua"
                script.write_text(lua)
                before = _kms_calls(vault.url)
                print(http_row(name, vault.url + path, script=str(script)))
                print(f"{'':<28} KMS calls during the run: {_kms_calls(vault.url) - before:.0f}")
        finally:
            vault.stop()
            psp.terminate()
            psp.wait()


def _unique_key_lua(body: str, headers: dict[str, str]) -> str:
    """Every request a new Idempotency-Key: each one is a new payment."""
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(body)}",
        *(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()),
        "local counter = 0",
        "local prefix = tostring(math.random(1, 1e9))",
        "request = function()",
        "  counter = counter + 1",
        '  wrk.headers["Idempotency-Key"] = "bench-" .. prefix .. "-" .. counter',
        "  return wrk.format()",
        "end",
    ]
    return "\n".join(lines) + "\n"


def payment_rows(env: dict[str, str]) -> None:
    """Authorize-and-capture through the whole stack (API -> vault -> PSP A, zero latency)."""
    print("\nwhole stack: API, vault and PSP A (no added latency), wrk on core 1, 5 s each")
    with tempfile.TemporaryDirectory() as work:
        stack = start_stack(env, Path(work))
        log = Path(work)
        try:
            merchant = stack.create_merchant("Bench")
            card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2040}
            token = httpx.post(
                stack.urls["vault"] + "/v1/tokens",
                json=card,
                headers={"authorization": f"Bearer {merchant['publishable_key']}"},
            ).json()["id"]
            api_url = stack.urls["api"]
            auth = {
                "Authorization": f"Bearer {merchant['secret_key']}",
                "Content-Type": "application/json",
            }
            body = json.dumps({"amount": 1050, "currency": "EUR", "token": token, "capture": True})
            script = log / "pay.lua"
            script.write_text(_unique_key_lua(body, auth))
            print(http_row("authorize+capture POST", api_url + "/v1/payments", script=str(script)))
            replay = log / "replay.lua"
            replay.write_text(_lua("POST", body, {**auth, "Idempotency-Key": "bench-replay"}))
            httpx.post(
                api_url + "/v1/payments",
                content=body,
                headers={**auth, "Idempotency-Key": "bench-replay"},
            )
            print(http_row("idempotent replay POST", api_url + "/v1/payments", script=str(replay)))
            read = log / "read.lua"
            read.write_text(_lua("GET", "", auth))
            print(http_row("list GET /v1/payments", api_url + "/v1/payments", script=str(read)))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
