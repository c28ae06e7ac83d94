"""The OpenAPI document each service serves, made exact enough to fuzz against.

Litestar writes the document from the handlers. This finishes it once, when the app is built,
with what Litestar cannot know:

- request and response bodies are described by msgspec, the library that decodes and encodes
  them, so `forbid_unknown_fields`, length limits, dict key rules and each field's
  `msgspec.Meta(extra_json_schema=...)` (limits the code checks itself) are in the document;
- the error statuses the shared runtime gives any operation: 400 for a request it cannot read
  (a bad parameter or body, a malformed Host header), 404 for an unknown id in the path, 413
  for a body over the limit, the guard's statuses where a credential is required, 503 when the
  database or Redis is down. Each operation adds its own (402, 409, 502, ...) with
  `error_responses`;
- links between operations (a created payment's id is what capture, cancel and refund take),
  for stateful testing and for readers;
- a parameter is optional by being left out, never by being `null`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin  # the only way to the served document
from litestar.handlers import HTTPRouteHandler
from litestar.response import Response

from tessera.runtime.http import ERROR_DESCRIPTIONS, ErrorEnvelope

REF = "#/components/schemas/{name}"
#: A handler's `opt` key naming the type of the body it reads and decodes itself (so Litestar,
#: which decodes leniently, never does); `X | None` if the body is optional.
REQUEST_BODY = "request_body"


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: `parameters` maps the target's parameter to a runtime expression,
    such as `{"payment": "$response.body#/id"}`."""

    operation_id: str
    parameters: Mapping[str, str]

    def to_schema(self) -> dict[str, Any]:
        return {"operationId": self.operation_id, "parameters": dict(self.parameters)}


