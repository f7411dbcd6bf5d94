"""Security through the natter command: names stay bound across a broker restart (Redis),
the token list, and `natter id`."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import NATTER, free_port, natter, server, tool
from redis_server import RedisContainer, RedisProcess, start_redis

pytestmark = pytest.mark.timeout(120)


def natter_id(home: str) -> str:
    result = subprocess.run(
        [NATTER, "id"], capture_output=True, text=True, check=True, env=dict(os.environ, XDG_CONFIG_HOME=home)
    )
    return result.stdout.strip()


@pytest.fixture
def redis() -> Iterator[RedisProcess | RedisContainer]:
    instance = start_redis()
    yield instance
    instance.close()


def test_natter_id_is_stable_and_private() -> None:
    home = tempfile.mkdtemp()
    first = natter_id(home)
    assert first.startswith("nt1-") and natter_id(home) == first
    key = Path(home) / "natter" / "identity.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    other = subprocess.run(
        [NATTER, "id", "--state-dir", tempfile.mkdtemp()], capture_output=True, text=True, check=True
    )
    assert other.stdout.strip() != first


def test_name_stays_bound_across_a_broker_restart(redis: RedisProcess | RedisContainer) -> None:
    echo, echo_port = server("echo", "0")
    port = free_port()
    bob_home, mallory_home = tempfile.mkdtemp(), tempfile.mkdtemp()
    bob_key = natter_id(bob_home)
    procs = [echo]
    try:
        broker = natter("broker", "--listen", f"127.0.0.1:{port}", "--redis", redis.url)
        procs.append(broker)
        broker.wait_event("broker listening")
        bob = natter("-name", "bob", "-broker", f"127.0.0.1:{port}", "-listen", home=bob_home)
        procs.append(bob)
        bob.wait_kind("registered", name="bob")
        mallory = natter("-name", "bob", "-broker", f"127.0.0.1:{port}", "-listen", home=mallory_home)
        procs.append(mallory)
        refused = mallory.wait_event("broker refused registration")
        assert refused["code"] == "name_taken" and bob_key in refused["reason"]
        broker.wait_log(lambda e: e.get("event") == "refused registration" and e.get("code") == "name_taken")
        mallory.stop()
        broker.popen.send_signal(signal.SIGTERM)
        assert broker.popen.wait(10) == 0
        broker = natter("broker", "--listen", f"127.0.0.1:{port}", "--redis", redis.url)
        procs.append(broker)
        broker.wait_event("broker listening")
        mallory = natter("-name", "bob", "-broker", f"127.0.0.1:{port}", "-listen", home=mallory_home)
        procs.append(mallory)
        assert mallory.wait_event("broker refused registration")["code"] == "name_taken"
        lport = free_port()
        alice = natter("-name", "alice", "-broker", f"127.0.0.1:{port}", f"{lport}:bob:{echo_port}")
        procs.append(alice)
        learned = alice.wait_event("learned bob's key", timeout=30)
        assert learned["key"] == bob_key
        assert tool("echo-check", "127.0.0.1", str(lport), str(1 << 20)) == "ok"
        assert not any("direct path up" in str(e.get("event")) for e in mallory.lines)
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_token_list_restricts_registration() -> None:
    home_ok, home_other = tempfile.mkdtemp(), tempfile.mkdtemp()
    tokens = Path(tempfile.mkdtemp()) / "tokens"
    tokens.write_text(f"bob 0pen-sesame\n{natter_id(home_other)} k3y-for-carol\n")
    port = free_port()
    procs = []
    try:
        broker = natter("broker", "--listen", f"127.0.0.1:{port}", "--tokens", str(tokens))
        procs.append(broker)
        broker.wait_event("broker listening")
        ok = natter("listen", "--name", "bob", "--broker", f"127.0.0.1:{port}", "--token", "0pen-sesame",
                    home=home_ok)  # fmt: skip
        procs.append(ok)
        ok.wait_kind("registered", name="bob")
        by_key = natter(
            "listen", "--name", "carol", "--broker", f"127.0.0.1:{port}", "--token", "k3y-for-carol",
            home=home_other,
        )  # fmt: skip
        procs.append(by_key)
        by_key.wait_kind("registered", name="carol")
        stranger = natter("listen", "--name", "eve", "--broker", f"127.0.0.1:{port}", "--token", "guess")
        procs.append(stranger)
        assert stranger.wait_event("broker refused registration")["code"] == "not_authorized"
    finally:
        for proc in reversed(procs):
            proc.stop()
