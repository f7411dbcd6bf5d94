"""Config files behave like the flags they stand for, bad ones get one clear line, and
`natter status` reports a real tunnel's path and byte counts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from procs import NATTER, direct, free_port, natter, server, tool

pytestmark = pytest.mark.timeout(120)


def write(text: str) -> Path:
    path = Path(tempfile.mkdtemp()) / "natter.toml"
    path.write_text(text)
    return path


def refused_reasons(proc) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(e.get("reason")) for e in proc.lines if e.get("event") == "connection closed"]


@pytest.mark.parametrize("style", ["config", "flags"])
def test_config_file_equals_flags(style: str) -> None:
    sink, allowed = server("sink", "0")
    echo, other = server("echo", "0")
    bport, l1, l2 = free_port(), free_port(), free_port()
    procs = [sink, echo]
    try:
        broker = natter("-server", f"127.0.0.1:{bport}")
        procs.append(broker)
        broker.wait_event("broker listening")
        if style == "config":
            bob_cfg = write(
                f'name = "bob"\nbrokers = ["127.0.0.1:{bport}"]\nlisten = true\n'
                f'allow = ["alice"]\nallow_targets = ["127.0.0.1:{allowed}"]\n'
            )
            alice_cfg = write(
                f'name = "alice"\nbrokers = "127.0.0.1:{bport}"\n'
                f'[[forward]]\nlocal = "127.0.0.1:{l1}"\npeer = "bob"\nremote = "127.0.0.1:{allowed}"\n'
                f'[[forward]]\nspec = "{l2}:bob:127.0.0.1:{other}"\n'
            )
            bob = natter("agent", "--config", str(bob_cfg))
            alice = natter("agent", "--config", str(alice_cfg))
        else:
            bob = natter("listen", "--name", "bob", "--broker", f"127.0.0.1:{bport}", "--allow", "alice",
                         "--allow-target", f"127.0.0.1:{allowed}")  # fmt: skip
            alice = natter(
                "forward", "--name", "alice", "--broker", f"127.0.0.1:{bport}",
                f"127.0.0.1:{l1}:bob:127.0.0.1:{allowed}", f"{l2}:bob:127.0.0.1:{other}",
            )  # fmt: skip
        procs += [bob, alice]
        alice.wait_path("bob", direct, timeout=30)
        reply = tool("send", "127.0.0.1", str(l1), "100000")
        assert reply.split()[0] == "100000"
        with pytest.raises(AssertionError):
            tool("echo-check", "127.0.0.1", str(l2), "1000")
        alice.wait_log(lambda e: e.get("event") == "connection closed")
        assert any("target not allowed" in r for r in refused_reasons(alice))
    finally:
        for proc in reversed(procs):
            proc.stop()


BAD = {
    "syntax": ('name = "alice\n', "not valid TOML"),
    "unknown key": ('name = "alice"\ncolour = "blue"\n', ":2: colour: unknown key"),
    "wrong type": ('name = "alice"\nkeepalive = "often"\n', ":2: keepalive: must be a positive number"),
    "bad spec": ('name = "alice"\n[[forward]]\nspec = "80x:bob:22"\n', ":2: forward: bad forward spec"),
    "bad pin": ('name = "alice"\n[peers]\nbob = "nt1-nope"\n', ":2: peers: bob = 'nt1-nope'"),
    "bad allow": ('allow = ["not a name"]\n', ":1: allow:"),
    "bad broker": ('brokers = ["nohost"]\n', ":1: brokers: 'nohost' has no port"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_configs_get_one_clear_line(case: str) -> None:
    text, expected = BAD[case]
    path = write(text)
    for argv in (["config", "check", str(path), "--kind", "agent"], ["agent", "--config", str(path)]):
        result = subprocess.run([NATTER, *argv], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and expected in lines[0], lines


def test_config_check_accepts_good_files() -> None:
    agent = write('name = "alice"\nbrokers = ["b:1"]\n[[forward]]\nspec = "8022:bob:22"\n')
    broker = write('listen = ":10000"\nredis = "redis://r:6379/0"\nmetrics = ":9100"\n')
    for path, kind in ((agent, "agent"), (broker, "broker")):
        result = subprocess.run(
            [NATTER, "config", "check", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0 and f"valid {kind} config" in result.stdout


def test_status_reports_a_real_tunnel() -> None:
    sink, sink_port = server("sink", "0")
    bport, local = free_port(), free_port()
    home = tempfile.mkdtemp()
    procs = [sink]
    try:
        broker = natter("-server", f"127.0.0.1:{bport}")
        procs.append(broker)
        broker.wait_event("broker listening")
        bob = natter("-name", "bob", "-broker", f"127.0.0.1:{bport}", "-listen")
        procs.append(bob)
        bob.wait_kind("registered", name="bob")
        alice = natter(
            "-name", "alice", "-broker", f"127.0.0.1:{bport}", f"{local}:bob:{sink_port}", home=home
        )
        procs.append(alice)
        alice.wait_path("bob", direct)
        size = 3_000_000
        assert tool("send", "127.0.0.1", str(local), str(size)).split()[0] == str(size)
        env = dict(os.environ, XDG_CONFIG_HOME=home)
        out = subprocess.run(
            [NATTER, "status", "--json"], capture_output=True, text=True, env=env, check=True
        )
        status = json.loads(out.stdout)
        assert status["name"] == "alice" and status["registered"]
        (tunnel,) = status["tunnels"]
        assert tunnel["peer"] == "bob" and tunnel["path"] == "direct" and tunnel["rtt_ms"] > 0
        # payload plus one small stream header each way
        assert size <= tunnel["bytes_sent"] <= size + 200
        assert 0 < tunnel["bytes_received"] <= 200
        assert tunnel["connections"] == 1 and tunnel["open_connections"] == 0
        text = subprocess.run([NATTER, "status"], capture_output=True, text=True, env=env, check=True).stdout
        assert "tunnel bob" in text and "direct" in text and "2.9 MB" in text
        missing = subprocess.run(
            [NATTER, "status", "--state-dir", tempfile.mkdtemp()], capture_output=True, text=True, check=False
        )
        assert missing.returncode == 1 and "no agent answers" in missing.stderr
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_status_reports_udp_flows_and_a_socks_forward_from_a_config_file() -> None:
    """A UDP forward and a SOCKS forward from TOML; status counts flows and datagrams."""
    from udpcheck import ask, socks_request

    echo = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("udpcheck.py")), "echo", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert echo.stdout is not None
    echo_port = int(echo.stdout.readline().split()[1])
    bport, udp_local, socks_local = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    home = tempfile.mkdtemp()
    procs = []
    try:
        broker = natter("-server", f"127.0.0.1:{bport}")
        procs.append(broker)
        broker.wait_event("broker listening")
        bob = natter("-name", "bob", "-broker", f"127.0.0.1:{bport}", "-listen")
        procs.append(bob)
        bob.wait_kind("registered", name="bob")
        alice_cfg = write(
            f'name = "alice"\nbrokers = "127.0.0.1:{bport}"\nudp_idle_timeout = 30\n'
            f'[[forward]]\nspec = "127.0.0.1:{udp_local}:bob:127.0.0.1:{echo_port}"\nproto = "udp"\n'
            f'[[forward]]\ndynamic = true\nlocal = "127.0.0.1:{socks_local}"\npeer = "bob"\n'
        )
        alice = natter("agent", "--config", str(alice_cfg), home=home)
        procs.append(alice)
        alice.wait_event("SOCKS5 on")
        for i in range(3):
            assert ask("127.0.0.1", udp_local, f"datagram {i}".encode()) == f"datagram {i}".encode()
        code, sock = socks_request(("127.0.0.1", socks_local), 1, 1, socket.inet_aton("10.255.255.1"), 80)
        sock.close()
        assert code == 0x02
        env = dict(os.environ, XDG_CONFIG_HOME=home)
        status = [NATTER, "status", "--json"]
        out = subprocess.run(status, capture_output=True, text=True, env=env, check=True)
        udp, socks = json.loads(out.stdout)["forwards"]
        assert udp["target"] == f"127.0.0.1:{echo_port}/udp" and udp["flows"] >= 1
        assert udp["datagrams_in"] >= 3 and udp["datagrams_out"] >= 3 and udp["dropped"] == {}
        assert socks["target"] == "SOCKS5" and socks["failures"] == {"not_allowed": 1}
        text = subprocess.run([NATTER, "status"], capture_output=True, text=True, env=env, check=True).stdout
        assert "/udp" in text and "flows" in text and "1 SOCKS failures" in text, text
    finally:
        for proc in reversed(procs):
            proc.stop()
        echo.kill()
        echo.wait()
