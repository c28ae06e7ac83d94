"""`make bench`: what one 2-core machine carries, with the ceilings it is measured against.

Everything runs on this machine, as the issue asks: Postgres, Redis, the vault, the API, the PSP
simulators and the load generator. HTTP load comes from wrk (C, Debian's package; one thread, or
two from 256 connections). The rows "at 70 % of saturation" offer a fixed rate: a wrk script
schedules each request (wrk2's idea, see `_lua`), so slow answers do not lower the offered load.
(A Python open-loop generator was tried first: at 200 requests/s it used 82 % of a core and
became the bottleneck.) Each row prints the generator's own CPU use. Nothing here asserts.

Settings (environment): BENCH_SECONDS (per wrk run, default 5), BENCH_SIZES (payments table sizes,
default 0,1000000,10000000), BENCH_WORKERS (API processes, default 1,2,4), BENCH_HELD (in-flight
payments against the slow PSP, default 1000), BENCH_OUT (default docs/perf).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from core.cards import luhn_valid
from core.ids import new_id
from core.redaction import redact
from tests.bench import cpu, database
from tests.bench.plots import write_plots
from tests.support.processes import ROOT, ServiceProcess, free_port
from tests.support.stack import Stack, start_stack

LINE = (
    '{"method": "POST", "route": "/v1/payments/{id}/capture", "status": 200, '
    '"duration_ms": 3.2, "request_id": "req_01m89x6mx8w8b3hsan3qvysbvk", "amount": 1050}'
)
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "0,1000000,10000000").split(",") if s]
WORKERS = [int(w) for w in os.environ.get("BENCH_WORKERS", "1,2,4").split(",") if w]
HELD = int(os.environ.get("BENCH_HELD", "1000"))
OUT = Path(os.environ.get("BENCH_OUT", str(ROOT / "docs" / "perf")))
SWEEP = (4, 8, 16, 32, 64)
#: PSP A and B answer after 300 ± 100 ms (uniform): median 300, 99th percentile 398.
PSP_LATENCY = {"latency_ms": 300, "jitter_ms": 100, "latency_distribution": "uniform"}
PSP_P50_MS, PSP_P99_MS = 300.0, 398.0


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
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _field(pattern: str, output: str) -> str:
    found = re.search(pattern, output, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"wrk's output has no {pattern!r}:\n{output}")
    return found[1]


def wrk(
    url: str,
    script: str | None = None,
    *,
    connections: int = 16,
    seconds: int = SECONDS,
    timeout: int = 10,
    warm: bool = True,
) -> dict[str, Any]:
    """One wrk run (after a 1 s warm-up): rate, p50, p99, non-2xx, errors, generator CPU."""
    threads = 2 if connections >= 256 else 1
    base = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"--timeout={timeout}s", "--latency"]
    if script:
        base += ["-s", script]
    if warm:
        nonce = secrets.token_hex(6)
        subprocess.run([*base, "-d1s", url, "--", nonce], check=True, capture_output=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    nonce = secrets.token_hex(6)
    out = subprocess.run(
        [*base, f"-d{seconds}s", url, "--", nonce], check=True, capture_output=True, text=True
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "connections": connections,
        "rate": float(_field(r"Requests/sec:\s+([0-9.]+)", out)),
        "p50_ms": _ms(_field(r"^\s+50%\s+(\S+)\s*$", out)),
        "p99_ms": _ms(_field(r"^\s+99%\s+(\S+)\s*$", out)),
        "non_2xx": int(non2xx[1]) if non2xx else 0,
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
        "generator_cpu_percent": cpu / seconds * 100,
        "statuses": {m[1]: int(m[2]) for m in re.finditer(r"^status (\d+) (\d+)$", out, re.M)},
    }


def paced(
    url: str,
    rate: float,
    seconds: int,
    headers: dict[str, str],
    body: str,
    work: Path,
    connections: int = 256,
) -> dict[str, Any]:
    """wrk at a fixed offered rate of new payments (see `_lua`); the row says what was offered."""
    threads = 2 if connections >= 256 else 1
    script = work / "paced.lua"
    script.write_text(_lua("POST", body, headers, unique_key=True, rate_per_thread=rate / threads))
    row = wrk(url, str(script), connections=connections, seconds=seconds, timeout=60)
    row["offered_per_second"] = rate
    return row


def show(name: str, row: dict[str, Any]) -> None:
    rate = row["rate"]
    extra = ""
    if "connections" in row:
        extra += f"  c={row['connections']}"
    if "offered_per_second" in row:
        extra += f"  offered {row['offered_per_second']:.0f}/s"
    bad = row.get("non_2xx", 0) + row.get("socket_errors", 0)
    odd = {k: v for k, v in row.get("statuses", {}).items() if not k.startswith("2")}
    if odd:
        extra += f"  statuses {odd}"
    print(
        f"  {name:<38} {rate:>8.0f} /s  p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms"
        f"  errors {bad}  generator CPU {row['generator_cpu_percent']:.0f}%{extra}",
        flush=True,
    )


#: wrk's LuaJIT reads the monotonic clock through FFI, for the paced (open-loop) runs.
_CLOCK = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local bench_ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, bench_ts)
  return tonumber(bench_ts.tv_sec) * 1000 + tonumber(bench_ts.tv_nsec) / 1e6
end
"""


