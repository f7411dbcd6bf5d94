"""Broker replicas on a real Redis Cluster (six redis-server processes, three masters with
a replica each), found from one node's URL: registration and a cross-replica connect over
sharded pub/sub, then the same across a master failover, a slot moved to another master
mid-run, and a master killed while agents keep their keepalives."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as redis_client

import libconfig
from natter import Broker, Client, Config
from natter_broker.redis_registry import RedisRegistry, bus_channel, peer_key
from netcheck import echo_check, echo_handler
from redis_cluster import RedisCluster

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    """A cluster each test: the fault tests change it."""
    try:
        built = RedisCluster().start()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    try:
        yield built
    finally:
        built.close()


def config(**kw: object) -> Config:
    return libconfig.config(**{"keepalive_interval": 1.0, "registration_ttl": 4.0, **kw})


@pytest.fixture
async def replicas(cluster: RedisCluster) -> AsyncIterator[list[Broker]]:
    brokers = [
        Broker(config(broker_addr="127.0.0.1:0", redis_url=cluster.url, broker_id=f"r{i}")) for i in (1, 2)
    ]
    for broker in brokers:
        await broker.start()
    await until(lambda: all(b.is_ready() for b in brokers), "replicas ready")
    try:
        yield brokers
    finally:
        for broker in brokers:
            await broker.close()


async def until(check: object, what: str, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def addr(broker: Broker) -> str:
    assert broker.address is not None
    return f"127.0.0.1:{broker.address.port}"


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def connect_through(broker: Broker, name: str, echo_port: int) -> None:
    """A new agent on ``broker`` forwards to bob and an echo comes back: a connect across
    replicas, introduced over sharded pub/sub."""
    async with Client(config(client_user=name, broker_addr=addr(broker))) as agent:
        fwd = await agent.forward("127.0.0.1:0", "bob", f":{echo_port}")
        assert fwd.local is not None
        assert await asyncio.wait_for(echo_check("127.0.0.1", fwd.local.port, os.urandom(200_000)), 60)


def registry(broker: Broker) -> RedisRegistry:
    assert isinstance(broker.registry, RedisRegistry)
    return broker.registry


async def test_registration_and_a_cross_replica_connect(
    cluster: RedisCluster, replicas: list[Broker], echo_port: int
) -> None:
    r1, r2 = replicas
    assert registry(r1).kind == "cluster" and registry(r2).kind == "cluster"
    async with Client(config(client_user="bob", broker_addr=addr(r2))) as bob:
        await bob.listen()
        await connect_through(r1, "alice", echo_port)
        # alice's and bob's records live on the masters their names hash to
        node = cluster.master_of_slot(cluster.keyslot(peer_key("bob")))
        direct = redis_client.Redis(port=node.port)
        assert direct.hget(peer_key("bob"), "replica") == b"r2"
        direct.close()
    assert r1.metrics.sample("natter_broker_redis_published_total") >= 1
    assert r2.metrics.sample("natter_broker_redis_received_total", kind="introduce") >= 1
    assert r1.metrics.sample("natter_broker_redis_received_total", kind="ack") >= 1


async def test_a_master_failover(cluster: RedisCluster, replicas: list[Broker], echo_port: int) -> None:
    """The master of r2's bus channel (and the one of bob's record) fail over to their
    replicas; keepalives and connects go on."""
    r1, r2 = replicas
    async with Client(config(client_user="bob", broker_addr=addr(r2))) as bob:
        await bob.listen()
        await connect_through(r1, "alice", echo_port)
        for key in (bus_channel("r2"), peer_key("bob")):
            cluster.fail_over(cluster.master_of_slot(cluster.keyslot(key)))
        await until(lambda: r2.is_ready() and r1.is_ready(), "replicas ready after the failover")
        await connect_through(r1, "carol", echo_port)
        assert bob.agent.registered.is_set()


async def test_a_slot_moved_to_another_master_mid_run(
    cluster: RedisCluster, replicas: list[Broker], echo_port: int
) -> None:
    """r2's bus channel and bob's record move to other masters, keys and all; r2 follows
    its channel (it would miss introductions otherwise) and bob's keepalives its record."""
    r1, r2 = replicas
    async with Client(config(client_user="bob", broker_addr=addr(r2))) as bob:
        await bob.listen()
        await connect_through(r1, "alice", echo_port)
        for key in (bus_channel("r2"), peer_key("bob")):
            slot = cluster.keyslot(key)
            owner = cluster.master_of_slot(slot)
            other = next(p for p in cluster.masters_of(owner) if p != owner.port)
            cluster.move_slot(slot, cluster.node(other))
            assert cluster.master_of_slot(slot).port == other
        await until(lambda: r2.is_ready(), "r2 subscribed on the channel's new master")
        await connect_through(r1, "carol", echo_port)
        await asyncio.sleep(2.5)  # two keepalives on the moved record
        await connect_through(r1, "dave", echo_port)


async def test_a_master_killed_while_agents_keep_their_keepalives(
    cluster: RedisCluster, replicas: list[Broker], echo_port: int
) -> None:
    r1, r2 = replicas
    async with Client(config(client_user="bob", broker_addr=addr(r2))) as bob:
        await bob.listen()
        await connect_through(r1, "alice", echo_port)
        victim = cluster.master_of_slot(cluster.keyslot(peer_key("bob")))
        cluster.kill(victim)  # its replica takes over after the node timeout
        cluster.wait_ok()
        await until(lambda: r1.is_ready() and r2.is_ready(), "replicas ready after the kill")
        await until(lambda: bob.agent.registered.is_set(), "bob registered", timeout=10)
        await connect_through(r1, "carol", echo_port)
