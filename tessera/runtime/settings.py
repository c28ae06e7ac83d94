"""Settings from environment variables, validated once at start-up.

Each service declares a msgspec Struct; every field `foo` is read from `<PREFIX>FOO`
(a few shared fields, such as the mode, have one name for every service), or from the file
that `<PREFIX>FOO_FILE` names, so secrets mounted as files (Secret Manager's CSI driver, compose
secrets) never pass through the environment. A bad value stops
the process with a message naming the variable, before anything binds a port or opens a pool.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin
from urllib.parse import urlsplit

import msgspec

from tessera.runtime import redis_client

Mode = Literal["development", "production"]

#: Fields shared by every service, each read from one variable whatever the service.
SHARED_ENV_NAMES: dict[str, str] = {"mode": "TESSERA_MODE"}


class SettingsError(Exception):
    """A setting is missing or invalid; the message names the environment variable."""


class BaseSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    env_prefix: ClassVar[str] = "TESSERA_"

    mode: Mode = "development"

    @property
    def production(self) -> bool:
        return self.mode == "production"

    @classmethod
    def env_name(cls, field: str) -> str:
        return SHARED_ENV_NAMES.get(field) or f"{cls.env_prefix}{field.upper()}"

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Every variable this service reads, by field name (compose and docs are checked on it)."""
        return {f.name: cls.env_name(f.name) for f in msgspec.structs.fields(cls)}

    def production_problems(self) -> list[str]:
        """Development-only parts that production mode must refuse. Overridden per service."""
        return []


S = TypeVar("S", bound=BaseSettings)


def _is_sequence(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (list, tuple, frozenset, set):
        return True
    if origin is not None:  # Optional[...] / unions
        return any(_is_sequence(a) for a in get_args(annotation) if a is not type(None))
    return False


def _is_mapping(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin is dict:
        return True
    if origin is not None and origin not in (list, tuple, frozenset, set):
        return any(_is_mapping(a) for a in get_args(annotation) if a is not type(None))
    return False


def load_settings(cls: type[S], env: Mapping[str, str] | None = None) -> S:
    """Build `cls` from the environment; raise SettingsError naming the variable at fault."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        name = cls.env_name(field.name)
        value: Any
        if name in env:
            if f"{name}_FILE" in env:
                raise SettingsError(f"{name} and {name}_FILE are both set: keep one")
            value = env[name]
        elif f"{name}_FILE" in env:
            value = _read_setting_file(f"{name}_FILE", env[f"{name}_FILE"])
        else:
            continue
        if _is_mapping(field.type):
            try:
                value = msgspec.json.decode(value)
            except msgspec.DecodeError:
                raise SettingsError(f"{name}: expected a JSON object") from None
        elif _is_sequence(field.type):
            value = [item.strip() for item in value.split(",") if item.strip()]
        raw[field.name] = value
    try:
        settings = msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(cls, str(exc))) from None
    if settings.production:
        problems = settings.production_problems()
        if problems:
            raise SettingsError(
                "TESSERA_MODE=production refuses development-only parts: " + "; ".join(problems)
            )
    return settings


def _read_setting_file(variable: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        # The path, never the content: the file holds a secret.
        raise SettingsError(f"{variable}: cannot read {path} ({exc.strerror})") from None
    return text.removesuffix("\n").removesuffix("\r")


def _explain(cls: type[BaseSettings], message: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.port`": name the variable instead.
    if " - at `$." in message:
        text, _, path = message.partition(" - at `$.")
        field = path.rstrip("`").split(".")[0].split("[")[0]
        return f"{cls.env_name(field)}: {text}"
    if message.startswith("Object missing required field `"):
        field = message.split("`")[1]
        return f"{cls.env_name(field)} is required"
    return message


def validate_url(value: str, schemes: tuple[str, ...], variable: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise msgspec.ValidationError(
            f"{variable}: expected a URL with scheme {' or '.join(schemes)} and a host"
        )


def is_loopback_url(value: str) -> bool:
    host = urlsplit(value).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def check_secret(value: str, variable: str, minimum: int = 32) -> None:
    if len(value) < minimum:
        raise msgspec.ValidationError(f"{variable}: must be at least {minimum} characters")


LogLevel = Literal["debug", "info", "warning", "error"]


class ServiceSettings(BaseSettings, frozen=True, kw_only=True):
    """What every HTTP service reads; each service overrides the defaults it must."""

    host: str = "127.0.0.1"
    port: int = 0
    database_url: str = ""
    redis_url: str = ""
    db_pool_min: int = 1
    db_pool_max: int = 8
    db_timeout_seconds: float = 5.0
    log_level: LogLevel = "info"
    #: How long in-flight requests may run on after SIGTERM.
    shutdown_timeout_seconds: float = 20.0
    #: How long an idle client connection is kept open. Longer than our clients' own idle
    #: expiry (httpx: 5 s), so a client never sends on a connection the server is closing:
    #: that race makes a request look sent when it never arrived. Behind a load balancer,
    #: longer than its idle timeout (Google's: 600 s).
    keep_alive_seconds: int = 75
    #: HTTP worker processes (uvicorn's supervisor forks them, each with its own pools).
    #: One per core is the usual choice; each process keeps its own metrics and breakers.
    workers: int = 1

    def __post_init__(self) -> None:
        validate_url(self.database_url, ("postgresql", "postgres"), self.env_name("database_url"))
        validate_url(self.redis_url, redis_client.SCHEMES, self.env_name("redis_url"))
        if problem := redis_client.cluster_url_problem(self.redis_url):
            raise ValueError(f"{self.env_name('redis_url')}: {problem}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"{self.env_name('port')}: must be a TCP port (1-65535)")
        if not 1 <= self.db_pool_min <= self.db_pool_max <= 100:
            raise ValueError(
                f"need 1 <= {self.env_name('db_pool_min')} <= {self.env_name('db_pool_max')} <= 100"
            )
        if not 1 <= self.keep_alive_seconds <= 3600:
            raise ValueError(f"{self.env_name('keep_alive_seconds')}: 1 to 3600 seconds")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"{self.env_name('workers')}: 1 to 64 processes")
        if self.db_timeout_seconds <= 0 or self.shutdown_timeout_seconds < 0:
            raise ValueError("timeouts must be positive")

    def listen_ports(self) -> list[int]:
        """Every port the service binds; a service with several listeners overrides it."""
        return [self.port]
