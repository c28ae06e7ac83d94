"""semgrep --test fixture for tessera-card-data-in-log."""

import logging

import structlog

log = structlog.stdlib.get_logger("fixture")
logger = logging.getLogger("fixture")


class Card:
    number = "<a card number>"  # the rule matches names, never values
    cvc = "123"
    last4 = "4242"


def bad(card: Card, pan: str, track2: str) -> None:
    # ruleid: tessera-card-data-in-log
    log.info("charging", number=card.number)
    # ruleid: tessera-card-data-in-log
    logger.warning("declined %s", pan)
    # ruleid: tessera-card-data-in-log
    log.error(f"card {card.number} failed")
    # ruleid: tessera-card-data-in-log
    logger.info("swipe", extra={"track": track2})
    # ruleid: tessera-card-data-in-log
    log.debug("cvc check", cvc=card.cvc)


def good(card: Card, token_id: str) -> None:
    # ok: tessera-card-data-in-log
    log.info("charging", token=token_id, last4=card.last4)
    # ok: tessera-card-data-in-log
    logger.warning("declined %s", token_id)
    # ok: tessera-card-data-in-log
    print(card.last4)
