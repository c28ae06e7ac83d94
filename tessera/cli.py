"""The `tessera` command: one entry point that hands each subcommand to its owner.

This is the composition root of the command line, the one module allowed to know both
services; each service also runs alone as `python -m api ...` / `python -m vault ...` (which is
what their container images do, so the vault's image carries no API code).
"""

from __future__ import annotations

import sys

USAGE = """usage: tessera COMMAND ...

  dev run|up|down|setup       the local development stack (what `make run/up/down` call)
  migrate api|vault           apply a service's migrations (as its owner role)
  serve api|vault|psp-a       serve one process in the foreground
  merchants create|roll-key|configure   merchants (API and vault) and their routing
  routing simulate --traffic FILE      the router against always-A / always-B (needs make up)
  recovery simulate --seed N --customers N   learned vs fixed retry schedule (offline)
  worker                      reconciler, completer, expiry, webhooks (make run/up start one)
  ledger check                prove the ledger balances and matches the payments table
  pci evidence --out DIR      the assessor's kit: PCI DSS evidence (exit 1 if a control fails)
  api ...                     any `python -m api` command
  vault ...                   any `python -m vault` command
"""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "dev":
        from tessera import devstack

        raise SystemExit(devstack.main(rest))
    if command in ("migrate", "serve") and rest:
        target, extra = rest[0], rest[1:]
        if target == "psp-a" and command == "serve":
            from sandbox import psp_a

            psp_a.main()
            return
        if target in ("api", "vault"):
            _service(target, [command, *extra])
            return
    if command == "pci":
        from tessera.pci.evidence import main as pci_main

        raise SystemExit(pci_main(rest))
    if command in ("merchants", "routing", "recovery", "worker", "ledger"):
        _service("api", [command, *rest])
        return
    if command in ("api", "vault"):
        _service(command, rest)
        return
    print(USAGE, file=sys.stderr)
    raise SystemExit(2)


def _service(name: str, argv: list[str]) -> None:
    if name == "api":
        from api.cli import main as api_main

        api_main(argv)
    else:
        from vault.cli import main as vault_main

        vault_main(argv)


if __name__ == "__main__":
    main()
