"""Every log line is JSON, carries the request id, and never shows a card number."""

from __future__ import annotations

import io
import json
import logging

import structlog

from tessera.runtime.logging import configure_logging

PANS = ["4242424242424242", "5555 5555 5555 4444", "3782-822463-10005"]


def capture(service: str = "test") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(service, "debug", stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_events_are_json_with_the_service_name() -> None:
    stream = capture("vault")
    structlog.stdlib.get_logger("t").info("token_created", brand="visa")
    [line] = lines(stream)
    assert line["message"] == "token_created"
    assert line["service"] == "vault"
    assert line["brand"] == "visa"
    assert line["level"] == "info"


def test_card_numbers_are_masked_in_structlog_messages_and_fields() -> None:
    stream = capture()
    log = structlog.stdlib.get_logger("t")
    for pan in PANS:
        log.warning(f"charging {pan}", body={"card": {"number": pan}}, items=[pan])
    output = stream.getvalue()
    for pan in PANS:
        assert pan not in output
        assert pan.replace(" ", "").replace("-", "") not in output
    assert output.count("4242") >= 1  # the last four may stay


def test_card_numbers_are_masked_in_standard_library_logs() -> None:
    stream = capture()
    logging.getLogger("some.library").error("upstream said %s", "pan=4242424242424242")
    [line] = lines(stream)
    assert "4242424242424242" not in json.dumps(line)
    assert line["level"] == "error"


def test_card_numbers_in_tracebacks_are_masked() -> None:
    stream = capture()
    try:
        raise ValueError("bad card 4000000000000002")
    except ValueError:
        structlog.stdlib.get_logger("t").exception("failed")
    output = stream.getvalue()
    assert "Traceback" in output
    assert "4000000000000002" not in output


def test_ordinary_numbers_stay_readable() -> None:
    stream = capture()
    structlog.stdlib.get_logger("t").info("paid", amount=123456789012, order="ord_123456789012")
    [line] = lines(stream)
    assert line["amount"] == 123456789012  # shorter than any card number
    assert line["order"] == "ord_123456789012"


def test_request_ids_bound_in_context_appear_on_every_line() -> None:
    stream = capture()
    structlog.contextvars.bind_contextvars(request_id="req_abc")
    try:
        structlog.stdlib.get_logger("t").info("one")
        logging.getLogger("lib").warning("two")
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    assert [line["request_id"] for line in lines(stream)] == ["req_abc", "req_abc"]
