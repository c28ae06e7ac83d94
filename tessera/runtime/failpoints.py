"""Failpoints: named places where a test can make the process die, to prove recovery.

`TESSERA_FAILPOINTS=after_processor_call` makes the process SIGKILL itself when it reaches that
point (several names: comma-separated). When the variable is unset (always, outside tests),
`failpoint` is a function that does nothing and `transaction` is the connection's own
transaction, both chosen once at import: the hot path pays one extra call, nothing more.

`transaction(conn, name)` gives every transaction three points around its COMMIT:
`<name>_before_commit` (the writes are done, COMMIT not sent), `<name>_during_commit` (COMMIT
sent, its answer never read) and `<name>_after_commit` (committed). Before dying, a failpoint
writes one JSON line to stderr, `{"failpoint": name, "xid": ...}`, with the transaction's id at
the commit points, so a test can ask Postgres `pg_xact_status(xid)` whether the write happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, NoReturn

_ARMED = frozenset(p for p in os.environ.get("TESSERA_FAILPOINTS", "").split(",") if p)
_COMMIT_POINTS = ("before_commit", "during_commit", "after_commit")
#: The COMMIT a `during_commit` point sent and never waited for (kept from the collector).
_SENT: set[asyncio.Future[Any]] = set()


def _die(name: str, xid: str | None = None) -> NoReturn:
    """Say where, for the test's log, then die as a power cut would: no cleanup, no goodbye."""
    line = json.dumps({"failpoint": name, "xid": xid, "pid": os.getpid()}) + "\n"
    os.write(2, line.encode())
    os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(137)  # not reached: SIGKILL cannot be caught


#: `name:stop` freezes the process at that point instead (SIGSTOP to itself) until someone sends
#: SIGCONT: a lease holder paused mid-request, as a long GC pause or a stalled VM leaves one.
_STOPS = frozenset(p.removesuffix(":stop") for p in _ARMED if p.endswith(":stop"))


def _kill_if_armed(name: str) -> None:
    if name in _STOPS:
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if name in _ARMED:
        _die(name)


def _nothing(name: str) -> None:
    return None


def _plain_transaction(conn: Any, name: str) -> AbstractAsyncContextManager[Any]:
    plain: AbstractAsyncContextManager[Any] = conn.transaction()
    return plain


@asynccontextmanager
async def _armed_transaction(conn: Any, name: str) -> AsyncIterator[None]:
    """The connection's transaction, with the commit points of `name` when they are armed."""
    before, during, after = (f"{name}_{point}" in _ARMED for point in _COMMIT_POINTS)
    if not (before or during or after):
        async with conn.transaction():
            yield
        return
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    except BaseException:
        await transaction.rollback()
        raise
    xid = str(await conn.fetchval("SELECT pg_current_xact_id()::text"))
    if before:
        _die(f"{name}_before_commit", xid)
    if during:
        # COMMIT goes out on the socket (asyncpg writes before it first waits); its answer is
        # never read. Postgres may or may not have committed: only pg_xact_status can say.
        _SENT.add(asyncio.ensure_future(conn.execute("COMMIT")))
        await asyncio.sleep(0)
        _die(f"{name}_during_commit", xid)
    await transaction.commit()
    if after:
        _die(f"{name}_after_commit", xid)


failpoint = _kill_if_armed if _ARMED else _nothing
transaction = _armed_transaction if _ARMED else _plain_transaction
