"""`make fuzz`: Schemathesis against the running stack (`make up`): both services' OpenAPI
documents, every phase (examples, coverage, fuzzing, and stateful along the documents' links)
and every check, `FUZZ_EXAMPLES` examples per operation (default 200). The API is fuzzed as a
merchant made for the run; the vault with the stack's own credentials (`.run/dev.env`).

Prints, per service: operations tested, requests by phase and by status class, checks run and
failed, unique failures; exits 1 if there is any failure, a 5xx or an untested operation.
Schemathesis' own report (its output, JSON and NDJSON) is kept in a directory it names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tessera.devstack import StackConfig, service_env
from tests.support import fuzzing
from tests.support.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("api", "vault")
#: The dev stack's allowlisted destination (tessera.devstack) and a URL the API accepts for
#: webhook endpoints in development (loopback; nothing listens on port 9).
FORWARD = "psp_a /v1/authorizations"
WEBHOOK_URL = "http://127.0.0.1:9/fuzz-hook"


@dataclass
class Figures:
    """What one Schemathesis run did, from its JSON and NDJSON reports."""

    service: str
    operations: int = 0
    tested: int = 0
    seconds: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)  # by phase
    statuses: Counter[str] = field(default_factory=Counter)  # 2xx, 4xx, ...
    checks: Counter[str] = field(default_factory=Counter)  # success, failure, ...
    failures: list[str] = field(default_factory=list)
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.exit_code == 0
            and not self.failures
            and not self.statuses["5xx"]
            and self.tested == self.operations > 0
        )


def read_reports(service: str, directory: Path, exit_code: int) -> Figures:
    figures = Figures(service, exit_code=exit_code)
    report = json.loads(next(directory.glob("*.json")).read_text())
    figures.operations = report["operations"]["selected"]
    figures.tested = report["operations"]["tested"]
    figures.seconds = report["running_time"]
    figures.failures = [
        f"{group['code']} {group['title']} ({group['count']}x): {', '.join(group['operations'])}"
        for group in report["failures"]
    ] + [f"error: {group['title']} ({group['count']}x)" for group in report["errors"]]
    with next(directory.glob("*.ndjson")).open() as events:
        for line in events:
            event = json.loads(line).get("ScenarioFinished")
            if event is None:
                continue
            recorder = event["recorder"]
            for interaction in recorder.get("interactions", {}).values():
                status = (interaction.get("response") or {}).get("status_code")
                figures.requests[event["phase"]] += 1
                figures.statuses[f"{status // 100}xx" if status else "no answer"] += 1
            for results in recorder.get("checks", {}).values():
                figures.checks.update(result["status"] for result in results)
    return figures


def run_schemathesis(
    service: str, url: str, env: dict[str, str], examples: int, work: Path
) -> Figures:
    directory = work / service
    directory.mkdir()
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--no-color",
        "--config-file",
        fuzzing.CONFIG_PATH,
        "run",
        f"{url}/schema/openapi.json",
        "--max-examples",
        str(examples),
        "--report",
        "json,ndjson",
        "--report-dir",
        str(directory),
    ]
    print(f"fuzz: {service} at {url}, {examples} examples per operation ...", flush=True)
    with (directory / "output.txt").open("w") as output:
        finished = subprocess.run(
            command, env=env, cwd=directory, stdout=output, stderr=subprocess.STDOUT, check=False
        )
    return read_reports(service, directory, finished.returncode)


def print_figures(all_figures: list[Figures], work: Path) -> None:
    print("\nschemathesis against the running stack")
    for figures in all_figures:
        print(
            f"  {figures.service}: {figures.tested}/{figures.operations} operations tested, "
            f"{sum(figures.requests.values())} requests in {figures.seconds:.0f} s "
            f"({', '.join(f'{phase} {n}' for phase, n in sorted(figures.requests.items()))})"
        )
        print(
            "    responses: "
            + ", ".join(f"{status} {n}" for status, n in sorted(figures.statuses.items()))
        )
        print(
            "    checks: "
            + ", ".join(f"{status} {n}" for status, n in sorted(figures.checks.items()))
            + f"; unique failures {len(figures.failures)}"
        )
        for failure in figures.failures:
            print(f"      FAILURE {failure}")
    verdict = "ok" if all(f.ok for f in all_figures) else "FAILED"
    print(f"  verdict: {verdict}; Schemathesis' output and reports: {work}")


def remove_webhook_endpoints(api_url: str, secret_key: str) -> None:
    """The run's endpoints (on port 9) would be retried by the stack's worker for days."""
    auth = {"authorization": f"Bearer {secret_key}"}
    for endpoint in httpx.get(api_url + "/v1/webhook_endpoints", headers=auth).json()["data"]:
        httpx.delete(f"{api_url}/v1/webhook_endpoints/{endpoint['id']}", headers=auth)


def main() -> int:
    examples = int(os.environ.get("FUZZ_EXAMPLES", "200"))
    config = StackConfig.from_env()
    env = service_env(config)
    urls = {
        "api": f"http://{config.host}:{config.api_port}",
        "vault": f"http://{config.host}:{config.vault_port}",
    }
    for name, url in urls.items():
        try:
            ready = httpx.get(url + "/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            ready = False
        if not ready:
            print(f"fuzz: the {name} does not answer at {url}: start the stack with `make up`")
            return 2
    merchant: dict[str, Any] = Stack(env, urls).create_merchant(f"Fuzz {time.strftime('%F %T')}")
    fuzz_env = {
        **env,
        "PYTHONPATH": str(ROOT),
        "SCHEMATHESIS_HOOKS": "tests.support.fuzzing",
        "TESSERA_FUZZ_SECRET_KEY": merchant["secret_key"],
        "TESSERA_FUZZ_PUBLISHABLE_KEY": merchant["publishable_key"],
        "TESSERA_FUZZ_MERCHANT": merchant["merchant_id"],
        "TESSERA_FUZZ_SERVICE_TOKEN": env["TESSERA_VAULT_SERVICE_TOKEN"],
        "TESSERA_FUZZ_ADMIN_TOKEN": env["TESSERA_VAULT_ADMIN_TOKEN"],
        "TESSERA_FUZZ_VAULT_URL": urls["vault"],
        "TESSERA_FUZZ_FORWARD": FORWARD,
        "TESSERA_FUZZ_WEBHOOK_URL": WEBHOOK_URL,
    }
    assert set(fuzzing.FUZZ_ENV) <= set(fuzz_env)
    work = Path(tempfile.mkdtemp(prefix="tessera-fuzz-"))
    try:
        figures = [
            run_schemathesis(service, urls[service], fuzz_env, examples, work)
            for service in SERVICES
        ]
    finally:
        remove_webhook_endpoints(urls["api"], merchant["secret_key"])
    print_figures(figures, work)
    return 0 if all(f.ok for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
