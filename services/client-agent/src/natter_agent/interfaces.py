"""This host's own addresses, offered to peers as host candidates: IPv4 (LAN), and global and
unique-local IPv6 (no NAT there: a stateful firewall lets a punch through)."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFADDR = 0x8915


def local_ipv4_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of every interface that has one (Linux)."""
    found: list[str] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:
                continue
            address = socket.inet_ntoa(reply[20:24])
            if not ipaddress.ip_address(address).is_loopback and address not in found:
                found.append(address)
    return found


IF_INET6 = "/proc/net/if_inet6"
SCOPE_GLOBAL = 0x00  # global unicast, and unique-local (fc00::/7) too
TENTATIVE_OR_DEPRECATED = 0x40 | 0x20  # IFA_F_TENTATIVE, IFA_F_DEPRECATED


def local_ipv6_addresses() -> list[str]:
    """Global and ULA IPv6 addresses of every interface (Linux; none elsewhere)."""
    found: list[str] = []
    try:
        with open(IF_INET6, encoding="ascii") as table:
            lines = table.read(1 << 16).splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or len(parts[0]) != 32:
            continue
        try:
            scope, flags = int(parts[3], 16), int(parts[4], 16)
            address = ipaddress.IPv6Address(bytes.fromhex(parts[0]))
        except ValueError:
            continue
        if scope != SCOPE_GLOBAL or flags & TENTATIVE_OR_DEPRECATED or address.is_loopback:
            continue
        if str(address) not in found:
            found.append(str(address))
    return found
