"""Forward specs: ``[LOCALHOST:]LOCALPORT:PEER:[REMOTEHOST:]REMOTEPORT[/udp]``, and the
SOCKS form ``[LOCALHOST:]PORT:PEER`` (``-D``).

An empty LOCALPORT (``:bob:22``) means stdin/stdout. IPv6 hosts go in brackets. A
``/udp`` suffix forwards UDP datagrams instead of TCP connections (``/tcp`` is the default).
"""

from __future__ import annotations

from dataclasses import dataclass

from natter_agent.forwards import ForwardKind, ForwardRequest
from natter_proto.endpoints import format_host_port, is_decimal
from natter_proto.frames import valid_name


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class ForwardSpec:
    local: str  # "" for stdio, else HOST:PORT (HOST may be empty: all loopback default)
    peer: str
    remote: str  # HOST:PORT, HOST may be empty (the peer's localhost); "" for SOCKS
    kind: ForwardKind = ForwardKind.TCP

    @property
    def is_stdio(self) -> bool:
        return self.local == ""

    @property
    def request(self) -> ForwardRequest:
        return ForwardRequest(self.local, self.peer, self.remote, self.kind)


def _split(text: str) -> list[str]:
    parts: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _port(text: str, what: str, spec: str) -> int:
    if not is_decimal(text) or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise SpecError(f"bad forward spec {spec!r}: {what} {text!r} is not a port (1-65535)")
    return int(text)


def _host(text: str) -> str:
    return text[1:-1] if text.startswith("[") and text.endswith("]") else text


def parse_spec(spec: str) -> ForwardSpec:
    body, kind = _protocol(spec)
    parts = _split(body)
    if len(parts) == 3:
        lhost, lport, peer, rhost, rport = "", parts[0], parts[1], "", parts[2]
    elif len(parts) == 4:
        if is_decimal(parts[1]) and not is_decimal(parts[0]):
            lhost, lport, peer, rhost, rport = parts[0], parts[1], parts[2], "", parts[3]
        else:
            lhost, lport, peer, rhost, rport = "", parts[0], parts[1], parts[2], parts[3]
    elif len(parts) == 5:
        lhost, lport, peer, rhost, rport = parts
    else:
        raise SpecError(
            f"bad forward spec {spec!r}: expected [LOCALHOST:]LOCALPORT:PEER:[REMOTEHOST:]REMOTEPORT"
        )
    if not valid_name(peer):
        raise SpecError(f"bad forward spec {spec!r}: {peer!r} is not a valid peer name")
    remote = format_host_port(_host(rhost), _port(rport, "remote port", spec))
    if lport == "":
        if lhost:
            raise SpecError(f"bad forward spec {spec!r}: stdio mode takes no local host")
        if kind is ForwardKind.UDP:
            raise SpecError(f"bad forward spec {spec!r}: stdio mode carries a TCP stream, not UDP")
        return ForwardSpec("", peer, remote)
    local = format_host_port(_host(lhost), _port(lport, "local port", spec))
    return ForwardSpec(local, peer, remote, kind)


def _protocol(spec: str) -> tuple[str, ForwardKind]:
    """The spec without its ``/udp`` or ``/tcp`` suffix, and which it was."""
    body, slash, proto = spec.rpartition("/")
    if not slash:
        return spec, ForwardKind.TCP
    if proto not in ("tcp", "udp"):
        raise SpecError(f"bad forward spec {spec!r}: {proto!r} is not /tcp or /udp")
    return body, ForwardKind(proto)


def parse_dynamic(spec: str) -> ForwardSpec:
    """``-D [LOCALHOST:]PORT:PEER``: a SOCKS5 server on the local port (loopback unless
    a host is given) whose connections go wherever each asks, from the peer's side."""
    parts = _split(spec)
    if len(parts) == 2:
        lhost, lport, peer = "", parts[0], parts[1]
    elif len(parts) == 3:
        lhost, lport, peer = parts
    else:
        raise SpecError(f"bad SOCKS forward {spec!r}: expected [LOCALHOST:]PORT:PEER, e.g. 1080:bob")
    if not valid_name(peer):
        raise SpecError(f"bad SOCKS forward {spec!r}: {peer!r} is not a valid peer name")
    local = format_host_port(_host(lhost), _port(lport, "local port", spec))
    return ForwardSpec(local, peer, "", ForwardKind.SOCKS)