def _lua(
    method: str,
    body: str,
    headers: dict[str, str],
    unique_key: bool = False,
    rate_per_thread: float | None = None,
) -> str:
    """A wrk script. `unique_key`: every request a new Idempotency-Key (a new payment).
    `rate_per_thread`: requests leave on a fixed schedule (wrk2's idea): each connection that
    is free takes the next slot and waits for it, so the offered rate does not depend on how
    fast answers come, as long as enough connections are free."""
    lines = [f'wrk.method = "{method}"', f"wrk.body = {json.dumps(body)}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    # Keys are made of a nonce per wrk run and the thread's id: LuaJIT seeds math.random alike in
    # every thread and every run, and keys that repeat across runs turn new payments into
    # replays (a first version of this benchmark measured replays that way). Each thread counts
    # the statuses it saw; `done` prints them all, so every row says what its errors were.
    lines += [
        "local threads = {}",
        "setup = function(thread)",
        "  table.insert(threads, thread)",
        "  thread:set('tid', #threads)",
        "end",
        "init = function(args)",
        "  statuses = {}",
        "  prefix = args[1] .. '-' .. tostring(tid)",  # a nonce per wrk run, from `wrk`
        "end",
        "response = function(status, headers, body)",
        "  statuses[status] = (statuses[status] or 0) + 1",
        "end",
        "done = function(summary, latency, requests)",
        "  local total = {}",
        "  for _, thread in ipairs(threads) do",
        "    for status, n in pairs(thread:get('statuses')) do",
        "      total[status] = (total[status] or 0) + n",
        "    end",
        "  end",
        "  for status, n in pairs(total) do",
        "    io.write(string.format('status %d %d\\n', status, n))",
        "  end",
        "end",
    ]
    if unique_key:
        lines += [
            "local counter = 0",
            "request = function()",
            "  counter = counter + 1",
            '  wrk.headers["Idempotency-Key"] = "bench-" .. prefix .. "-" .. counter',
            "  return wrk.format()",
            "end",
        ]
    if rate_per_thread is not None:
        lines += [
            _CLOCK,
            f"local interval = {1000.0 / rate_per_thread!r}",
            "local next_slot = nil",
            "delay = function()",
            "  local now = now_ms()",
            "  if next_slot == nil then next_slot = now end",
            "  local wait = next_slot - now",
            "  next_slot = next_slot + interval",
            "  if wait < 0 then return 0 end",
            "  return math.floor(wait)",
            "end",
        ]
    return "\n".join(lines) + "\n"


def core_rows() -> dict[str, float]:
    pan = "4242424242424242"
    with_pan = LINE.replace("1050", pan)
    rows = {
        "redact_line_per_second": per_second(lambda: redact(LINE)),
        "redact_line_with_card_per_second": per_second(lambda: redact(with_pan)),
        "new_id_per_second": per_second(lambda: new_id("pay")),
        "luhn_per_second": per_second(lambda: luhn_valid(pan)),
    }
    print("core (one process, one core)")
    for name, value in rows.items():
        print(f"  {name:<38} {value:>12,.0f}")
    return rows


@contextmanager
def running(stack_env: dict[str, str], work: Path, **extra: str) -> Iterator[Stack]:
    stack = start_stack(stack_env, work, extra=extra)
    try:
        yield stack
    finally:
        stack.stop()


class Bench:
    def __init__(self, env: dict[str, str], work: Path) -> None:
        self.env = env
        self.work = work
        self.results: dict[str, Any] = {}

    def script(self, name: str, text: str) -> str:
        path = self.work / f"{name}.lua"
        path.write_text(text)
        return str(path)

    def floor(self) -> dict[str, Any]:
        """The bare Litestar endpoint with one durable INSERT, at its best concurrency."""
        port = free_port()
        process = ServiceProcess(
            "tests.bench.floor",
            self.env,
            port,
            self.work / "floor.log",
            args=[str(port), self.env["TESSERA_API_MIGRATION_URL"]],
        )
        process.start(ready_path="/healthz")
        try:
            lua = self.script(
                "floor", _lua("POST", '{"amount": 1050}', {"content-type": "application/json"})
            )
            curve = [wrk(process.url + "/floor", lua, connections=c) for c in SWEEP]
        finally:
            process.stop()
        best = max(curve, key=lambda r: r["rate"])
        show("floor: Litestar + 1 INSERT (best)", best)
        return {"best": best, "curve": curve}

    def chain_floor(self) -> dict[str, Any]:
        """Tessera's shape at its floor: three bare hops (API with one INSERT -> vault with one
        INSERT -> PSP), one process each, as a payment crosses them."""
        hops: list[ServiceProcess] = []
        try:
            next_url = None
            for name, dsn in (
                ("psp", "-"),
                ("vault", self.env["TESSERA_VAULT_MIGRATION_URL"]),
                ("api", self.env["TESSERA_API_MIGRATION_URL"]),
            ):
                port = free_port()
                args = [str(port), dsn] + ([next_url] if next_url else [])
                hop = ServiceProcess(
                    "tests.bench.floor", self.env, port, self.work / f"chain-{name}.log", args=args
                )
                hops.append(hop.start(ready_path="/healthz"))
                next_url = hop.url + "/floor"
            lua = self.script(
                "chain", _lua("POST", '{"amount": 1050}', {"content-type": "application/json"})
            )
            curve = [wrk(hops[-1].url + "/floor", lua, connections=c) for c in SWEEP]
        finally:
            for hop in hops:
                hop.stop()
        best = max(curve, key=lambda r: r["rate"])
        show("chain floor: 3 hops, 2 INSERTs (best)", best)
        return {"best": best, "curve": curve}

    def payments(self, stack: Stack, merchant: dict[str, str], token: str) -> dict[str, Any]:
        api = stack.urls["api"]
        auth = {
            "Authorization": f"Bearer {merchant['secret_key']}",
            "Content-Type": "application/json",
        }
        body = json.dumps({"amount": 1050, "currency": "EUR", "token": token, "capture": True})
        pay = self.script("pay", _lua("POST", body, auth, unique_key=True))
        curve = []
        for connections in SWEEP:
            row = wrk(api + "/v1/payments", pay, connections=connections)
            show("authorize+capture (saturation sweep)", row)
            curve.append(row)
        best = max(curve, key=lambda r: r["rate"])
        at_70 = paced(
            api + "/v1/payments", 0.7 * best["rate"], max(10, SECONDS * 2), auth, body, self.work
        )
        show("authorize+capture at 70% of saturation", at_70)
        breakdown = self.cpu_per_payment(stack, pay, int(best["connections"]))
        return {
            "saturation": best,
            "curve": curve,
            "at_70": at_70,
            "cpu_ms_per_payment": breakdown,
            "body": body,
            "auth": auth,
        }

    def cpu_per_payment(self, stack: Stack, script: str, connections: int) -> dict[str, float]:
        """Where one payment's CPU goes, at saturation: milliseconds by process."""
        services = {
            name: p.process.pid for name, p in stack.processes.items() if p.process is not None
        }
        before = cpu.snapshot(services)
        row = wrk(stack.urls["api"] + "/v1/payments", script, connections=connections, warm=False)
        after = cpu.snapshot(services)
        made = row["rate"] * SECONDS
        breakdown = cpu.per_item(before, after, made)
        breakdown["wrk"] = row["generator_cpu_percent"] / 100 * SECONDS * 1000 / made
        total = sum(breakdown.values())
        parts = ", ".join(f"{name} {ms:.2f}" for name, ms in breakdown.items())
        print(f"  CPU ms per payment: {parts}; total {total:.2f} ms", flush=True)
        print(
            f"  {'':<38} on {os.cpu_count()} cores that caps the rate at "
            f"{(os.cpu_count() or 1) * 1000 / total:.0f} payments/s",
            flush=True,
        )
        breakdown["total"] = total
        return breakdown

    def slow_psp(self, stack: Stack, pay: dict[str, Any], saturation: float) -> dict[str, Any]:
        """The PSPs at 300 ± 100 ms: hold HELD payments in flight, then Tessera's added latency."""
        for name in ("psp_a", "psp_b"):
            httpx.post(stack.urls[name] + "/admin/config", json=PSP_LATENCY).raise_for_status()
        try:
            lua = self.script("pay_slow", _lua("POST", pay["body"], pay["auth"], unique_key=True))
            # No warm-up run here: a thousand requests it left behind would still be worked on
            # during the measured run, uncounted.
            held = wrk(
                stack.urls["api"] + "/v1/payments",
                lua,
                connections=HELD,
                seconds=max(30, SECONDS * 6),
                timeout=60,
                warm=False,
            )
            show(f"slow PSP, {HELD} payments in flight", held)
            drained = self.drain(stack, pay)
            print(f"  {'':<38} (the API drained the run's abandoned requests in {drained:.0f} s)")
            rate = 0.7 * min(saturation, held["rate"])
            at_70 = paced(
                stack.urls["api"] + "/v1/payments",
                rate,
                max(10, SECONDS * 2),
                pay["auth"],
                pay["body"],
                self.work,
                connections=512,
            )
            show("slow PSP, at 70% of saturation", at_70)
        finally:
            for name in ("psp_a", "psp_b"):
                httpx.post(
                    stack.urls[name] + "/admin/config", json={"latency_ms": 0, "jitter_ms": 0}
                ).raise_for_status()
        return {
            "psp_latency": PSP_LATENCY,
            "held": held,
            "at_70": at_70,
            "added_p50_ms": at_70["p50_ms"] - PSP_P50_MS,
            "added_p99_ms": at_70["p99_ms"] - PSP_P99_MS,
        }

    def drain(self, stack: Stack, pay: dict[str, Any], limit: float = 180.0) -> float:
        """Wait until the API has worked off what an ended run left in flight (wrk closes its
        connections; the API still finishes those payments): until one payment takes < 1 s."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            sent = time.monotonic()
            httpx.post(
                stack.urls["api"] + "/v1/payments",
                content=pay["body"],
                headers={**pay["auth"], "Idempotency-Key": f"drain-{secrets.token_hex(8)}"},
                timeout=120,
            )
            if time.monotonic() - sent < 1.0:
                break
        return time.monotonic() - started

    def reads_and_replays(
        self, stack: Stack, merchant: dict[str, str], token: str, pay: dict[str, Any]
    ) -> dict[str, Any]:
        api, auth = stack.urls["api"], pay["auth"]
        created = httpx.post(
            api + "/v1/payments",
            content=pay["body"],
            headers={**auth, "Idempotency-Key": "bench-replay"},
        )
        payment_id = created.json()["id"]
        replay = self.script(
            "replay", _lua("POST", pay["body"], {**auth, "Idempotency-Key": "bench-replay"})
        )
        read = self.script("read", _lua("GET", "", auth))
        rows = {
            "replays": wrk(api + "/v1/payments", replay, connections=32),
            "reads": wrk(api + f"/v1/payments/{payment_id}", read, connections=32),
            "lists": wrk(api + "/v1/payments?limit=10", read, connections=32),
        }
        show("idempotent replay POST /v1/payments", rows["replays"])
        show("read GET /v1/payments/{id}", rows["reads"])
        show("list GET /v1/payments?limit=10", rows["lists"])
        vault = stack.urls["vault"]
        card = '{"number": "4242424242424242", "exp_month": 12, "exp_year": 2040}'
        tokenize = self.script(
            "tokenize",
            _lua(
                "POST",
                card,
                {
                    "Authorization": f"Bearer {merchant['publishable_key']}",
                    "Content-Type": "application/json",
                },
            ),
        )
        before = _kms_calls(vault)
        rows["tokenizations"] = wrk(vault + "/v1/tokens", tokenize, connections=32)
        calls = _kms_calls(vault) - before
        made = rows["tokenizations"]["rate"] * (SECONDS + 1)  # the warm-up second counts too
        rows["tokenizations"]["kms_calls"] = calls
        rows["tokenizations"]["kms_calls_per_10k"] = calls / made * 10_000 if made else 0.0
        show("tokenize POST /v1/tokens (vault)", rows["tokenizations"])
        print(
            f"  {'':<38} KMS calls during the run: {calls:.0f} "
            f"({rows['tokenizations']['kms_calls_per_10k']:.2f} per 10,000 tokenizations)"
        )
        return rows

    def sweep_rate(self, stack: Stack, pay: dict[str, Any], connections: int) -> dict[str, Any]:
        lua = self.script("pay_sweep", _lua("POST", pay["body"], pay["auth"], unique_key=True))
        return wrk(stack.urls["api"] + "/v1/payments", lua, connections=connections)


def _kms_calls(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vault_kms_calls "):
            return float(line.split()[1])
    return float("nan")


def _token(stack: Stack, merchant: dict[str, str]) -> str:
    card = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2040}
    response = httpx.post(
        stack.urls["vault"] + "/v1/tokens",
        json=card,
        headers={"authorization": f"Bearer {merchant['publishable_key']}"},
    )
    response.raise_for_status()
    token: str = response.json()["id"]
    return token


def main() -> None:
    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {"core": core_rows()}
    config, env = database.fresh_bench_env()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench = Bench(env, work)
        print(f"\nreference ceilings (wrk {SECONDS} s per run, connections {SWEEP})", flush=True)
        results["floor"] = bench.floor()
        results["chain_floor"] = bench.chain_floor()

        print(
            "\nwhole stack: API (1 process), vault, PSP A+B simulators, Postgres, Redis", flush=True
        )
        with running(env, work) as stack:
            merchant = stack.create_merchant("Bench")
            token = _token(stack, merchant)
            pgbench_clients = 16
            results["pgbench"] = database.run_pgbench(
                config.pg_admin_url,
                merchant["merchant_id"],
                token,
                pgbench_clients,
                max(10, SECONDS * 2),
            )
            pg = results["pgbench"]
            print(
                f"  {'pgbench: one payment SQL':<38} {pg['payments_per_second']:>8.0f} /s  "
                f"({pg['statements_per_payment']:.0f} statements in 2 transactions, "
                f"{pgbench_clients} clients, failed {pg['failed']:.0f})",
                flush=True,
            )
            pay = bench.payments(stack, merchant, token)
            results["payments"] = {k: v for k, v in pay.items() if k not in ("body", "auth")}
            saturation = pay["saturation"]["rate"]
            results["slow_psp"] = bench.slow_psp(stack, pay, saturation)
            results.update(bench.reads_and_replays(stack, merchant, token, pay))
            best_connections = int(pay["saturation"]["connections"])

            print(
                f"\npayments table size (filler merchant, COPY; c={best_connections})", flush=True
            )
            filler = new_id("mer")
            sizes = []
            for rows in SIZES:
                added = database.seed_payments(config.pg_admin_url, filler, rows)
                row = bench.sweep_rate(stack, pay, best_connections)
                row["rows"] = rows
                sizes.append(row)
                show(f"{rows:>11,} filler rows (+{added:,} copied)", row)
            results["table_size"] = sizes

        print(f"\nAPI worker processes (c={best_connections})", flush=True)
        workers = []
        for count in WORKERS:
            with running(env, work, TESSERA_API_WORKERS=str(count)) as stack:
                merchant = stack.create_merchant(f"Bench {count}")
                pay_w = {
                    "body": json.dumps(
                        {
                            "amount": 1050,
                            "currency": "EUR",
                            "token": _token(stack, merchant),
                            "capture": True,
                        }
                    ),
                    "auth": {
                        "Authorization": f"Bearer {merchant['secret_key']}",
                        "Content-Type": "application/json",
                    },
                }
                row = bench.sweep_rate(stack, pay_w, best_connections)
                row["workers"] = count
                workers.append(row)
                show(f"{count} API worker process(es)", row)
        results["workers"] = workers

    floor_rate = results["floor"]["best"]["rate"]
    results["ratios"] = {
        "of_floor": saturation / floor_rate,
        "of_pgbench": saturation / results["pgbench"]["payments_per_second"],
        "of_chain_floor": saturation / results["chain_floor"]["best"]["rate"],
    }
    results["machine"] = {
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "started": started.isoformat(timespec="seconds"),
        "seconds_per_run": SECONDS,
    }
    print("\nsummary")
    print(f"  authorize+capture at saturation      {saturation:8.0f} /s")
    at_70 = results["payments"]["at_70"]
    print(f"  ... at 70%: p50 {at_70['p50_ms']:.1f} ms, p99 {at_70['p99_ms']:.1f} ms")
    print(f"  share of the Litestar floor          {results['ratios']['of_floor']:8.0%}")
    print(f"  share of pgbench (payment SQL)       {results['ratios']['of_pgbench']:8.0%}")
    print(f"  share of the 3-hop chain floor       {results['ratios']['of_chain_floor']:8.0%}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    for path in write_plots(results, OUT):
        print(f"  wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(f"  wrote {OUT / 'bench.json'}")
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
