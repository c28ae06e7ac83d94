"""CPU time by process, read from /proc, so the benchmark can say where each payment's CPU goes
(the API, the vault, the simulators, Postgres, Redis) on a machine where they all share 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / TICKS


def _descendants(pid: int) -> list[int]:
    found = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        found += _descendants(int(child))
    return found


def _by_name(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def snapshot(services: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each service (with its worker children), Postgres and Redis."""
    totals = {
        name: sum(_cpu_seconds(p) for p in _descendants(pid)) for name, pid in services.items()
    }
    # Postgres backends come and go with connections; the pools keep theirs for the run.
    totals["postgres"] = sum(_cpu_seconds(p) for p in _by_name("postgres"))
    totals["redis"] = sum(_cpu_seconds(p) for p in _by_name("redis-server"))
    return totals


def per_item(before: dict[str, float], after: dict[str, float], items: float) -> dict[str, float]:
    """Milliseconds of CPU per item (payment, request) by process."""
    if items <= 0:
        return {}
    return {name: (after[name] - before.get(name, 0.0)) * 1000 / items for name in after}
