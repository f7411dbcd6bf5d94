"""The tunnel beside its anchors through the NAT lab, all in one run (needs root).

    sudo .venv/bin/python bench/lab_bench.py [--size-mb 200] [--skip-ssh] [--engine qh3|aioquic|native]

alice and bob each sit behind a port-restricted cone NAT (the common home router), the
broker on the lab's "internet". The anchors cross the same links and NAT boxes as natter's
punched path: bob's NAT forwards one TCP and one UDP port to bob (the port forward a user
would have to set up without natter).

1. one TCP connection of SIZE into a counting sink on bob's side: plain TCP through the port
   forward, ssh -L (sshd in bob's namespace behind the forward, ssh in alice's), each raw
   engine (bench/rawquic.py through the UDP forward), natter over the punched path
2. 100 parallel connections of 2 MB: straight through the port forward, and through the
   same natter tunnel as 1, beside that tunnel's one-connection figure
3. the round trip of a 64-byte request: through the port forward and through natter, idle
   and while 100 connections send through the same tunnel

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "bench"))

from tunnel_bench import (  # noqa: E402
    compare_parallel,
    parallel,
    raw_engine,
    row,
    ssh_tunnel,
    sshd_children,
    timed_send,
)

from labscene import Scene  # noqa: E402
from natlab import NatLab, unavailable_reason  # noqa: E402
from procs import NETCHECK, server, tool  # noqa: E402

BOB_WAN = "10.200.0.3"  # bob's NAT on the lab's internet (natlab.NatLab.build)
BOB_LAN = "192.168.2.2"
SSH_PORT = 2222
RAW_PORT = 4433
FORWARD_SINK, FORWARD_ECHO = 8000, 8001  # alice's natter forwards


def port_forward(lab: NatLab, proto: str, port: int) -> None:
    """bob's NAT sends what arrives on its WAN port to bob (the anchors' only way in)."""
    lab.sh("natB", "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", proto,
           "--dport", str(port), "-j", "DNAT", "--to-destination", f"{BOB_LAN}:{port}")  # fmt: skip
    lab.sh("natB", "iptables", "-I", "FORWARD", "1", "-i", "wan", "-p", proto, "-d", BOB_LAN,
           "--dport", str(port), "-j", "ACCEPT")  # fmt: skip


def run(size: int, skip_ssh: bool, engines: list[str]) -> None:
    with NatLab() as lab, tempfile.TemporaryDirectory() as tmp:
        alice, bob = lab.prefix("alice"), lab.prefix("bob")
        reachable = [*bob, "env", "NETCHECK_HOST=0.0.0.0"]  # on bob's LAN address too
        sink, sink_port = server("count", "0", prefix=reachable)
        echo, echo_port = server("echo", "0", prefix=reachable)
        for port in (sink_port, echo_port, SSH_PORT):
            port_forward(lab, "tcp", port)
        port_forward(lab, "udp", RAW_PORT)
        try:
            print("\n1. throughput, one TCP connection, alice -> bob across both NATs", flush=True)
            plain, cpu = timed_send(sink_port, size, [sink.pid], BOB_WAN, alice)
            row("plain TCP (through bob's port forward)", f"{plain:.0f} MB/s", f"{cpu:.1f} CPU s/GB (sink)")
            ssh_rate = None
            if not skip_ssh:
                started = ssh_tunnel(sink_port, Path(tmp), server_prefix=bob, client_prefix=alice,
                                     listen="0.0.0.0", connect=BOB_WAN, port=SSH_PORT)  # fmt: skip
                if started is None:
                    row("ssh -L", "n/a", "openssh-server not installed")
                else:
                    procs, local = started
                    pids = [p.pid for p in procs] + sshd_children(procs[0].pid)
                    ssh_rate, cpu = timed_send(local, size, pids, prefix=alice)
                    row("ssh -L (OpenSSH)", f"{ssh_rate:.1f} MB/s", f"{cpu:.1f} CPU s/GB (ssh + sshd)")
                    for proc in procs:
                        proc.terminate()
            for engine in engines:
                raw = None if engine == "native" else raw_engine(  # no raw quinn program here
                    engine, size, server_prefix=bob, client_prefix=alice,
                    bind="0.0.0.0", connect=BOB_WAN, port=RAW_PORT)  # fmt: skip
                natter_figures(lab, engine, size, sink_port, echo_port, raw, ssh_rate)
            print("\n   anchors for 2. and 3.", flush=True)
            total, fastest, slowest = parallel(sink_port, 100, 2 << 20, BOB_WAN, alice)
            row("100 connections straight through the port forward", f"{total:.1f} MB/s",
                f"fastest / slowest {fastest:.2f} / {slowest:.2f} MB/s")  # fmt: skip
            rtt = float(tool("rtt", BOB_WAN, str(echo_port), prefix=alice))
            row("request round trip through the port forward", f"{rtt:.3f} ms", "the path's raw RTT")
        finally:
            sink.stop()
            echo.stop()


def natter_figures(
    lab: NatLab, engine: str, size: int, sink_port: int, echo_port: int, raw: float | None, ssh: float | None
) -> None:
    alice = lab.prefix("alice")
    with Scene(lab, engine) as scene:
        scene.broker(10000)
        bob = scene.listener(10000, timeout=30)
        forwards = (f"{FORWARD_SINK}:bob:{sink_port}", f"{FORWARD_ECHO}:bob:{echo_port}")
        agent = scene.agent("alice", "alice", 10000, *forwards)
        agent.wait_event("direct path up with bob", timeout=40)
        tool("blast", "127.0.0.1", str(FORWARD_SINK), str(1 << 20), prefix=alice)  # warm
        pids = [agent.pid, bob.pid]
        rate, cpu = timed_send(FORWARD_SINK, size, pids, prefix=alice)
        row(
            f"natter tunnel ({engine}, punched direct path)",
            f"{rate:.1f} MB/s",
            f"{cpu:.1f} CPU s/GB (both agents)",
        )
        if raw is not None:
            row(f"natter / raw {engine}", f"{rate / raw:.0%}", "target >= 80%")
        if ssh:
            row(f"natter ({engine}) / ssh -L", f"{rate / ssh:.0%}", "target >= 50% with the fastest engine")
        print(f"\n2./3. through the same natter tunnel ({engine})", flush=True)
        compare_parallel(FORWARD_SINK, pids, size, prefix=alice)
        rtt = float(tool("rtt", "127.0.0.1", str(FORWARD_ECHO), prefix=alice))
        row("request round trip through natter", f"{rtt:.3f} ms", "target <= raw RTT + 2 ms")
        row(
            "... while 100 connections send through it",
            f"{loaded_rtt(alice):.3f} ms",
            "idle streams go first",
        )


def loaded_rtt(alice: list[str]) -> float:
    """The request round trip through natter while the same tunnel carries 100 bulk sends."""
    load = subprocess.Popen(
        [*alice, *NETCHECK, "parallel", "127.0.0.1", str(FORWARD_SINK), "100", str(4 << 20)],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)  # the bulk connections are under way
        return float(tool("rtt", "127.0.0.1", str(FORWARD_ECHO), "100", prefix=alice))
    finally:
        load.wait(timeout=600)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--skip-ssh", action="store_true")
    parser.add_argument(
        "--engine", action="append", choices=("aioquic", "qh3", "native"), help="default: both"
    )
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"NAT lab unavailable: {reason}")
        return 1
    engines = args.engine or ["aioquic", "qh3"]
    print(f"tunnel bench through the NAT lab (two port-restricted NATs), engines {', '.join(engines)}")
    run(args.size_mb << 20, args.skip_ssh, engines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
