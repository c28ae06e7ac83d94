"""Structured JSON logs, one line per event, with card numbers masked on the way out.

Every log line of every process goes through `redact_processor`, whether it was written with
structlog or with the standard library (uvicorn, asyncpg, ...). Redaction is the safety net:
code must never log card data in the first place.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from core.redaction import redact, redact_value


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    redacted: MutableMapping[str, Any] = redact_value(dict(event_dict))
    return dict(redacted)


def _redact_rendered(_logger: WrappedLogger, _method: str, line: Any) -> Any:
    # Second net: anything a field's repr() produced at render time is checked as text too.
    return redact(line) if isinstance(line, str) else line


def _exception_to_text(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    # Tracebacks go to the log as text (then redacted), never to a client.
    return structlog.processors.format_exc_info(_logger, _method, event_dict)


def configure_logging(service: str, level: str = "info", stream: TextIO | None = None) -> None:
    """Route structlog and the standard library through one JSON renderer with redaction."""
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.EventRenamer("message"),
        _exception_to_text,
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _add_service(service),
            redact_processor,
            structlog.processors.JSONRenderer(),
            _redact_rendered,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log is replaced by ours (route template, request id, duration).
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def _add_service(service: str) -> Processor:
    def add(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    return add


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)
