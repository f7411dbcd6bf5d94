"""UDP and SOCKS forwards across two real NATs, with real clients on every engine:
dig through a UDP forward against dnsmasq on bob's side, iperf3 -u, curl through the
SOCKS forward, and ssh with ``ProxyCommand='nc -X 5 -x 127.0.0.1:1080 %h %p'``.

Needs root and network namespaces (skipped elsewhere with the reason, never in CI), and
Debian's bind9-dnsutils, dnsmasq-base, iperf3, netcat-openbsd and openssh-server
(``./scripts/setup.sh`` installs them).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engines import ENGINES
from labscene import Scene
from natlab import NatLab
from procs import Proc, direct, free_port
from sshd import Sshd
from sshd import available as sshd_unavailable

pytestmark = [pytest.mark.natlab, pytest.mark.timeout(240)]

TOOLS = {"dig": "bind9-dnsutils", "iperf3": "iperf3", "nc": "netcat-openbsd", "curl": "curl"}
MISSING = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
if not Path("/usr/sbin/dnsmasq").exists():
    MISSING.append("dnsmasq-base")
DNS_NAME, DNS_ANSWER = "natter.test", "10.9.8.7"


def run_in(lab: NatLab, role: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*lab.prefix(role), *argv], capture_output=True, text=True, timeout=timeout, check=False
    )


def dig(lab: NatLab, port: int) -> str:
    """The A record through alice's UDP forward, asked until the tunnel is up."""
    deadline = time.monotonic() + 30
    answer = run_in(lab, "alice", ["dig", "@127.0.0.1", "-p", str(port), DNS_NAME, "+short", "+time=1"])
    while answer.stdout.strip() != DNS_ANSWER and time.monotonic() < deadline:
        answer = run_in(lab, "alice", ["dig", "@127.0.0.1", "-p", str(port), DNS_NAME, "+short", "+time=1"])
    return answer.stdout.strip()


@pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} (./scripts/setup.sh)")
@pytest.mark.skipif(sshd_unavailable() is not None, reason=str(sshd_unavailable()))
@pytest.mark.parametrize("engine", ENGINES)
def test_dig_iperf3_curl_and_ssh_through_udp_and_socks_forwards(lab: NatLab, engine: str) -> None:
    dns_port, iperf_port, http_port, ssh_port = 5300, 5201, free_port(), free_port()
    dns_local, socks_local = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="natter-udp-socks-"))
    blob = hashlib.sha256(b"natter").digest() * (1 << 15)  # 1 MiB
    (work / "blob").write_bytes(blob)
    with Scene(lab, engine) as scene:
        scene.broker(10000)
        scene.add(
            Proc(
                [
                    "/usr/sbin/dnsmasq",
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--user=root",
                    f"--pid-file={work / 'dnsmasq.pid'}",
                    f"--port={dns_port}",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    f"--address=/{DNS_NAME}/{DNS_ANSWER}",
                ],
                prefix=lab.prefix("bob"),
            )
        )
        scene.add(Proc(["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"], prefix=lab.prefix("bob")))
        scene.add(
            Proc(
                [sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1", "-d", str(work)],
                prefix=lab.prefix("bob"),
            )
        )
        sshd = Sshd(ssh_port, prefix=lab.prefix("bob"))
        scene.add(sshd.proc)
        bob = scene.listener(10000)
        alice = scene.agent(
            "alice",
            "alice",
            10000,
            f"{dns_local}:bob:{dns_port}/udp",
            f"{iperf_port}:bob:{iperf_port}",
            f"{iperf_port}:bob:{iperf_port}/udp",
            "-D",
            f"{socks_local}:bob",
            "-udp-idle-timeout",
            "30",
        )
        alice.wait_path("bob", direct, timeout=30)

        # DNS: dig through the UDP forward against dnsmasq on bob's loopback
        assert dig(lab, dns_local) == DNS_ANSWER

        # curl through the SOCKS forward: "localhost" is resolved on bob's side
        curl = run_in(
            lab,
            "alice",
            [
                "curl",
                "-sS",
                "--max-time",
                "60",
                "--socks5-hostname",
                f"127.0.0.1:{socks_local}",
                f"http://localhost:{http_port}/blob",
                "-o",
                str(work / "fetched"),
            ],
            timeout=90,
        )
        assert curl.returncode == 0, curl.stderr
        assert (work / "fetched").read_bytes() == blob

        # ssh through the SOCKS forward with OpenBSD nc as its ProxyCommand
        proxy = f"ProxyCommand=nc -X 5 -x 127.0.0.1:{socks_local} %h %p"
        ssh = run_in(lab, "alice", sshd.ssh("localhost", ssh_port, "-o", proxy, command="echo ssh via socks"))
        assert ssh.returncode == 0 and ssh.stdout.strip() == "ssh via socks", ssh.stderr

        # a target bob does not allow: the SOCKS client hears 0x02, not a hang
        denied = run_in(
            lab,
            "alice",
            [
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--socks5",
                f"127.0.0.1:{socks_local}",
                "http://10.200.0.1:9/",
            ],
        )
        assert denied.returncode == 97 and "(2)" in denied.stderr, denied.stderr  # curl: SOCKS5 reply 2
        bob.wait_log(lambda e: e.get("event") == "refused stream" and e.get("reason") == "target not allowed")
        alice.wait_log(lambda e: e.get("event") == "SOCKS request failed" and "0x02" in e.get("reply", ""))

        # iperf3 -u: its control connection over the TCP forward, its datagrams over the UDP one
        iperf = run_in(
            lab,
            "alice",
            [
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                str(iperf_port),
                "-u",
                "-b",
                "20M",
                "-l",
                "1000",
                "-t",
                "2",
                "-J",
            ],
            timeout=60,
        )
        assert iperf.returncode == 0, iperf.stdout[-2000:] + iperf.stderr
        summary = json.loads(iperf.stdout)["end"]["sum"]
        assert summary["packets"] > 1000, summary
        assert summary["lost_percent"] < 20, summary  # a loaded lab loses some; not most
