"""`make bench`: numbers, printed, never asserted.

The foundation's benchmark measures the per-request floor both services share (request-id and
metrics layer, JSON access log with redaction, the readiness round trip to Postgres and Redis)
and the pure-Python costs every request will pay (redaction of a log line, id generation, Luhn).
The payment and vault issues add their own rows. HTTP load comes from wrk (C, Debian's package),
pinned to the other core than the service; its CPU use is printed.
"""

from __future__ import annotations

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

from core.cards import luhn_valid
from core.ids import new_id
from core.redaction import redact
from tessera.devstack import StackConfig, service_env
from tests.support.processes import ServiceProcess, free_port

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
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("make bench needs wrk: apt-get install wrk")
    return found


def _ms(text: str) -> float:
    number = float(re.sub(r"[a-z]+$", "", text))
    unit = re.sub(r"^[0-9.]+", "", text)
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def http_row(name: str, url: str, seconds: int = 5, connections: int = 16) -> str:
    """wrk on core 1 (the service is pinned to core 0), keep-alive, after a 1 s warm-up."""
    wrk = wrk_binary()
    base = ["taskset", "-c", "1", wrk, "-t1", f"-c{connections}", "--latency"]
    subprocess.run([*base, "-d1s", url], check=True, capture_output=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([*base, f"-d{seconds}s", url], check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1])  # type: ignore[index]
    p50 = _ms(re.search(r"50%\s+(\S+)", out)[1])  # type: ignore[index]
    p99 = _ms(re.search(r"99%\s+(\S+)", out)[1])  # type: ignore[index]
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
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
