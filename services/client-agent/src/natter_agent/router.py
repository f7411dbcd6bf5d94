"""Which tunnel a datagram belongs to: by (socket, address), by relay key, or by the
destination connection ID of a short-header QUIC packet.

The machine decides where tunnels are (``RouteTunnel``); the router only remembers it, so
that the steady stream of a tunnel's datagrams never enters the machine. Connection IDs
come from the engines' issued and retired events, as aioquic's own server routes them. A path a tunnel
left still delivers to it (stragglers of a move) until another tunnel takes the path.
Handshake (long-header) packets go by connection ID only: a peer that rebuilds its tunnel
from the same address must reach the new connection, not the old one.
"""

from __future__ import annotations

from typing import Protocol

from natter_proto.agent.kinds import Path
from natter_proto.endpoints import Endpoint
from natter_proto.relay import RELAY_PREFIX, RelayFrameError, decode_relay

CID_LENGTH = 8  # the host connection ID length both engines use


class HasConnectionId(Protocol):
    def host_connection_id(self) -> bytes: ...


class Router:
    def __init__(self) -> None:
        self._by_addr: dict[tuple[int, Endpoint], tuple[int, Path]] = {}
        self._by_key: dict[bytes, tuple[int, Path]] = {}
        self._paths: dict[int, set[Path]] = {}
        self._cids: dict[bytes, int] = {}

    def add(self, tunnel: int, conn: HasConnectionId, initial: bytes = b"") -> None:
        """A new tunnel; a server's also gets the client's Initials by their connection ID."""
        self._cids[conn.host_connection_id()] = tunnel
        self.add_initial(tunnel, initial)

    def add_initial(self, tunnel: int, initial: bytes) -> None:
        """A server tunnel takes the client's later Initials too (a post-quantum ClientHello
        spans two), by the connection ID its first one chose."""
        self._paths.setdefault(tunnel, set())
        if initial and (dcid := long_header_dcid(initial)) is not None:
            self._cids[dcid] = tunnel

    def sent(self, tunnel: int, packets: list[bytes]) -> None:
        """The native engine's connection IDs stay in native code: those its long headers
        name as their source, as Python sends them on another socket or the relay, are how
        the peer's handshake packets find the tunnel again."""
        for packet in packets:
            if packet and packet[0] & 0x80 and (scid := long_header_scid(packet)) is not None:
                self._cids[scid] = tunnel

    def connection_id(self, tunnel: int, cid: bytes, *, issued: bool) -> None:
        """The engine issued (or retired) a connection ID of this tunnel."""
        if issued:
            self._cids[cid] = tunnel
        elif self._cids.get(cid) == tunnel:
            del self._cids[cid]

    def route(self, tunnel: int, path: Path) -> None:
        """Datagrams arriving on path are the tunnel's."""
        entry = (tunnel, path)
        if path.relayed:
            self._by_key[path.relay_key] = entry
        else:
            self._by_addr[(path.socket, path.addr)] = entry
        self._paths.setdefault(tunnel, set()).add(path)

    def forget(self, tunnel: int) -> None:
        for path in self._paths.pop(tunnel, set()):
            if path.relayed:
                if self._by_key.get(path.relay_key, (0,))[0] == tunnel:
                    del self._by_key[path.relay_key]
            elif self._by_addr.get((path.socket, path.addr), (0,))[0] == tunnel:
                del self._by_addr[(path.socket, path.addr)]
        for cid in [cid for cid, owner in self._cids.items() if owner == tunnel]:
            del self._cids[cid]

    def place(self, socket: int, addr: Endpoint, data: bytes) -> tuple[int, Path, bytes] | None:
        """(tunnel, the path it came on, the QUIC packet), or None: the machine decides."""
        if data[0] == RELAY_PREFIX:
            try:
                key, packet = decode_relay(data)
            except RelayFrameError:
                return None
            found = self._by_key.get(key)
            if found is None or found[1].addr != addr or socket != found[1].socket:
                return None
            return found[0], found[1], packet
        if data[0] < 0x40:
            return None
        hit = self._by_addr.get((socket, addr))
        if hit is None or (data[0] & 0x80 and self.owner(data) != hit[0]):
            return None
        return hit[0], hit[1], data

    def owner_of(self, data: bytes) -> int | None:
        """The tunnel a datagram ``place`` could not place is addressed to (for a relay
        frame, its QUIC packet's), or None."""
        if data[0] == RELAY_PREFIX:
            try:
                _, data = decode_relay(data)
            except RelayFrameError:
                return None
        return self.owner(data)

    def owner(self, packet: bytes) -> int | None:
        """The tunnel a QUIC packet is addressed to, by its destination connection ID."""
        if len(packet) < 1 + CID_LENGTH or packet[0] < 0x40:
            return None
        cid = long_header_dcid(packet) if packet[0] & 0x80 else packet[1 : 1 + CID_LENGTH]
        if cid is None:
            return None
        return self._cids.get(cid)


def long_header_dcid(packet: bytes) -> bytes | None:
    """The destination connection ID of a long-header packet (RFC 9000 17.2)."""
    if len(packet) < 6 or not packet[0] & 0x80:
        return None
    length = packet[5]
    if length > 20 or len(packet) < 6 + length:
        return None
    return packet[6 : 6 + length]


def long_header_scid(packet: bytes) -> bytes | None:
    """The source connection ID of a long-header packet (RFC 9000 17.2)."""
    if long_header_dcid(packet) is None:
        return None
    at = 6 + packet[5]
    if len(packet) <= at or packet[at] > 20 or len(packet) < at + 1 + packet[at]:
        return None
    return packet[at + 1 : at + 1 + packet[at]] or None
