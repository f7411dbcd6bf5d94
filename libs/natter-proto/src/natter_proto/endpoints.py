"""Endpoints: validated (ip, port) pairs, and parsing of the user's HOST:PORT strings.

Endpoints that arrive from the network must be IP literals (never names to resolve), so
that a peer cannot make an agent look anything up or send to a hostname of its choosing.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple


class AddressError(ValueError):
    """A user-supplied or network-supplied address is not usable."""


class Endpoint(NamedTuple):
    """An IP literal and a UDP/TCP port, as the socket layer reports it."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback


def is_decimal(text: str) -> bool:
    """ASCII digits only (str.isdigit also accepts "²" and other digits int() refuses)."""
    return text.isascii() and text.isdigit()


def check_port(port: int, *, allow_zero: bool = False) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise AddressError(f"port must be a number, got {port!r}")
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise AddressError(f"port {port} is out of range {low}-65535")
    return port


def endpoint(host: str, port: int) -> Endpoint:
    """Build an Endpoint from an IP literal and port, normalising the IP's spelling."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"{host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return Endpoint(str(ip), check_port(port))


def split_host_port(text: str, *, default_host: str = "") -> tuple[str, int]:
    """Split ``HOST:PORT``, ``:PORT``, ``[V6]:PORT`` into host and port.

    An empty host becomes ``default_host``. The host may be a name; it is not resolved here.
    """
    if not isinstance(text, str) or not text:
        raise AddressError("address is empty")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise AddressError(f"{text!r} is not [IPV6]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise AddressError(f"{text!r} has no port (expected HOST:PORT or :PORT)")
        if ":" in host:
            raise AddressError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    if not is_decimal(port_text) or len(port_text) > 5:
        raise AddressError(f"{text!r} has no valid port")
    return host or default_host, check_port(int(port_text), allow_zero=True)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- one socket for both families ------------------------------------------------------
ANY_HOSTS = ("", "0.0.0.0", "::")  # "any address": a dual-stack socket where IPv6 works
V4_MAPPED = "::ffff:"


def dual_stack(host: str) -> bool:
    """Should a socket for ``host`` take both families (IPv6 with v4-mapped addresses)?"""
    return host in ANY_HOSTS


def from_socket(host: str, port: int) -> Endpoint:
    """What a socket reports, as an Endpoint: v4-mapped addresses become IPv4 (a dual-stack
    socket reports every IPv4 peer so), so one peer has one spelling."""
    if host.startswith(V4_MAPPED) and "." in host:
        host = host[len(V4_MAPPED) :]
    return Endpoint(host, port)


def to_socket(addr: Endpoint | tuple[str, int], v6_socket: bool) -> tuple[str, int]:
    """Where a socket sends ``addr``: an IPv4 address from a dual-stack socket is v4-mapped."""
    host, port = addr[0], addr[1]
    if v6_socket and ":" not in host:
        return V4_MAPPED + host, port
    return host, port
