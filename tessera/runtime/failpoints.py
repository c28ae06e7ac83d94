"""Failpoints: named places where a test can make the process die, to prove recovery.

`TESSERA_FAILPOINTS=after_processor_call` makes the process SIGKILL itself when it reaches that
point. When the variable is unset (always, outside tests), `failpoint` is a function that does
nothing, chosen once at import.
"""

from __future__ import annotations

import os
import signal

_ARMED = frozenset(p for p in os.environ.get("TESSERA_FAILPOINTS", "").split(",") if p)


def _kill_if_armed(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)


def _nothing(name: str) -> None:
    return None


failpoint = _kill_if_armed if _ARMED else _nothing
