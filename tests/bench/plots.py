"""The benchmark's plots (matplotlib, PNG, no display): rate and p99 against concurrency, API
worker processes and payments table size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def _short(value: int) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g} M"
    return f"{value:g}"


def _rate_and_p99(
    path: Path, title: str, xlabel: str, xs: list[Any], rows: list[dict[str, Any]], log_x: bool
) -> Path:
    figure = Figure(figsize=(7, 4), dpi=110)  # no pyplot: no display, no global state
    rate_axis = figure.subplots()
    rate_axis.plot(xs, [r["rate"] for r in rows], "o-", color="tab:blue", label="payments/s")
    rate_axis.set_xlabel(xlabel)
    rate_axis.set_ylabel("authorize+capture payments/s", color="tab:blue")
    rate_axis.set_ylim(bottom=0)
    if log_x:
        rate_axis.set_xscale("symlog", linthresh=1)
    rate_axis.set_xticks(xs, [_short(x) for x in xs])
    latency_axis = rate_axis.twinx()
    latency_axis.plot(xs, [r["p99_ms"] for r in rows], "s--", color="tab:red", label="p99 ms")
    latency_axis.set_ylabel("p99 latency (ms)", color="tab:red")
    latency_axis.set_ylim(bottom=0)
    rate_axis.set_title(title)
    rate_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path


#: (file, title, x label, the results' key, each row's x field, symlog x axis)
PLOTS = (
    (
        "bench-concurrency.png",
        "Authorize+capture vs concurrent connections (1 API process)",
        "wrk connections",
        "payments.curve",
        "connections",
        False,
    ),
    (
        "bench-workers.png",
        "Authorize+capture vs API worker processes (2 cores)",
        "API worker processes",
        "workers",
        "workers",
        False,
    ),
    (
        "bench-table-size.png",
        "Authorize+capture vs rows already in the payments table",
        "payments table rows (symlog)",
        "table_size",
        "rows",
        True,
    ),
)


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    paths = []
    for name, title, xlabel, key, x_field, log_x in PLOTS:
        rows: Any = results
        for part in key.split("."):
            rows = rows[part]
        xs = [r[x_field] for r in rows]
        paths.append(_rate_and_p99(out / name, title, xlabel, xs, rows, log_x))
    return paths
