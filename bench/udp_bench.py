"""UDP forwards beside plain UDP on the same path, in one run: iperf3 -u rate and loss, and
DNS round trips (dnsmasq) against the tunnel's own RTT.

    .venv/bin/python bench/udp_bench.py [--engine qh3|aioquic|native ...] [--seconds 3]
    sudo .venv/bin/python bench/udp_bench.py --lab     # across the NAT lab's two NATs

On loopback the anchors reach the servers directly; in the NAT lab they go through a port
forward on bob's NAT (what a user without natter would have to set up), natter over its
punched path. iperf3's control connection takes a TCP forward beside the UDP one. Needs
iperf3 and dnsmasq (./scripts/setup.sh installs them). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "bench"))

from lab_bench import port_forward  # noqa: E402
from tunnel_bench import row  # noqa: E402

from natlab import INET_IP, NatLab, unavailable_reason  # noqa: E402
from natter_agent.engines.native import available as native_available  # noqa: E402
from procs import NATTER, Proc, free_port, natter  # noqa: E402

RATES = ("50M", "200M", "1G")  # offered load; iperf3 -u sends at this rate, the sink counts
DATAGRAM = 1000  # bytes per datagram: fits every engine's tunnel (natter drops larger ones)
DNS_NAME, DNS_ANSWER = "natter.test", "10.9.8.7"
IPERF_PORT, DNS_PORT = 5201, 5300
BOB_WAN, BOB_LAN = "10.200.0.3", "192.168.2.2"


def dns_query(ident: int) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in DNS_NAME.split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\x00\x00\x01\x00\x01"


DNS_PROBE = r"""
import socket, struct, sys, time, statistics
host, port, count, query = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
times = []
for i in range(count):
    q = struct.pack("!H", i) + query[2:]
    start = time.perf_counter(); s.sendto(q, (host, port))
    try:
        while True:
            data, _ = s.recvfrom(2048)
            if data[:2] == q[:2]:
                times.append((time.perf_counter() - start) * 1000); break
    except TimeoutError:
        pass
times.sort()
print(len(times), statistics.median(times[5:] or times), times[int(len(times) * 0.99) - 1])
"""


def dns_rtt(host: str, port: int, prefix: Sequence[str], count: int = 300) -> tuple[int, float, float]:
    """(answered, median ms, p99 ms) of DNS queries from a process of its own."""
    argv = [*prefix, sys.executable, "-c", DNS_PROBE, host, str(port), str(count), dns_query(0).hex()]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def iperf(host: str, port: int, rate: str, seconds: float, prefix: Sequence[str]) -> tuple[float, float]:
    """iperf3 -u at ``rate``: (Mbit/s the receiver got, % lost), from the receiver's report."""
    argv = [*prefix, "iperf3", "-c", host, "-p", str(port), "-u", "-b", rate, "-l", str(DATAGRAM)]
    result = subprocess.run(
        [*argv, "-t", str(seconds), "-J"], capture_output=True, text=True, timeout=120, check=False
    )
    try:
        end = json.loads(result.stdout)["end"]["sum"]
    except (ValueError, KeyError):
        return float("nan"), float("nan")
    received = end["bits_per_second"] * (1 - end["lost_percent"] / 100) / 1e6
    return received, float(end["lost_percent"])


def servers(prefix: Sequence[str], hosts: Sequence[str], workdir: Path) -> list[Proc]:
    """dnsmasq answering DNS_NAME and an iperf3 server, on ``hosts``."""
    dnsmasq = [
        "/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", "--user=root", f"--pid-file={workdir / 'dnsmasq.pid'}", f"--port={DNS_PORT}",
        "--bind-interfaces", f"--address=/{DNS_NAME}/{DNS_ANSWER}",
        *(f"--listen-address={host}" for host in hosts),
    ]  # fmt: skip
    procs = [Proc(dnsmasq, prefix=prefix), Proc(["iperf3", "-s", "-p", str(IPERF_PORT)], prefix=prefix)]
    time.sleep(0.5)
    return procs


