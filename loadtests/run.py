"""`make loadtest`: a short headless Locust run against `make up`, with a merchant of its own.

Creates a fresh merchant (so the business checks read this run's payments only), runs Locust
headless with the CSV, HTML and JSON results in loadtests/results/<timestamp>/, prints the
summary and exits with Locust's code (1 when a threshold or a business check failed).
Extra arguments go to Locust: `make loadtest ARGS="--processes 2 -u 40 -t 60s"`.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
API = os.environ.get("TESSERA_LOAD_API_URL", "http://127.0.0.1:8000")
VAULT = os.environ.get("TESSERA_LOAD_VAULT_URL", "http://127.0.0.1:8100")
DEFAULTS = ["-u", "20", "-r", "10", "-t", "30s"]


def dev_env() -> dict[str, str]:
    env = dict(os.environ)
    path = ROOT / ".run" / "dev.env"
    if path.exists():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.startswith("#"):
                env.setdefault(name.strip(), value.strip())
    return env


def main(argv: list[str]) -> int:
    try:
        ready = httpx.get(f"{API}/readyz", timeout=3).status_code == 200
    except httpx.HTTPError:
        ready = False
    if not ready:
        print(f"loadtest: nothing ready at {API}; start the stack with `make up` first")
        return 2
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    results = ROOT / "loadtests" / "results" / stamp
    results.mkdir(parents=True)
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "tessera.cli",
            "merchants",
            "create",
            "--name",
            f"load {stamp}",
            "--json",
        ],
        env=dev_env(),
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    merchant = json.loads(created.stdout)
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "--only-summary",
        "--host",
        API,
        "--vault-url",
        VAULT,
        "--secret-key",
        merchant["secret_key"],
        "--publishable-key",
        merchant["publishable_key"],
        "--csv",
        str(results / "stats"),
        "--html",
        str(results / "report.html"),
        "--json-file",
        str(results / "stats"),
        "--results-dir",
        str(results),
        *(argv or DEFAULTS),
    ]
    code = subprocess.run(command, cwd=ROOT, check=False).returncode
    summary = results / "summary.json"
    if summary.exists():
        print(summary.read_text())
    print(f"loadtest: results in {results.relative_to(ROOT)}/ (exit code {code})")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
