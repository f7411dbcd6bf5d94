"""A NAT lab in Linux network namespaces: real MASQUERADE NATs that drop unsolicited traffic.

            [inet: br0 10.200.0.1/24]  (broker lives here)
             |                      |
      wan 10.200.0.2          wan 10.200.0.3
        [natA]                   [natB]
      lan 192.168.1.1          lan 192.168.2.1
             |                      |
      eth0 192.168.1.2        eth0 192.168.2.2
        [alice]                  [bob]
   (and carol, 192.168.1.3, on alice's LAN: two clients behind one NAT)

With ``cgnat=True`` natA and natB sit behind one more NAT (wan 10.200.0.4, inside
100.64.0.0/24, no hairpinning): two homes on one carrier's shared public address.

Every veth is created with both ends directly inside namespaces of this lab, so the host's
own namespace never sees a new interface. Names carry the creating process id; namespaces
of dead runs are removed at start, and every lab removes its own on exit, also on failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "ntl"
FULL_CONE_PORT = 40000  # agents behind a "full" NAT must use this UDP port (--udp-port)
INET_IP = "10.200.0.1"
INET_IP6 = "fd00:200::1"  # the internet's IPv6 side, where a broker listens (family != "v4")
CGNAT_IP = "10.200.0.4"  # the carrier-grade NAT's public address (NatLab(cgnat=True))
CGNAT_NET = "100.64.0"  # its inside: the home NATs' WAN addresses (RFC 6598)


class LabUnavailable(Exception):
    """This machine cannot build the lab (not root, no netns, no iptables)."""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs {tool} (apt-get install iproute2 iptables)"
    probe = f"{PREFIX}{os.getpid()}-probe{uuid.uuid4().hex[:4]}"
    if run("ip", "netns", "add", probe, check=False).returncode != 0:
        return "cannot create network namespaces here"
    run("ip", "netns", "del", probe, check=False)
    return None


def require_lab() -> None:
    """Skip the calling test with the reason where the lab cannot be built; in CI, fail."""
    import pytest

    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"NAT lab required in CI: {reason}")
        pytest.skip(reason)


def remove_stale_namespaces() -> None:
    """Delete namespaces left by earlier runs whose process is gone."""
    listing = run("ip", "netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.match(rf"^{PREFIX}(\d+)-", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            run("ip", "netns", "del", name, check=False)
    for directory in Path("/etc/netns").glob(f"{PREFIX}*-*") if Path("/etc/netns").is_dir() else []:
        match = re.match(rf"^{PREFIX}(\d+)-", directory.name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            shutil.rmtree(directory, ignore_errors=True)  # a dead run's name_hosts


@dataclass
class NatLab:
    """One lab: namespaces named ``ntl<pid>-<tag>-<role>``."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:4])
    created: list[str] = field(default_factory=list)
    etc: list[Path] = field(default_factory=list)  # /etc/netns/NS directories made for it
    # what stands in front of alice (natA) and bob (natB), in RFC 4787 terms:
    # "restricted" endpoint-independent mapping, address-and-port-dependent filtering (the
    # common home router); "full" the same with endpoint-independent filtering for the
    # agent's port (FULL_CONE_PORT); "symmetric" endpoint-dependent mapping; "none" no NAT
    kind_a: str = "restricted"
    kind_b: str = "restricted"
    # both home NATs behind one carrier-grade NAT (RFC 6598 space, one public IP, no
    # hairpinning): natA and natB sit on the cgnat's inside bridge instead of the internet's
    cgnat: bool = False
    # a third home router, natC (LAN 192.168.3.0/24, nobody behind it yet): somewhere for a
    # client to move to (``move``), as a laptop moves from one network to another
    spare: bool = False
    # IPv6 too: "v6" an IPv6-only network (alice and bob have no IPv4 at all), "dual" both;
    # natA and natB are then also IPv6 routers with a stateful firewall (the home default:
    # no NAT, unsolicited inbound dropped); the internet is fd00:200::/64, INET_IP6 the broker
    family: str = "v4"

    def ns(self, role: str) -> str:
        return f"{PREFIX}{os.getpid()}-{self.tag}-{role}"

    def prefix(self, role: str) -> list[str]:
        """argv prefix that runs a command inside the role's namespace."""
        return ["ip", "netns", "exec", self.ns(role)]

    def sh(self, role: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return run(*self.prefix(role), *argv)

    def __enter__(self) -> NatLab:
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def build(self) -> None:
        roles = ["inet", "natA", "natB", "alice", "bob", "carol"]
        roles += (["cgnat"] if self.cgnat else []) + (["natC"] if self.spare else [])
        for role in roles:
            run("ip", "netns", "add", self.ns(role))
            self.created.append(self.ns(role))
            self.sh(role, "ip", "link", "set", "lo", "up")
        self.sh("inet", "ip", "link", "add", "br0", "type", "bridge")
        self.sh("inet", "ip", "addr", "add", f"{INET_IP}/24", "dev", "br0")
        self.sh("inet", "ip", "link", "set", "br0", "up")
        upstream, wan_net = ("inet", "10.200.0")
        if self.cgnat:
            self._nat("cgnat", None, "restricted", wan_ip=CGNAT_IP, lan_net=CGNAT_NET)
            upstream, wan_net = ("cgnat", CGNAT_NET)
        for nat, client, kind, wan, lan, public in (
            ("natA", "alice", self.kind_a, f"{wan_net}.2", "192.168.1", "10.200.0.12"),
            ("natB", "bob", self.kind_b, f"{wan_net}.3", "192.168.2", "10.200.0.13"),
        ):
            if kind == "none":
                self._public_client(client, public)
            else:
                self._nat(nat, client, kind, wan_ip=wan, lan_net=lan, upstream=upstream)
        if self.family != "v4":
            self._ipv6()
        if self.spare:
            self._nat(
                "natC", None, "restricted", wan_ip=f"{wan_net}.5", lan_net="192.168.3", upstream=upstream
            )

    def _ipv6(self) -> None:
        """IPv6 on the internet and behind natA (fd00:1::/64) and natB (fd00:2::/64)."""
        self.sh("inet", "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self.sh("inet", "ip", "-6", "addr", "add", f"{INET_IP6}/64", "dev", "br0", "nodad")
        homes = (("natA", "alice", "fd00:200::2", "fd00:1::"), ("natB", "bob", "fd00:200::3", "fd00:2::"))
        for nat, client, wan, lan in homes:
            self.sh("inet", "ip", "-6", "route", "add", f"{lan}/64", "via", wan)
            self.sh(nat, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            self.sh(nat, "ip", "-6", "addr", "add", f"{wan}/64", "dev", "wan", "nodad")
            self.sh(nat, "ip", "-6", "addr", "add", f"{lan}1/64", "dev", "lan", "nodad")
            self.sh(nat, "ip", "-6", "route", "add", "default", "via", INET_IP6)
            for chain in ("FORWARD", "INPUT"):  # stateful: replies in, nothing unsolicited
                self.sh(nat, "ip6tables", "-A", chain, "-i", "wan", "-m", "conntrack", "--ctstate",
                        "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
                self.sh(nat, "ip6tables", "-A", chain, "-i", "wan", "-p", "ipv6-icmp", "-j", "ACCEPT")
                self.sh(nat, "ip6tables", "-A", chain, "-i", "wan", "-j", "DROP")
            self.sh(client, "ip", "-6", "addr", "add", f"{lan}2/64", "dev", "eth0", "nodad")
            self.sh(client, "ip", "-6", "route", "add", "default", "via", f"{lan}1")
            if self.family == "v6":  # no IPv4 at all on the hosts
                self.sh(client, "ip", "-4", "route", "flush", "all")
                self.sh(client, "ip", "-4", "addr", "flush", "dev", "eth0")
        # link-local addresses (neighbour discovery's) are tentative for a second after a
        # link comes up: wait, so that no test's first packets meet a network still starting
        deadline = time.monotonic() + 5
        roles = ("inet", "natA", "natB", "alice", "bob")
        while time.monotonic() < deadline and any(
            self.sh(role, "ip", "-6", "addr", "show", "tentative").stdout.strip() for role in roles
        ):
            time.sleep(0.1)

    def name_hosts(self, text: str, *roles: str) -> None:
        """An /etc/hosts of their own for these namespaces (``ip netns exec`` mounts
        /etc/netns/NS/hosts over /etc/hosts); removed with the lab."""
        for role in roles:
            directory = Path("/etc/netns") / self.ns(role)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n" + text)
            self.etc.append(directory)

    def move(self, client: str, nat: str = "natC", lan_net: str = "192.168.3") -> str:
        """Unplug the client from its LAN and plug it into ``nat``'s: its address changes
        (its sockets stay; their packets leave from the new address). Returns it."""
        self.sh(client, "ip", "link", "del", "eth0")  # its peer end on the old LAN goes too
        self._lan_client(nat, client, lan_net, 2)
        return f"{lan_net}.2"

    def _public_client(self, client: str, address: str) -> None:
        """A client straight on the internet bridge, no NAT."""
        port = f"d{client[:6]}"
        self._veth("inet", port, client, "eth0")
        self.sh("inet", "ip", "link", "set", port, "master", "br0")
        self.sh("inet", "ip", "link", "set", port, "up")
        self.sh(client, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        self.sh(client, "ip", "link", "set", "eth0", "up")

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        run(
            "ip",
            "link",
            "add",
            name_a,
            "netns",
            self.ns(ns_a),
            "type",
            "veth",
            "peer",
            "name",
            name_b,
            "netns",
            self.ns(ns_b),
        )

    def _nat(
        self, nat: str, client: str | None, kind: str, *, wan_ip: str, lan_net: str, upstream: str = "inet"
    ) -> None:
        """A NAT whose WAN is on ``upstream``'s bridge (the internet's, or a CGNAT's LAN)
        and whose LAN bridge holds ``client`` (none: the CGNAT itself, whose LAN is NATs)."""
        port = f"p{nat}"
        bridge, gateway = ("br0", INET_IP) if upstream == "inet" else ("lan", f"{CGNAT_NET}.1")
        self._veth(nat, "wan", upstream, port)
        self.sh(upstream, "ip", "link", "set", port, "master", bridge)
        self.sh(upstream, "ip", "link", "set", port, "up")
        # the LAN side is a bridge, so that a second client can share the NAT (no hairpin)
        self.sh(nat, "ip", "link", "add", "lan", "type", "bridge")
        if client is not None:
            self._lan_client(nat, client, lan_net, 2)
        self.sh(nat, "ip", "addr", "add", f"{wan_ip}/24", "dev", "wan")
        self.sh(nat, "ip", "addr", "add", f"{lan_net}.1/24", "dev", "lan")
        self.sh(nat, "ip", "link", "set", "wan", "up")
        self.sh(nat, "ip", "link", "set", "lan", "up")
        self.sh(nat, "ip", "route", "add", "default", "via", gateway)
        self.sh(nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # a home router: MASQUERADE out, and no unsolicited traffic in (FORWARD and INPUT,
        # see shared/NATLAB.md on why INPUT matters for hole punching)
        masquerade = ["-j", "MASQUERADE"]
        if kind == "symmetric":
            masquerade.append("--random-fully")  # endpoint-dependent mapping
        self.sh(nat, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", *masquerade)
        if kind == "full":  # anyone may send to the agent's mapped port
            client_ip = f"{lan_net}.2"
            self.sh(nat, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "udp",
                    "--dport", str(FULL_CONE_PORT), "-j", "DNAT", "--to-destination",
                    f"{client_ip}:{FULL_CONE_PORT}")  # fmt: skip
            self.sh(nat, "iptables", "-A", "FORWARD", "-i", "wan", "-p", "udp", "-d", client_ip,
                    "--dport", str(FULL_CONE_PORT), "-j", "ACCEPT")  # fmt: skip
        for chain in ("FORWARD", "INPUT"):
            self.sh(
                nat,
                "iptables",
                "-A",
                chain,
                "-i",
                "wan",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            )
            self.sh(nat, "iptables", "-A", chain, "-i", "wan", "-j", "DROP")
        if nat == "natA":
            self._lan_client(nat, "carol", lan_net, 3)  # carol sits behind alice's NAT

    def _lan_client(self, nat: str, client: str, lan_net: str, host: int) -> None:
        port = f"l{client[:6]}"
        self._veth(nat, port, client, "eth0")
        self.sh(nat, "ip", "link", "set", port, "master", "lan")
        self.sh(nat, "ip", "link", "set", port, "up")
        self.sh(client, "ip", "addr", "add", f"{lan_net}.{host}/24", "dev", "eth0")
        self.sh(client, "ip", "link", "set", "eth0", "up")
        self.sh(client, "ip", "route", "add", "default", "via", f"{lan_net}.1")

    def dropped(self, nat: str) -> int:
        """Packets the NAT's filter dropped on its WAN side (unsolicited inbound)."""
        out = self.sh(nat, "iptables", "-L", "-v", "-n", "-x").stdout
        total = 0
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[2] == "DROP" and parts[5] == "wan":
                total += int(parts[0])
        return total

    def destroy(self) -> None:
        for directory in self.etc:
            shutil.rmtree(directory, ignore_errors=True)
        self.etc.clear()
        for name in reversed(self.created):
            pids = run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                run("kill", "-9", pid, check=False)
            run("ip", "netns", "del", name, check=False)
        self.created.clear()
