"""The natter command as separate processes, word for word as the seed writes it."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import tempfile

import pytest

from netcheck import digest_of_pattern, pattern
from procs import NATTER, direct, free_port, isolated_env, natter, server, tool
from sshd import Sshd
from sshd import available as sshd_unavailable

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def echo_server():  # type: ignore[no-untyped-def]
    proc, port = server("echo", "0")
    yield port
    proc.stop()


@pytest.mark.parametrize("engine_flag", [(), ("-quic-engine", "qh3")], ids=["default-engine", "qh3-flag"])
def test_seed_command_lines_forward_real_bytes(echo_server: int, engine_flag: tuple[str, ...]) -> None:
    bport = free_port()
    lport = free_port()
    broker = natter("-server", f"127.0.0.1:{bport}")
    bob = alice = None
    try:
        broker.wait_event("broker listening")
        bob = natter("-name", "bob", "-broker", f"127.0.0.1:{bport}", *engine_flag, "-listen")
        bob.wait_kind("registered", name="bob")
        alice = natter(
            "-name", "alice", "-broker", f"127.0.0.1:{bport}", *engine_flag, f"{lport}:bob:{echo_server}"
        )
        alice.wait_event(f"forwarding 127.0.0.1:{lport}")
        up = alice.wait_path("bob", direct)
        assert up["endpoint"].startswith("127.0.0.1:")
        assert "rtt_ms" in alice.wait_kind("tunnel_up", peer="bob")
        assert tool("echo-check", "127.0.0.1", str(lport), str(3 << 20)) == "ok"
        assert tool("echo-check", "127.0.0.1", str(lport), "1") == "ok"
    finally:
        for proc in (alice, bob, broker):
            if proc is not None:
                assert proc.stop() == 0, "\n".join(proc.raw_err[-20:])


def test_subcommands_and_stdio_mode(echo_server: int) -> None:
    bport = free_port()
    broker = natter("broker", "--listen", f"127.0.0.1:{bport}")
    bob = None
    try:
        broker.wait_event("broker listening")
        bob = natter("listen", "--name", "bob", "--broker", f"127.0.0.1:{bport}")
        bob.wait_kind("registered", name="bob")
        data = pattern(2 << 20, seed=5)
        # stdio mode, as ssh's ProxyCommand runs it: bytes in on stdin, out on stdout
        result = subprocess.run(
            [
                NATTER,
                "-name",
                "alice",
                "-broker",
                f"127.0.0.1:{bport}",
                f":bob:{echo_server}",
                "-log-format",
                "json",
            ],
            input=data,
            capture_output=True,
            timeout=60,
            check=False,
            env=isolated_env(),
        )
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
        assert len(result.stdout) == len(data)
    finally:
        for proc in (bob, broker):
            if proc is not None:
                proc.stop()


def test_stdio_mode_carries_bytes_both_ways_with_a_sink() -> None:
    sink, sink_port = server("sink", "0")
    bport = free_port()
    broker = natter("-server", f"127.0.0.1:{bport}")
    bob = None
    try:
        broker.wait_event("broker listening")
        bob = natter("-name", "bob", "-broker", f"127.0.0.1:{bport}", "-listen")
        bob.wait_kind("registered", name="bob")
        size = 5 << 20
        result = subprocess.run(
            [NATTER, "-name", "alice", "-broker", f"127.0.0.1:{bport}", f":bob:{sink_port}"],
            input=pattern(size),
            capture_output=True,
            timeout=60,
            check=False,
            env=isolated_env(),
        )
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert result.stdout.decode().split() == [str(size), digest_of_pattern(size)]
    finally:
        for proc in (bob, broker, sink):
            if proc is not None:
                proc.stop()


def test_unknown_peer_is_named_and_the_forward_keeps_retrying() -> None:
    bport = free_port()
    broker = natter("-server", f"127.0.0.1:{bport}")
    alice = None
    try:
        broker.wait_event("broker listening")
        alice = natter("-name", "alice", "-broker", f"127.0.0.1:{bport}", f"{free_port()}:nobody:22")
        failed = alice.wait_kind("introduction_failed")
        assert "nobody" in failed["reason"] and failed["broker"] == f"127.0.0.1:{bport}"
        alice.wait_event("cannot reach nobody, retrying")
        assert alice.popen.poll() is None  # still running, still trying
    finally:
        for proc in (alice, broker):
            if proc is not None:
                proc.stop()


@pytest.mark.parametrize(
    "argv",
    [
        ["-name", "alice", "-broker", "127.0.0.1:1", "80x:bob:22"],
        ["-name", "alice", "-broker", "nohost", "8022:bob:22"],
        ["-frobnicate"],
        ["forward", "--name", "alice", "--broker", "127.0.0.1:1"],
    ],
)
def test_usage_mistakes_exit_2_with_one_line(argv: list[str]) -> None:
    result = subprocess.run([NATTER, *argv], capture_output=True, timeout=30, check=False)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("natter: error:"), lines
    assert "Traceback" not in result.stderr.decode()


def test_runtime_failure_is_one_line_exit_1() -> None:
    bport = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", bport))
        result = subprocess.run(
            [NATTER, "-server", f"127.0.0.1:{bport}"], capture_output=True, timeout=30, check=False
        )
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "cannot listen on" in err and "Traceback" not in err


@pytest.mark.skipif(sshd_unavailable() is not None, reason=str(sshd_unavailable()))
def test_ssh_proxycommand_beside_a_forwarding_agent_of_the_same_name() -> None:
    """Seen: the README's ProxyCommand example started a second alice with the same state
    dir; the broker saw two alices and the forwarding one was told 21 times in 20 s that it
    was not registered. Now the ProxyCommand hands its connection to the running alice."""
    ssh_port, bport, lport = free_port(), free_port(), free_port()
    sshd = Sshd(ssh_port)
    broker = natter("-server", f"127.0.0.1:{bport}")
    state = tempfile.mkdtemp(prefix="natter-alice-")
    bob = alice = None
    try:
        broker.wait_event("broker listening")
        bob = natter("-name", "bob", "-broker", f"127.0.0.1:{bport}", "-listen")
        bob.wait_kind("registered", name="bob")
        alice = natter(
            "-name", "alice", "-broker", f"127.0.0.1:{bport}", "-state-dir", state, f"{lport}:bob:{ssh_port}"
        )
        alice.wait_path("bob", direct)
        proxy = f"{NATTER} -name alice -broker 127.0.0.1:{bport} -state-dir {state} :bob:{ssh_port}"
        for round_ in range(3):
            result = subprocess.run(
                sshd.ssh("bob", 22, "-o", f"ProxyCommand={proxy}", command=f"echo hello {round_}"),
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 0, result.stderr.decode()[-2000:]
            assert result.stdout.decode().strip() == f"hello {round_}"
        # the forward of the running alice kept working, and its registration was never disturbed
        through = subprocess.run(
            sshd.ssh("127.0.0.1", lport, command="echo through the forward"), capture_output=True, timeout=60
        )
        assert through.stdout.decode().strip() == "through the forward", through.stderr.decode()
        assert [e for e in alice.lines if e.get("event") == "stdio connection handed over"]
        troubles = [
            e for e in alice.lines if e.get("kind") == "registration_lost" or "not registered" in str(e)
        ]
        assert not troubles, troubles
        assert not [e for e in broker.lines if e.get("event") == "registered" and e.get("name") == "alice"][
            1:
        ]
    finally:
        for proc in (alice, bob, broker):
            if proc is not None:
                proc.stop()
        sshd.stop()
