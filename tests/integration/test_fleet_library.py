"""Broker replicas sharing one real Redis, in one process: cross-replica introductions,
a lost pub/sub message, an owner replica that vanished, and metrics that move."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
import redis as redis_client

import libconfig
from natter import Broker, Client, Config, PeerUnavailable
from natter_proto import frames
from netcheck import echo_check, echo_handler
from procs import free_port
from redis_server import RedisContainer, RedisProcess, start_redis

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess | RedisContainer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.close()


def config(**kw: object) -> Config:
    """libconfig's, with a fleet's quicker keepalives (replicas notice silence sooner)."""
    return libconfig.config(**{"keepalive_interval": 1.0, "registration_ttl": 4.0, **kw})


@pytest.fixture
async def replicas(redis: RedisProcess | RedisContainer) -> AsyncIterator[list[Broker]]:
    # every test starts from an empty Redis: names bound to keys by an earlier test's agents
    # (each test makes fresh identities) would otherwise refuse this test's agents
    redis_client.Redis.from_url(redis.url).flushall()
    brokers = [
        Broker(
            config(
                broker_addr="127.0.0.1:0", redis_url=redis.url, broker_id=f"r{i}", metrics_addr="127.0.0.1:0"
            )
        )
        for i in (1, 2, 3)
    ]
    for broker in brokers:
        await broker.start()
    for _ in range(100):
        if all(b.is_ready() for b in brokers):
            break
        await asyncio.sleep(0.05)
    assert all(b.is_ready() for b in brokers)
    try:
        yield brokers
    finally:
        for broker in brokers:
            await broker.close()


def addr(broker: Broker) -> str:
    assert broker.address is not None
    return f"127.0.0.1:{broker.address.port}"


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_alice_on_one_replica_bob_on_another(replicas: list[Broker], echo_port: int) -> None:
    r1, r2, r3 = replicas
    async with (
        Client(config(client_user="bob", broker_addr=addr(r2))) as bob,
        Client(config(client_user="alice", broker_addr=addr(r1))) as alice,
        Client(config(client_user="carol", broker_addr=addr(r3))) as carol,
    ):
        await bob.listen()
        await carol.start()
        await carol.agent.wait_registered(5)
        fwd = await alice.forward("127.0.0.1:0", "bob", f":{echo_port}")
        assert fwd.local is not None
        payloads = [os.urandom(1 << 20) for _ in range(5)]
        assert all(await asyncio.gather(*(echo_check("127.0.0.1", fwd.local.port, p) for p in payloads)))
        # carol on the third replica reaches bob too
        fwd3 = await carol.forward("127.0.0.1:0", "bob", f":{echo_port}")
        assert fwd3.local is not None
        assert await echo_check("127.0.0.1", fwd3.local.port, os.urandom(300_000))
    # the introductions crossed replicas over Redis
    assert r1.metrics.sample("natter_broker_redis_published_total") >= 1
    assert r2.metrics.sample("natter_broker_redis_received_total", kind="introduce") >= 2
    assert r1.metrics.sample("natter_broker_redis_received_total", kind="ack") >= 1
    assert r1.metrics.sample("natter_broker_connect_requests_total", outcome="introduced") >= 1


async def test_lost_pubsub_message_is_healed_by_the_agents_retry(
    replicas: list[Broker], echo_port: int
) -> None:
    r1, r2, _ = replicas
    r2.registry.drop_incoming = 1  # type: ignore[attr-defined]
    async with (
        Client(config(client_user="bob", broker_addr=addr(r2))) as bob,
        Client(config(client_user="alice", broker_addr=addr(r1))) as alice,
    ):
        await bob.listen()
        await alice.start()
        await alice.agent.wait_registered(5)
        link = await asyncio.wait_for(alice.connect("bob"), 20)
        assert link.is_alive
    assert r2.metrics.sample("natter_broker_redis_received_total", kind="dropped_by_test") == 1
    assert r1.metrics.sample("natter_broker_redis_published_total") >= 2  # the retry published again


async def test_vanished_owner_replica_then_failover(replicas: list[Broker], echo_port: int) -> None:
    r1, r2, _ = replicas
    bob = Client(config(client_user="bob", broker_addr=[addr(r2), addr(r1)]))
    alice = Client(config(client_user="alice", broker_addr=addr(r1)))
    try:
        await bob.listen()
        await alice.start()
        await alice.agent.wait_registered(5)
        await r2.close(goaway=False)  # a crash: no goaway, bob's record still names r2
        with pytest.raises(PeerUnavailable) as info:
            await alice.connect("bob")
        assert info.value.code == frames.ErrorCode.PEER_UNREACHABLE
        assert r1.metrics.sample("natter_broker_redis_no_receiver_total") >= 1
        # bob notices within two keepalive intervals and re-registers with r1
        await asyncio.sleep(0.1)
        for _ in range(100):
            if bob.agent.broker == r1.address and bob.agent.registered.is_set():
                break
            await asyncio.sleep(0.05)
        assert bob.agent.broker == r1.address
        fwd = await alice.forward("127.0.0.1:0", "bob", f":{echo_port}")
        assert fwd.local is not None
        assert await asyncio.wait_for(echo_check("127.0.0.1", fwd.local.port, os.urandom(100_000)), 30)
    finally:
        await alice.close()
        await bob.close()


async def test_metrics_and_health_endpoints(replicas: list[Broker], echo_port: int) -> None:
    r1 = replicas[0]
    assert r1.metrics_address is not None
    base = f"http://127.0.0.1:{r1.metrics_address[1]}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
    assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
    assert (await asyncio.to_thread(get, "/nowhere"))[0] == 404
    before = (await asyncio.to_thread(get, "/metrics"))[1]
    assert "natter_broker_registrations_total" in before
    async with (
        Client(config(client_user="bob", broker_addr=addr(r1))) as bob,
        Client(config(client_user="alice", broker_addr=addr(r1))) as alice,
    ):
        await bob.listen()
        await alice.start()
        await alice.agent.wait_registered(5)
        await alice.connect("bob")
        with pytest.raises(PeerUnavailable):
            await alice.connect("nobody")
        assert r1.address is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x1e\xc1garbage", ("127.0.0.1", r1.address.port))
        await asyncio.sleep(1.5)  # at least one keepalive each
        status, text = await asyncio.to_thread(get, "/metrics")
    assert status == 200
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["natter_broker_registrations_total"] >= 2
    assert values['natter_broker_connect_requests_total{outcome="introduced"}'] >= 1
    assert values['natter_broker_connect_requests_total{outcome="unknown_peer"}'] >= 1
    assert values["natter_broker_punch_instructions_total"] >= 1
    assert values['natter_broker_frames_dropped_total{reason="bad_frame"}'] >= 1
    assert values['natter_broker_keepalives_total{result="ok"}'] >= 2
    assert values["natter_broker_active_peers"] >= 2
    assert values["natter_broker_ready"] == 1
    assert any(k.startswith("natter_broker_redis_latency_seconds_count") for k in values)


async def test_sentinel_url_finds_the_master(echo_port: int) -> None:
    """redis+sentinel://: the broker asks a real Sentinel for the master and uses it."""
    master = RedisProcess().start()
    sentinel_port = free_port()
    conf = os.path.join(master.dir, "sentinel.conf")
    with open(conf, "w") as handle:
        handle.write(
            f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor natter 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds natter 5000\n"
        )
    sentinel = subprocess.Popen(
        [master.binary, conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/natter/0"
        async with Broker(config(broker_addr="127.0.0.1:0", redis_url=url)) as broker:
            for _ in range(100):
                if broker.is_ready():
                    break
                await asyncio.sleep(0.1)
            assert broker.is_ready()
            async with (
                Client(config(client_user="bob", broker_addr=addr(broker))) as bob,
                Client(config(client_user="alice", broker_addr=addr(broker))) as alice,
            ):
                await bob.listen()
                fwd = await alice.forward("127.0.0.1:0", "bob", f":{echo_port}")
                assert fwd.local is not None
                assert await echo_check("127.0.0.1", fwd.local.port, os.urandom(100_000))
        keys = redis_client.Redis.from_url(master.url).keys("natter:owner:*")
        assert {k.decode() for k in keys} >= {"natter:owner:{bob}", "natter:owner:{alice}"}
    finally:
        sentinel.terminate()
        sentinel.wait(10)
        master.close()


async def test_the_relay_mesh_refuses_what_the_fleet_did_not_seal(
    redis: RedisProcess | RedisContainer,
) -> None:
    """Datagrams to a replica's mesh port: garbage, a datagram sealed with another secret
    and a replay are dropped and counted; the mesh address is announced in Redis."""
    import time

    from natter_proto.mesh import MeshSealer

    redis_client.Redis.from_url(redis.url).flushall()
    secret = "fleet-secret-for-the-test-0123"
    broker = Broker(
        config(
            broker_addr="127.0.0.1:0",
            redis_url=redis.url,
            broker_id="r9",
            mesh_addr="127.0.0.1:0",
            fleet_secret=secret,
        )
    )
    await broker.start()
    try:
        for _ in range(100):
            if broker.is_ready():
                break
            await asyncio.sleep(0.05)
        announced = await broker.registry.mesh_address("r9")
        assert announced is not None
        host, port = announced.rsplit(":", 1)
        forged = MeshSealer(b"another-secret-0123456789", "r1", 0).seal("bob", bytes(8), b"x" * 100)
        genuine = MeshSealer(secret.encode(), "r1", time.time_ns()).seal("bob", bytes(8), b"y" * 100)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in [b"", b"\x01", os.urandom(1400), forged, genuine, genuine]:
                sock.sendto(datagram, (host, int(port)))
        await asyncio.sleep(0.3)
        sample = broker.metrics.sample
        assert sample("natter_broker_frames_dropped_total", reason="mesh_bad_tag") >= 1
        assert sample("natter_broker_frames_dropped_total", reason="mesh_replayed") == 1
        assert sample("natter_broker_frames_dropped_total", reason="mesh_bad_frame") >= 1
        assert sample("natter_broker_mesh_packets_total", direction="received") == 1
        assert sample("natter_broker_frames_dropped_total", reason="relay_peer_gone") == 1  # no bob here
        assert broker.is_ready()
    finally:
        await broker.close()
