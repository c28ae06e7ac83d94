"""One module per evidence check, each with `CONTROL` (a `Control`) and `async def run(ctx)`.

`CHECKS` is the order the report lists them in.
"""

from __future__ import annotations

CHECKS: tuple[str, ...] = (
    "audit_log",
    "pan_outside_vault",
    "cvc",
    "least_privilege",
    "keys",
    "retention",
    "payment_page_scripts",
    "segmentation",
    "software_inventory",
    "critical_alerts",
)
