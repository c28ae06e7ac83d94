"""A scripted issuer, for tests of recovery: the next answers a card gets, then the card table
again. A renewal can so be declined `insufficient_funds` and its retry approved, as a real
issuer does once the customer's pay arrives. Shared by both simulators; nothing is kept but the
queued answers (by card number, in memory, never logged).

`POST /admin/issuer_script {"number", "outcomes": [{"decline_code", "advice_code",
"visa_category"} | {"approve": true}, ...]}` -> 201 `{"number_last4", "queued"}`. Only new
authorizations take an answer from the queue; a replay of a reference answers what it answered.
"""

from __future__ import annotations

from collections import deque
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, post

from sandbox.account_updater import Encode, Refuse, UpdaterError, _answering, _decode
from sandbox.cards import APPROVE, DeclineCode, Outcome, decline, is_card_number


class ScriptedAnswer(msgspec.Struct, forbid_unknown_fields=True):
    approve: bool = False
    decline_code: DeclineCode | None = None
    advice_code: Annotated[str, msgspec.Meta(pattern="^[0-9]{2}$")] | None = None
    visa_category: Annotated[int, msgspec.Meta(ge=1, le=4)] | None = None


class Script(msgspec.Struct, forbid_unknown_fields=True):
    number: Annotated[str, msgspec.Meta(max_length=19)]
    outcomes: Annotated[list[ScriptedAnswer], msgspec.Meta(min_length=1, max_length=50)]


class IssuerScript:
    def __init__(self) -> None:
        self._queues: dict[str, deque[Outcome]] = {}

    def queue(self, script: Script) -> int:
        if not is_card_number(script.number):
            raise UpdaterError(400, "invalid_card", "number is not a card number.")
        answers = self._queues.setdefault(script.number, deque())
        for answer in script.outcomes:
            if answer.approve == (answer.decline_code is not None):
                raise UpdaterError(
                    400, "invalid_answer", "Each answer is approve: true or a decline_code."
                )
            answers.append(
                APPROVE
                if answer.approve
                else decline(
                    answer.decline_code,  # type: ignore[arg-type]
                    advice_code=answer.advice_code,
                    visa_category=answer.visa_category,
                )
            )
        return len(answers)

    def next(self, number: str, otherwise: Outcome) -> Outcome:
        """The card's next scripted answer, or `otherwise` when none is queued."""
        answers = self._queues.get(number)
        if not answers:
            return otherwise
        return answers.popleft()


def install(app: Litestar, script: IssuerScript, refuse: Refuse, encode: Encode) -> IssuerScript:
    async def queue(request: Request[Any, Any, Any]) -> Response[bytes]:
        asked = _decode(Script, await request.body())
        queued = script.queue(asked)
        return encode(201, {"number_last4": asked.number[-4:], "queued": queued})

    app.register(post("/admin/issuer_script")(_answering(refuse, queue)))
    return script
