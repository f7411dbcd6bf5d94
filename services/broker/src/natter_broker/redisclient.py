"""Which Redis a fleet runs on, found from one URL: standalone (``redis://``, ``rediss://``,
``unix://``), Sentinel (``redis+sentinel://``), or a Redis Cluster behind any one of its
nodes' ``redis://`` URLs (the broker asks the node, then uses the cluster client).

redis-py's asyncio cluster client (with sharded pub/sub) is used from 8.1, the release
whose ``ClusterPubSub`` follows a shard channel to its new node after a slot moves or a
master fails over.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ResponseError

SENTINEL_SCHEME = "redis+sentinel://"
TIMEOUT = 2.0  # seconds for one command or connection attempt


class RedisKind(enum.Enum):
    STANDALONE = "standalone"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclass
class RedisClient:
    client: Any  # aioredis.Redis or RedisCluster: the same commands, routed by key in a cluster
    kind: RedisKind

    @property
    def cluster(self) -> bool:
        return self.kind is RedisKind.CLUSTER


async def open_client(url: str) -> RedisClient:
    """Connect as the URL says; a node that reports ``cluster_enabled`` means a cluster."""
    if url.startswith(SENTINEL_SCHEME):
        return RedisClient(_sentinel(url), RedisKind.SENTINEL)
    client = _standalone(url)
    try:
        info = await client.info("cluster")
    except ResponseError:  # a Redis without the section (or a proxy): not a cluster
        info = {}
    except BaseException:
        await client.aclose()
        raise
    if not info.get("cluster_enabled"):
        return RedisClient(client, RedisKind.STANDALONE)
    await client.aclose()
    cluster = RedisCluster.from_url(
        _without_database(url),
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        health_check_interval=10,
        require_full_coverage=False,  # a shard down leaves the others serving
    )
    try:
        await cluster.initialize()
    except BaseException:
        await cluster.aclose()
        raise
    return RedisClient(cluster, RedisKind.CLUSTER)


def _standalone(url: str) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=16,  # bursts wait for a connection instead of failing
        timeout=5,
        socket_timeout=TIMEOUT,
        socket_connect_timeout=TIMEOUT,
        health_check_interval=10,
    )
    return aioredis.Redis(connection_pool=pool)


def _without_database(url: str) -> str:
    """A cluster has database 0 only, and its client refuses a URL that names one."""
    parts = urlsplit(url)
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only, not {parts.path.strip('/')!r}")
    return urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))


def _sentinel(url: str) -> aioredis.Redis:
    """redis+sentinel://[:PASSWORD@]HOST:PORT,HOST:PORT/MASTER[/DB]: the master is looked up
    through Sentinel and followed on failover."""
    rest = url[len(SENTINEL_SCHEME) :]
    password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        password = credentials.split(":", 1)[-1] or None
    hosts, _, path = rest.partition("/")
    master, _, db = path.partition("/")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        sentinels.append((host or "localhost", int(port or 26379)))
    if not master or not sentinels:
        raise ValueError(f"bad Sentinel URL {url!r}: expected redis+sentinel://HOST:PORT,.../MASTER/DB")
    sentinel = Sentinel(sentinels, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)  # type: ignore[no-untyped-call]
    client: aioredis.Redis = sentinel.master_for(
        master, db=int(db or 0), password=password, socket_timeout=TIMEOUT
    )
    return client