@contextmanager
def tunnel(
    engine: str, broker: str, local_offset: int, prefixes: tuple[Sequence[str], Sequence[str]]
) -> Iterator[Proc]:
    """bob listening, alice forwarding iperf3 (TCP control and UDP data) and DNS to bob's
    loopback, on the servers' ports plus ``local_offset``."""
    alice_ns, bob_ns = prefixes
    common = ["-broker", broker, "-quic-engine", engine]
    bob = natter("-name", "bob", *common, "-listen", prefix=bob_ns)
    bob.wait_event("registered as bob")
    iperf_local, dns_local = IPERF_PORT + local_offset, DNS_PORT + local_offset
    alice = natter(
        "-name", "alice", *common, f"{iperf_local}:bob:{IPERF_PORT}", f"{iperf_local}:bob:{IPERF_PORT}/udp",
        f"{dns_local}:bob:{DNS_PORT}/udp", prefix=alice_ns,
    )  # fmt: skip
    try:
        alice.wait_event("direct path up with bob", timeout=30)
        yield alice
    finally:
        alice.stop()
        bob.stop()


def tunnel_rtt(alice: Proc, prefix: Sequence[str]) -> float:
    env = dict(os.environ, XDG_CONFIG_HOME=alice.home)
    argv = [*prefix, "env", f"XDG_CONFIG_HOME={alice.home}", NATTER, "status", "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    tunnels = json.loads(out.stdout)["tunnels"] if out.returncode == 0 else []
    return float(tunnels[0]["rtt_ms"]) if tunnels else float("nan")


def measure(label: str, host: str, offset: int, prefix: Sequence[str], seconds: float) -> None:
    for rate in RATES:
        got, lost = iperf(host, IPERF_PORT + offset, rate, seconds, prefix)
        row(f"{label}, iperf3 -u -b {rate}", f"{got:.0f} Mbit/s", f"{lost:.2f} % lost")
    answered, median, p99 = dns_rtt(host, DNS_PORT + offset, prefix)
    row(
        f"{label}, DNS round trip (dnsmasq)", f"{median:.3f} ms", f"p99 {p99:.3f} ms, {answered}/300 answered"
    )


def run(engines: list[str], seconds: float, lab: NatLab | None) -> None:
    alice_ns = lab.prefix("alice") if lab is not None else ()
    bob_ns = lab.prefix("bob") if lab is not None else ()
    broker_ns = lab.prefix("inet") if lab is not None else ()
    broker_host = INET_IP if lab is not None else "127.0.0.1"
    anchor_host = BOB_WAN if lab is not None else "127.0.0.1"
    offset = 0 if lab is not None else 10000  # on one loopback alice's ports cannot be the servers'
    with tempfile.TemporaryDirectory() as tmp:
        hosts = ("127.0.0.1", BOB_LAN) if lab is not None else ("127.0.0.1",)
        procs = servers(bob_ns, hosts, Path(tmp))
        if lab is not None:
            for proto in ("tcp", "udp"):
                port_forward(lab, proto, IPERF_PORT)
            port_forward(lab, "udp", DNS_PORT)
        try:
            where = "across the NAT lab" if lab is not None else "on loopback"
            print(f"\nUDP {where}: plain, then through natter's UDP forwards", flush=True)
            plain = "plain UDP (through bob's port forward)" if lab is not None else "plain UDP"
            measure(plain, anchor_host, 0, alice_ns, seconds)
            for engine in engines:  # a broker each: new agents, new keys, the same names
                broker_addr = f"{broker_host}:{free_port()}"
                broker = natter("-server", broker_addr, prefix=broker_ns)
                broker.wait_event("broker listening")
                try:
                    with tunnel(engine, broker_addr, offset, (alice_ns, bob_ns)) as alice:
                        measure(f"natter {engine}", "127.0.0.1", offset, alice_ns, seconds)
                        rtt = tunnel_rtt(alice, alice_ns)
                        row(f"natter {engine}, the tunnel's RTT (natter status)", f"{rtt:.3f} ms")
                finally:
                    broker.stop()
        finally:
            for proc in procs:
                proc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", action="append", choices=("aioquic", "qh3", "native"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--lab", action="store_true", help="across the NAT lab (needs root)")
    args = parser.parse_args()
    missing = [tool for tool in ("iperf3",) if shutil.which(tool) is None]
    if missing or not Path("/usr/sbin/dnsmasq").exists():
        print("udp_bench: needs iperf3 and dnsmasq (./scripts/setup.sh installs them)", file=sys.stderr)
        return 2
    engines = args.engine or ["qh3", "native", "aioquic"]
    if "native" in engines and not native_available():
        print("udp_bench: the native engine is not built here; skipping it", file=sys.stderr)
        engines.remove("native")
    if not args.lab:
        run(engines, args.seconds, None)
        return 0
    reason = unavailable_reason()
    if reason is not None:
        print(f"udp_bench: no NAT lab: {reason}", file=sys.stderr)
        return 2
    with NatLab() as lab:
        run(engines, args.seconds, lab)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
