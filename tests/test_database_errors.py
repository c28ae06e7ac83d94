"""What the services answer when the database goes away: the real exceptions asyncpg raises (a
backend terminated, a server shutting down, no writable host) are retryable `503`s, never 500s.
Found by campaign 2 (`tests/test_chaos_postgres.py`): Postgres killed under load answered some
requests 500."""

from __future__ import annotations

import asyncpg

from core import errors
from tessera.runtime.http import status_of, to_tessera_error


def _mapped(exc: Exception) -> tuple[int, str]:
    error = to_tessera_error(exc)
    return status_of(error), error.code


async def test_a_connection_lost_inside_a_transaction_is_a_503(pg_admin_url: str) -> None:
    """The chain asyncpg raises when a backend dies mid-transaction: the query fails
    (ConnectionDoesNotExistError, or InterfaceError if the close was seen first), then the
    transaction's exit cannot roll back on the dead connection and raises InterfaceError in its
    place. That InterfaceError was answered 500."""
    admin = await asyncpg.connect(pg_admin_url)
    victim = await asyncpg.connect(pg_admin_url)
    caught: Exception | None = None
    try:
        async with victim.transaction():
            await victim.execute("SELECT 1")
            await admin.execute("SELECT pg_terminate_backend($1)", victim.get_server_pid())
            await victim.execute("SELECT 2")
    except Exception as exc:  # what escapes the `async with`, as a handler sees it
        caught = exc
    finally:
        await admin.close()
        victim.terminate()
    assert isinstance(caught, asyncpg.InterfaceError)
    assert "underlying connection is closed" in str(caught)
    assert isinstance(to_tessera_error(caught), errors.ServiceUnavailable)
    assert _mapped(caught) == (503, "service_unavailable")


async def test_no_host_taking_writes_is_a_503(pg_admin_url: str) -> None:
    """A multi-host DSN while no host takes writes (mid-failover: the primary is gone, the
    standby not yet promoted) ends in TargetServerAttributeNotMatched, a 500 before. Shown
    here by asking the machine's primary for the attribute it lacks."""
    try:
        await asyncpg.connect(pg_admin_url + "?target_session_attrs=standby", timeout=5)
    except Exception as exc:
        caught = exc
    else:
        raise AssertionError("the primary was taken for a standby")
    assert isinstance(caught, asyncpg.exceptions.TargetServerAttributeNotMatched)
    assert _mapped(caught) == (503, "service_unavailable")


def test_a_program_error_from_the_driver_is_still_a_500() -> None:
    """Only connection failures are read out of the chain: a driver error that is a bug stays
    a 500, so clients do not retry it forever."""
    bug = asyncpg.InterfaceError("the server expects 2 arguments for this query, 1 was passed")
    assert _mapped(bug) == (500, "internal_error")


def test_a_pooled_connection_the_server_just_ended_is_a_503() -> None:
    """A pooled connection handed out between the server's FATAL (a shutdown, the postmaster
    killed) and the socket's close fails its first statement with asyncpg's protocol-state
    error (state 2: draining the server's error). Seen in `make chaos` at each failover, word
    for word, as a 500; it is the database going away, a 503. The same error with another
    operation in progress (two coroutines on one connection: a bug) stays a 500."""
    draining = asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )
    assert _mapped(draining) == (503, "service_unavailable")
    shared = asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (12) is in progress"
    )
    assert _mapped(shared) == (500, "internal_error")
