"""A fleet of broker processes on one real Redis: replica loss, graceful shutdown with
goaway, and a Redis restart, while tunnels keep carrying checked bytes."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from netcheck import digest_of_pattern
from procs import Proc, direct, free_port, natter, server, tool
from redis_server import RedisContainer, RedisProcess, start_redis

pytestmark = pytest.mark.timeout(180)


class Fleet:
    def __init__(self, redis: RedisProcess | RedisContainer, replicas: int) -> None:
        self.redis = redis
        self.ports = [free_port() for _ in range(replicas)]
        self.metrics = [free_port() for _ in range(replicas)]
        self.procs: list[Proc] = []
        self.brokers = [self._broker(i) for i in range(replicas)]

    def _broker(self, i: int) -> Proc:
        proc = natter(
            "broker", "--listen", f"127.0.0.1:{self.ports[i]}", "--redis", self.redis.url,
            "--broker-id", f"r{i + 1}", "--metrics", f"127.0.0.1:{self.metrics[i]}",
            "--keepalive", "1", "--ttl", "4",
        )  # fmt: skip
        proc.wait_event("broker listening")
        self.procs.append(proc)
        return proc

    def addr(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def ready(self, i: int) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics[i]}/readyz", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def wait_ready(self, i: int, want: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ready(i) != want:
            assert time.monotonic() < deadline, f"replica {i + 1} never reported {want}"
            time.sleep(0.1)

    def agent(self, *args: str) -> Proc:
        proc = natter(*args, "--keepalive", "1")
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def redis() -> Iterator[RedisProcess | RedisContainer]:
    instance = start_redis()
    yield instance
    instance.close()


@pytest.fixture
def services() -> Iterator[tuple[int, int]]:
    echo, echo_port = server("echo", "0")
    sink, sink_port = server("sink", "0", str(2 << 20))  # 2 MB/s for its first 8 s
    yield echo_port, sink_port
    echo.stop()
    sink.stop()


def background(fn, *args):  # type: ignore[no-untyped-def]
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # reported by the test
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_replica_killed_agents_move_and_tunnel_keeps_flowing(
    redis: RedisProcess | RedisContainer, services: tuple[int, int]
) -> None:
    echo_port, sink_port = services
    fleet = Fleet(redis, 2)
    try:
        bob = fleet.agent("listen", "--name", "bob", "--broker", fleet.addr(1), "--broker", fleet.addr(0))
        bob.wait_event(f"registered as bob at {fleet.addr(1)}")
        up_port = free_port()
        alice = fleet.agent(
            "forward", "--name", "alice", "--broker", fleet.addr(0), f"{up_port}:bob:{sink_port}"
        )
        alice.wait_path("bob", direct)
        size = 24 << 20
        thread, result = background(tool, "send", "127.0.0.1", str(up_port), str(size))
        time.sleep(1.0)
        mark = bob.mark()
        fleet.brokers[1].popen.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        bob.wait_event(f"registered as bob at {fleet.addr(0)}", timeout=15, since=mark)
        moved_after = time.monotonic() - killed
        assert moved_after < 2 * 1.0 + 2.5, f"bob took {moved_after:.1f} s to move"
        thread.join(120)
        assert "error" not in result, result.get("error")
        assert str(result["value"]).split() == [str(size), digest_of_pattern(size)]
        # a new forward afterwards, introduced by the surviving replica
        new_port = free_port()
        dave = fleet.agent(
            "forward", "--name", "dave", "--broker", fleet.addr(0), f"{new_port}:bob:{echo_port}"
        )
        dave.wait_path("bob", direct)
        assert tool("echo-check", "127.0.0.1", str(new_port), str(1 << 20)) == "ok"
    finally:
        fleet.close()
        redis.close()


def test_graceful_shutdown_sends_goaway_and_no_forward_fails(
    redis: RedisProcess | RedisContainer, services: tuple[int, int]
) -> None:
    echo_port, _ = services
    fleet = Fleet(redis, 2)
    try:
        bob = natter("listen", "--name", "bob", "--broker", fleet.addr(1), "--broker", fleet.addr(0),
                     "--keepalive", "5")  # fmt: skip
        fleet.procs.append(bob)
        bob.wait_event(f"registered as bob at {fleet.addr(1)}")
        port = free_port()
        alice = fleet.agent(
            "forward", "--name", "alice", "--broker", fleet.addr(0), f"{port}:bob:{echo_port}"
        )
        alice.wait_path("bob", direct)

        def many_checks() -> list[str]:
            return [tool("echo-check", "127.0.0.1", str(port), str(256 << 10)) for _ in range(12)]

        thread, result = background(many_checks)
        mark = bob.mark()
        fleet.brokers[1].popen.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        moved = bob.wait_event("moving to broker", timeout=10, since=mark)
        assert "going away" in moved["reason"]
        bob.wait_event(f"registered as bob at {fleet.addr(0)}", timeout=10, since=mark)
        assert time.monotonic() - stopped < 5.0  # at once, not after two 5 s keepalive intervals
        assert fleet.brokers[1].popen.wait(10) == 0
        thread.join(120)
        assert "error" not in result, result.get("error")
        assert result["value"] == ["ok"] * 12
    finally:
        fleet.close()


def test_redis_restart_readiness_and_recovery(services: tuple[int, int]) -> None:
    """A redis-server process, not a container: it must come back on the same port."""
    echo_port, _ = services
    redis = RedisProcess().start()
    fleet = Fleet(redis, 2)
    try:
        fleet.wait_ready(0, 200)
        fleet.wait_ready(1, 200)
        bob = fleet.agent("listen", "--name", "bob", "--broker", fleet.addr(1))
        bob.wait_kind("registered", name="bob")
        port = free_port()
        alice = fleet.agent(
            "forward", "--name", "alice", "--broker", fleet.addr(0), f"{port}:bob:{echo_port}"
        )
        alice.wait_path("bob", direct)
        redis.stop()
        fleet.wait_ready(0, 503)
        fleet.wait_ready(1, 503)
        assert tool("echo-check", "127.0.0.1", str(port), str(1 << 20)) == "ok"  # tunnels don't need Redis
        mark = bob.mark()
        redis.resume()
        fleet.wait_ready(0, 200)
        fleet.wait_ready(1, 200)
        # Redis lost every key: bob's next keepalive is refused and bob registers again
        bob.wait_kind("registered", name="bob", timeout=15, since=mark)
        new_port = free_port()
        dave = fleet.agent(
            "forward", "--name", "dave", "--broker", fleet.addr(0), f"{new_port}:bob:{echo_port}"
        )
        dave.wait_path("bob", direct, timeout=30)
        assert tool("echo-check", "127.0.0.1", str(new_port), str(1 << 20)) == "ok"
    finally:
        fleet.close()
        redis.close()