@dataclass(frozen=True)
class ServiceDocument:
    """What a service adds to its document."""

    #: Security schemes by name (`components.securitySchemes`); handlers name theirs with
    #: Litestar's `security=[{"name": []}]`.
    security_schemes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Statuses every operation with a security requirement may answer (the guard's).
    guard_statuses: tuple[int, ...] = (401,)
    #: Links by (operationId, status): {link name: Link}.
    links: Mapping[tuple[str, int], Mapping[str, Link]] = field(default_factory=dict)


def finish(app: Litestar, service: ServiceDocument) -> dict[str, Any]:
    """Finish `app`'s served document in place and return it."""
    document: dict[str, Any] = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    handlers = dict(_documented_handlers(app, document))
    body_types: dict[tuple[str, str], Any] = {}
    optional_bodies: dict[tuple[str, str], bool] = {}
    response_types: dict[tuple[str, str, str], Any] = {}
    for (path, method), handler in handlers.items():
        body = _request_body_type(handler)
        if body is not None:
            body_types[(path, method)] = _without_none(body)
            optional_bodies[(path, method)] = _is_optional(body)
        for status, annotation in _response_types(handler).items():
            response_types[(path, method, status)] = annotation
    wanted = [ErrorEnvelope, *body_types.values(), *response_types.values()]
    refs, components = msgspec.json.schema_components(wanted, ref_template=REF)
    error_ref = refs[0]
    body_schema = dict(zip(body_types, refs[1 : 1 + len(body_types)], strict=True))
    response_schema = dict(zip(response_types, refs[1 + len(body_types) :], strict=True))

    document.setdefault("components", {})["schemas"] = components
    if service.security_schemes:
        document["components"]["securitySchemes"] = {
            name: dict(scheme) for name, scheme in service.security_schemes.items()
        }
    for path, method in handlers:
        operation = document["paths"][path][method]
        _finish_parameters(operation)
        if (path, method) in body_schema:
            operation["requestBody"] = {
                "content": {"application/json": {"schema": body_schema[(path, method)]}},
                # `X | None`: no body at all, or an X (never a JSON `null`)
                "required": not optional_bodies[(path, method)],
            }
        responses = operation["responses"]
        errors = {int(code) for code in responses if code.isdigit() and int(code) >= 400}
        for error in sorted(errors | _shared_statuses(operation, path, service)):
            _set_error(responses, error, error_ref)
        for (r_path, r_method, status), schema in response_schema.items():
            if (r_path, r_method) == (path, method):
                _set_content(responses, status, schema)
        for status, links in _links_of(operation, service).items():
            if status not in responses:
                raise ValueError(f"{operation.get('operationId')}: no {status} response to link")
            responses[status]["links"] = {name: link.to_schema() for name, link in links.items()}
    return document


def _documented_handlers(
    app: Litestar, document: dict[str, Any]
) -> Iterator[tuple[tuple[str, str], HTTPRouteHandler]]:
    paths = document.get("paths", {})
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if not isinstance(handler, HTTPRouteHandler):
                continue
            for method in handler.http_methods:
                operation = paths.get(route.path_format, {}).get(method.lower())
                if operation is not None and operation.get("operationId") == handler.operation_id:
                    yield (route.path_format, method.lower()), handler


def _request_body_type(handler: HTTPRouteHandler) -> Any:
    """The body's type; `X | None` when a request may have no body at all."""
    if REQUEST_BODY in handler.opt:
        return handler.opt[REQUEST_BODY]
    data = handler.parsed_data_field
    return None if data is None else data.annotation


def _response_types(handler: HTTPRouteHandler) -> dict[str, Any]:
    found: dict[str, Any] = {}
    returned = handler.parsed_fn_signature.return_type.annotation
    if _is_body_type(returned):
        found[str(handler.status_code)] = returned
    for status, spec in (handler.responses or {}).items():
        if spec.data_container is not ErrorEnvelope and _is_body_type(spec.data_container):
            found[str(status)] = spec.data_container
    return found


def _is_body_type(annotation: Any) -> bool:
    """A type msgspec describes (a Struct, a dict, ...), not a raw `Response` or bytes."""
    origin = typing.get_origin(annotation) or annotation
    if origin in (bytes, str, type(None)) or annotation is typing.Any:
        return False
    return not (isinstance(origin, type) and issubclass(origin, Response))


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _is_optional(annotation: Any) -> bool:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


def _finish_parameters(operation: dict[str, Any]) -> None:
    """A header or query value is a string on the wire: optional means absent, not null."""
    for parameter in operation.get("parameters", []):
        schema = parameter.get("schema", {})
        alternatives = [alt for alt in schema.pop("oneOf", []) if alt.get("type") != "null"]
        if len(alternatives) == 1:
            schema.update({k: v for k, v in alternatives[0].items() if k not in schema})
        elif alternatives:
            schema["oneOf"] = alternatives


def _shared_statuses(operation: dict[str, Any], path: str, service: ServiceDocument) -> set[int]:
    # Any request can be one the router cannot read (a malformed Host header, Litestar's 400),
    # and every operation but the liveness probe reads the database or Redis.
    statuses = {400} if operation.get("operationId") == "healthz" else {400, 503}
    if operation.get("requestBody"):
        statuses.add(413)
    if "{" in path:
        statuses.add(404)
    if operation.get("security"):
        statuses.update(service.guard_statuses)
    return statuses


#: A request the HTTP server (uvicorn) cannot parse, such as a `Content-Length` that is not a
#: number, never reaches the app: uvicorn answers it with its own plain-text 400.
UNPARSABLE = {"text/plain": {"schema": {"type": "string"}}}


def _set_error(responses: dict[str, Any], status: int, error_ref: dict[str, Any]) -> None:
    response = responses.setdefault(str(status), {})
    response.setdefault("description", ERROR_DESCRIPTIONS[status])
    response["content"] = {"application/json": {"schema": error_ref}}
    if status == 400:
        response["content"].update(UNPARSABLE)


def _set_content(responses: dict[str, Any], status: str, schema: dict[str, Any]) -> None:
    response = responses.setdefault(status, {"description": ""})
    content = response.get("content") or {"application/json": {}}
    for media in content.values():
        media["schema"] = schema
    response["content"] = content


def _links_of(operation: dict[str, Any], service: ServiceDocument) -> dict[str, Mapping[str, Link]]:
    operation_id = operation.get("operationId")
    return {
        str(status): links
        for (source, status), links in service.links.items()
        if source == operation_id
    }
