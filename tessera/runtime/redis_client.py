"""One Redis client per process, standalone or Redis Cluster, chosen by the URL's scheme.

`redis://` and `rediss://` (TLS) are one server, as before. `redis+cluster://` and
`rediss+cluster://` are a Redis Cluster (Memorystore for Redis Cluster, or any `cluster-enabled`
set of nodes): the address is any one node (or the discovery endpoint); redis-py's cluster
client learns the others from it and sends each command to the node that holds its key's slot.
The scheme, not a separate flag, says it, so one variable describes the whole connection.

Code that calls Redis does not care which it is: every key it uses is either a single key or
carries a hash tag (`{mer_…}`, `{psp_a}`) shared by every key one command or pipeline touches,
so nothing it does crosses a slot (tests/test_redis_cluster.py runs the API on a real cluster).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

#: What a service holds as its Redis: the same commands either way. For the type checker only:
#: Litestar resolves the types of what handlers are given (services holding this client) with
#: msgspec, which refuses a union of two classes, so at run time the alias is `Any`.
if TYPE_CHECKING:
    RedisClient: TypeAlias = aioredis.Redis | RedisCluster
else:
    RedisClient = Any

#: Cluster scheme -> the scheme redis-py reads (same transport, cluster client).
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SCHEMES = ("redis", "rediss", *CLUSTER_SCHEMES)


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def is_tls_url(url: str) -> bool:
    return urlsplit(url).scheme in ("rediss", "rediss+cluster")


def cluster_url_problem(url: str) -> str | None:
    """Why a cluster URL cannot work, or None: a cluster has only database 0."""
    if not is_cluster_url(url):
        return None
    database = urlsplit(url).path.strip("/")
    if database not in ("", "0"):
        return f"a Redis Cluster has only database 0 (got /{database})"
    return None


def connect(url: str, **options: Any) -> RedisClient:
    """The client for `url`; `options` (time-outs) apply to every connection of either kind.
    Nothing is connected yet: the first command connects (a cluster client first reads the slot
    map from the node it was given)."""
    parts = urlsplit(url)
    if parts.scheme in CLUSTER_SCHEMES:
        plain = parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme], path="").geturl()
        return RedisCluster.from_url(plain, **options)
    return aioredis.Redis.from_url(url, **options)


#: Everything a Redis call may raise when Redis cannot answer. The cluster client adds
#: `RedisClusterException` (no node reachable, a slot no node serves: while a dead node's slots
#: are being re-assigned), which is not a `RedisError`: code that carries on without Redis
#: must catch both, or a cluster outage becomes a 500.
REDIS_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
)


def means_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says Redis (or the cluster) cannot serve now, as opposed to a bad command."""
    return isinstance(
        exc,
        redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | redis.exceptions.ClusterDownError
        | redis.exceptions.TryAgainError
        | redis.exceptions.RedisClusterException,
    )
