"""Schemathesis against both services' OpenAPI documents, in-process, with every check on:
generated requests, valid and invalid, one operation at a time (stateless: the coverage and
fuzzing phases) and along the documents' links (stateful: a payment created, then captured,
refunded, read; a token created, then read and deleted). A 5xx, an undocumented status, a body
that does not match its schema, an invalid request accepted, a valid one refused, a credential
not enforced or a deleted object still served fails the test.

The apps run in this process (Schemathesis' ASGI transport runs their lifespan, so their pools
and clients are real) against the session's Postgres, Redis, vault process and simulators, for
a merchant of their own. The in-process vault is a second instance of the session's vault (its
database and keyring), so `rotateKeys` and `rewrapKeys` are left to `make fuzz` and to the
caller matrix: rotating here would leave the session's vault process with a stale keyring.

The documents are read when this module is imported (building an app does no I/O), so that
pytest can list one test per operation; the apps that answer are built from the session's
settings (`LateApp`). Schemathesis' own fixture loader is not used: it fails on pytest 9.2
(`Function` has no `_nodeid`). A few examples per operation keep this quick; `make fuzz` runs
many more, with every phase, against the running stack.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, cast

import httpx
import hypothesis
import pytest
import schemathesis
from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.types import LifeSpanScope, Receive, Scope, Send
from schemathesis import Case
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.stateful.state_machine import APIStateMachine
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.schemas import OpenApiSchema

from api.app import create_app as create_api
from api.settings import ApiSettings
from tessera.runtime.settings import load_settings
from tests.conftest import ApiMerchant, create_merchant
from tests.support import fuzzing  # its Schemathesis hooks, registered on import
from tests.support.echo_server import EchoServer
from tests.support.processes import ServiceProcess
from vault.app import create_app as create_vault
from vault.settings import VaultSettings

EXAMPLES = 5
STATEFUL_SCENARIOS = 5
#: Documents only: these apps never serve.
PLACEHOLDER_SECRET = "placeholder-" + "x" * 32  # pragma: allowlist secret
#: Operations that would change what the session's vault process relies on (see above).
NOT_IN_PROCESS = ["rotateKeys", "rewrapKeys"]

#: Requests sent per service and operation, printed at the end of the module.
CASES: Counter[str] = Counter()


class LateApp:
    """An ASGI app that forwards to an app built from the session's settings (`factory`, set by
    the module's fixture): a new one at each lifespan start, as a new process would build it
    (Schemathesis ends the lifespan after each test and starts it again for the next)."""

    def __init__(self) -> None:
        self.factory: Callable[[], Litestar] | None = None
        self.app: Litestar | None = None

    async def __call__(self, scope: Scope | LifeSpanScope, receive: Receive, send: Send) -> None:
        assert self.factory is not None, "the module's fixture sets the factory first"
        if scope["type"] == "lifespan" or self.app is None:
            self.app = self.factory()
        await self.app(scope, receive, send)


def load(app: Litestar, late: LateApp) -> OpenApiSchema:
    document: dict[str, Any] = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    schema = schemathesis.openapi.from_dict(document, config=schemathesis.Config())
    schema.app = late
    schema.config.generation.update(max_examples=EXAMPLES)
    return schema


API, VAULT = LateApp(), LateApp()
api_schema = load(
    create_api(load_settings(ApiSettings, {"TESSERA_API_VAULT_SERVICE_TOKEN": PLACEHOLDER_SECRET})),
    API,
)
vault_schema = load(
    create_vault(
        load_settings(
            VaultSettings,
            {
                "TESSERA_VAULT_SERVICE_TOKEN": PLACEHOLDER_SECRET,
                "TESSERA_VAULT_ADMIN_TOKEN": PLACEHOLDER_SECRET + "-admin",
            },
        )
    ),
    VAULT,
).exclude(operation_id=NOT_IN_PROCESS)


@pytest.fixture(scope="module")
def fuzzed(
    api_env: dict[str, str],
    vault_env: dict[str, str],
    api: ServiceProcess,
    vault: ServiceProcess,
    tokens: dict[str, str],
    psp_echo: EchoServer,
    request: pytest.FixtureRequest,
) -> Iterator[ApiMerchant]:
    """The apps of this session, a merchant of the fuzz's own (its payments, tokens and webhook
    endpoints touch no other test's), and the settings the hooks read."""
    merchant = create_merchant(api_env, vault, tokens["admin"], "Fuzz")
    settings = {
        "TESSERA_FUZZ_SECRET_KEY": merchant.secret_key,
        "TESSERA_FUZZ_PUBLISHABLE_KEY": merchant.publishable_key,
        "TESSERA_FUZZ_MERCHANT": merchant.id,
        "TESSERA_FUZZ_SERVICE_TOKEN": tokens["service"],
        "TESSERA_FUZZ_ADMIN_TOKEN": tokens["admin"],
        "TESSERA_FUZZ_VAULT_URL": vault.url,
        "TESSERA_FUZZ_FORWARD": "echo /v1/authorizations",
        "TESSERA_FUZZ_WEBHOOK_URL": "http://127.0.0.1:9/fuzz-hook",
    }
    assert set(settings) == set(fuzzing.FUZZ_ENV)
    api_settings = load_settings(ApiSettings, {**api_env, "TESSERA_API_VAULT_URL": vault.url})
    vault_settings = load_settings(VaultSettings, vault_env)
    API.factory = lambda: create_api(api_settings)
    VAULT.factory = lambda: create_vault(vault_settings)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        yield merchant
    psp_echo.reset()
    # Its webhook endpoints would otherwise be retried, for days, by later tests' workers.
    endpoints = httpx.get(api.url + "/v1/webhook_endpoints", headers=merchant.auth).json()
    for endpoint in endpoints["data"]:
        httpx.delete(f"{api.url}/v1/webhook_endpoints/{endpoint['id']}", headers=merchant.auth)
    print_counts(request)


