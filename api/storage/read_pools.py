"""What may read a replica: the one place that decides it (issue 11, "Past one machine" (2))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ListReads:
    """The pool list queries read: the replica when `TESSERA_API_READ_DATABASE_URL` names one,
    else the primary.

    Only three reads take it, and they decide nothing: `GET /v1/payments`, `GET /v1/events`
    and `GET /v1/events/{id}/deliveries`. A replica lags the primary, by milliseconds or, when
    replay is held up, by minutes; a list missing its newest rows for that long is harmless.

    Everything else reads `primary`, because a decision judged against a lagging copy can
    charge twice or lose money: an idempotency key or replay not yet on the replica would look
    new and authorize again; every POST reads what it changes; `GET` of one object comes
    right after its POST (read your writes); `GET /v1/balance` is money a merchant acts on
    (refunds, payouts) and an older balance would be a wrong one; the worker and the ledger
    check decide and prove money. Those services are never given this object."""

    primary: Any
    replica: Any | None = None

    def acquire(self) -> Any:
        """A connection for a list query (`async with lists.acquire() as conn`)."""
        return (self.replica if self.replica is not None else self.primary).acquire()

    def confirm_on_primary(self) -> bool:
        """Whether "not found" on this pool must be asked again on the primary: a replica may
        simply not have replayed the row yet, and a 404 for something that exists is a lie."""
        return self.replica is not None
