"""The whole stack on free ports (simulators, vault, API, optionally a worker), for `make bench`
and `make chaos`: one way to start it, so both measure the same thing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import ServiceProcess, free_port


@dataclass
class Stack:
    env: dict[str, str]
    urls: dict[str, str]
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def stop(self) -> None:
        """SIGTERM to every process still running, at once; each drains on its own."""
        running = [
            p for p in self.processes.values() if p.process is not None and p.process.poll() is None
        ]
        if running:
            with ThreadPoolExecutor(len(running)) as pool:
                list(pool.map(lambda process: process.stop(), running))

    def create_merchant(self, name: str, *configure: str) -> dict[str, str]:
        """`tessera merchants create` (and `configure`, if options are given), as operators do."""
        env = {**os.environ, **self.env}
        tessera = [sys.executable, "-m", "tessera.cli", "merchants"]
        created = subprocess.run(
            [*tessera, "create", "--name", name, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        merchant: dict[str, str] = json.loads(created.stdout)
        if configure:
            subprocess.run(
                [*tessera, "configure", "--merchant", merchant["merchant_id"], *configure],
                env=env,
                capture_output=True,
                check=True,
            )
        return merchant


def start_stack(
    base_env: dict[str, str],
    work: Path,
    *,
    worker: bool = False,
    extra: dict[str, str] | None = None,
) -> Stack:
    ports = {name: free_port() for name in ("psp_a", "psp_b", "vault", "api")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    destinations = {
        "psp_a": {
            "url": urls["psp_a"],
            "paths": ["/v1/authorizations"],
            "card_update_paths": ["/v1/account_updates/card"],
        },
        "psp_b": {
            "url": urls["psp_b"],
            "paths": ["/v1/payments"],
            "card_update_paths": ["/v1/cardUpdates/details"],
        },
    }
    env = {
        **base_env,
        "TESSERA_PSP_A_PORT": str(ports["psp_a"]),
        "TESSERA_PSP_B_PORT": str(ports["psp_b"]),
        "TESSERA_PSP_B_NOTIFY_URL": urls["api"] + "/v1/notifications/psp_b",
        "TESSERA_VAULT_PORT": str(ports["vault"]),
        "TESSERA_VAULT_FORWARD_DESTINATIONS": json.dumps(destinations),
        "TESSERA_API_PORT": str(ports["api"]),
        "TESSERA_API_VAULT_URL": urls["vault"],
        "TESSERA_API_PSP_A_URL": urls["psp_a"],
        "TESSERA_API_PSP_B_URL": urls["psp_b"],
        **(extra or {}),
    }
    stack = Stack(env, urls)
    wanted = [
        ("psp_a", "sandbox.psp_a", ports["psp_a"], [], "/healthz"),
        ("psp_b", "sandbox.psp_b", ports["psp_b"], [], "/healthz"),
        ("vault", "vault", ports["vault"], ["serve"], "/readyz"),
        ("api", "api", ports["api"], ["serve"], "/readyz"),
    ]
    if worker:
        wanted.append(("worker", "api", 0, ["worker"], ""))
    for name, module, port, args, _ in wanted:
        stack.processes[name] = ServiceProcess(module, env, port, work / f"{name}.log", args=args)
    try:
        # All at once: none needs another to start (the API reaches the vault and the
        # simulators only when a request comes), and Python's start-up is most of the wait.
        with ThreadPoolExecutor(len(wanted)) as pool:
            starting = [
                pool.submit(stack.processes[name].start, ready_path=ready, timeout=60)
                for name, _, _, _, ready in wanted
            ]
            for future in starting:
                future.result()
    except BaseException:
        stack.stop()
        raise
    return stack