def print_counts(request: pytest.FixtureRequest) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_sep("-", f"schemathesis in-process: {sum(CASES.values())} requests")
        for label, count in sorted(CASES.items()):
            reporter.write_line(f"{count:6d}  {label}")


def headers_for(case: Case[Any], merchant: ApiMerchant, tokens: dict[str, str]) -> dict[str, str]:
    """The credential of the operation's security scheme, as tests/schemathesis.toml gives it
    to the CLI, and the merchant the vault's service calls act for; none for a case whose
    headers were generated invalid."""
    credentials = {
        "secretKey": merchant.secret_key,
        "publishableKey": merchant.publishable_key,
        "serviceToken": tokens["service"],
        "adminToken": tokens["admin"],
    }
    raw = case.operation.definition.raw
    headers: dict[str, str] = {}
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        return headers  # sent as generated: perhaps without its credential, on purpose
    for requirement in raw.get("security", []):
        for scheme in requirement:
            headers["Authorization"] = f"Bearer {credentials[scheme]}"
    if any(parameter.get("name") == "Tessera-Merchant" for parameter in raw.get("parameters", [])):
        headers["Tessera-Merchant"] = merchant.id
    return headers


def send(case: Case[Any], service: str, merchant: ApiMerchant, tokens: dict[str, str]) -> None:
    CASES[f"{service} {case.operation.label}"] += 1
    case.call_and_validate(headers=headers_for(case, merchant, tokens))


@api_schema.parametrize()
def test_the_api_answers_every_generated_request_as_its_document_says(
    case: Case[Any], fuzzed: ApiMerchant, tokens: dict[str, str]
) -> None:
    send(case, "api", fuzzed, tokens)


@vault_schema.parametrize()
def test_the_vault_answers_every_generated_request_as_its_document_says(
    case: Case[Any], fuzzed: ApiMerchant, tokens: dict[str, str]
) -> None:
    send(case, "vault", fuzzed, tokens)


def run_stateful(
    schema: BaseSchema, service: str, merchant: ApiMerchant, tokens: dict[str, str]
) -> None:
    def get_call_kwargs(self: APIStateMachine, case: Case[Any]) -> dict[str, Any]:
        CASES[f"{service} stateful {case.operation.label}"] += 1
        return {"headers": headers_for(case, merchant, tokens)}

    # Schemathesis makes the machine's class at run time; ours adds the credentials to it.
    machine = cast(
        "type[APIStateMachine]",
        type("Machine", (schema.as_state_machine(),), {"get_call_kwargs": get_call_kwargs}),
    )
    machine.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=8,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            database=None,
        )
    )


def test_payments_followed_along_their_links_behave_as_documented(
    fuzzed: ApiMerchant, tokens: dict[str, str]
) -> None:
    run_stateful(api_schema, "api", fuzzed, tokens)


def test_tokens_followed_along_their_links_behave_as_documented(
    fuzzed: ApiMerchant, tokens: dict[str, str]
) -> None:
    run_stateful(vault_schema, "vault", fuzzed, tokens)
