"""Backpressure both ways: a slow reader slows the writer, and agent memory stays bounded.

aioquic buffers without limit unless natter bounds it. Here a reader takes 1 MB/s for
its first 8 seconds while the other side pushes 200 MB as fast as it can; then the reader
drains the rest at full speed. Every byte must arrive, and neither agent's resident
memory may grow by more than 64 MB over its warmed-up size.
"""

from __future__ import annotations

import threading
import time

import pytest

from netcheck import digest_of_pattern
from procs import Proc, direct, free_port, natter, server, tool

pytestmark = pytest.mark.timeout(300)

SIZE = 200 << 20
RATE = str(1 << 20)
LIMIT_KIB = 64 * 1024


class RssSampler:
    def __init__(self, *procs: Proc) -> None:
        self.procs = procs
        self.peak = {p.pid: p.rss_kib() for p in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in self.procs:
                self.peak[proc.pid] = max(self.peak[proc.pid], proc.rss_kib())
            time.sleep(0.1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def tunnel():  # type: ignore[no-untyped-def]
    sink, sink_port = server("sink", "0", RATE)
    source, source_port = server("source", "0", str(SIZE))
    bport, up_port, down_port = free_port(), free_port(), free_port()
    broker = natter("-server", f"127.0.0.1:{bport}")
    broker.wait_event("broker listening")
    bob = natter("-name", "bob", "-broker", f"127.0.0.1:{bport}", "-listen")
    bob.wait_kind("registered", name="bob")
    alice = natter(
        "-name",
        "alice",
        "-broker",
        f"127.0.0.1:{bport}",
        f"{up_port}:bob:{sink_port}",
        f"{down_port}:bob:{source_port}",
    )
    alice.wait_path("bob", direct)
    # warm up both paths so that the baseline includes imports, TLS and first buffers
    tool("send", "127.0.0.1", str(up_port), str(4 << 20))
    yield alice, bob, up_port, down_port
    for proc in (alice, bob, broker, sink, source):
        proc.stop()


def test_slow_reader_on_bob_bounds_memory(tunnel) -> None:  # type: ignore[no-untyped-def]
    alice, bob, up_port, _ = tunnel
    base = {p.pid: p.rss_kib() for p in (alice, bob)}
    with RssSampler(alice, bob) as rss:
        reply = tool("send", "127.0.0.1", str(up_port), str(SIZE), timeout=240)
    assert reply.split() == [str(SIZE), digest_of_pattern(SIZE)]
    for proc in (alice, bob):
        grown = rss.peak[proc.pid] - base[proc.pid]
        print(f"{proc.argv[2]}: RSS grew {grown} KiB")
        assert grown < LIMIT_KIB, f"{proc.argv[2]} grew by {grown} KiB"


def test_slow_reader_on_alice_bounds_memory(tunnel) -> None:  # type: ignore[no-untyped-def]
    alice, bob, _, down_port = tunnel
    base = {p.pid: p.rss_kib() for p in (alice, bob)}
    with RssSampler(alice, bob) as rss:
        got = tool("fetch", "127.0.0.1", str(down_port), RATE, timeout=240)
    assert got.split() == [str(SIZE), digest_of_pattern(SIZE, seed=7)]
    for proc in (alice, bob):
        grown = rss.peak[proc.pid] - base[proc.pid]
        print(f"{proc.argv[2]}: RSS grew {grown} KiB")
        assert grown < LIMIT_KIB, f"{proc.argv[2]} grew by {grown} KiB"
