"""What one local client can hold open, through real NATs with real clients: 2,000 idle
connections on one forward while ssh and an HTTP download go through other forwards to
the same peer. Needs root (see test_natlab.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from labscene import Scene
from natlab import NatLab
from procs import Proc, free_port
from sshd import Sshd
from sshd import available as sshd_unavailable

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(240)]

IDLE = 2000
CAP = 1024  # natter's default --max-connections

HOLDER = """
import socket, sys
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.connect(("127.0.0.1", int(sys.argv[1])))
    held.append(s)
print("held", len(held), flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.mark.skipif(sshd_unavailable() is not None, reason=str(sshd_unavailable()))
def test_idle_connections_on_one_forward_leave_ssh_and_a_download_through_others(lab: NatLab) -> None:
    """Seen before: bob allowed 100 streams at once; 100 idle connections on one forward
    made ssh and redis-cli through other forwards to bob fail after 23 s."""
    ssh_port, http_port = free_port(), free_port()
    idle_local, ssh_local, http_local = free_port(), free_port(), free_port()
    web = Path(tempfile.mkdtemp(prefix="natter-web-"))
    blob = bytes(range(256)) * (20 << 12)  # 20 MB
    (web / "blob").write_bytes(blob)
    with Scene(lab) as scene:
        scene.broker(10000)
        echo = scene.service("echo")  # accepts and answers nothing unless spoken to
        sshd = Sshd(ssh_port, prefix=lab.prefix("bob"))
        http = scene.add(
            Proc(
                [sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1", "-d", str(web)],
                prefix=lab.prefix("bob"),
            )
        )
        scene.listener(10000)
        alice = scene.agent(
            "alice",
            "alice",
            10000,
            f"{idle_local}:bob:{echo}",
            f"{ssh_local}:bob:{ssh_port}",
            f"{http_local}:bob:{http_port}",
        )
        alice.wait_kind("tunnel_up", peer="bob", timeout=30)
        holder = subprocess.Popen(
            [*lab.prefix("alice"), sys.executable, "-c", HOLDER, str(idle_local), str(IDLE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().split() == ["held", str(IDLE)]
            ssh = subprocess.run(
                [*lab.prefix("alice"), *sshd.ssh("127.0.0.1", ssh_local, command="echo ssh through natter")],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert ssh.returncode == 0 and ssh.stdout.strip() == "ssh through natter", ssh.stderr
            curl = subprocess.run(
                [
                    *lab.prefix("alice"),
                    "curl",
                    "-sS",
                    "--max-time",
                    "60",
                    f"http://127.0.0.1:{http_local}/blob",
                ],
                capture_output=True,
                timeout=90,
            )
            assert curl.returncode == 0, curl.stderr
            assert hashlib.sha256(curl.stdout).digest() == hashlib.sha256(blob).digest()
            alice.wait_log(lambda e: e.get("event") == "connection refused", timeout=30)
            refused = [e for e in alice.lines if e.get("event") == "connection refused"]
            assert len(refused) == IDLE - CAP
            assert "--max-connections" in str(refused[0].get("reason"))
        finally:
            holder.kill()
            holder.wait()
            sshd.stop()
            http.stop()
