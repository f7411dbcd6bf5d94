"""The agent's vocabulary: roles, path kinds, NAT kinds, transports and paths.

A path is a transport and an address. Policy code (``paths``, ``machine``) asks a path
only what its transport's properties are, so a new transport (TCP relay, IPv6) is a new
``Transport`` member with its properties, not a new branch in the policy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..endpoints import Endpoint


class Role(enum.StrEnum):
    """Which end of the QUIC connection we are: the forwarder is the client."""

    CLIENT = "client"
    SERVER = "server"


class NatKind(enum.StrEnum):
    EASY = "easy"  # maps endpoint-independently
    HARD = "hard"  # maps per destination (symmetric)
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str | None) -> NatKind:
        try:
            return cls(value or "unknown")
        except ValueError:
            return cls.UNKNOWN


class PathKind(enum.StrEnum):
    """What `natter status` and the logs call a path."""

    DIRECT = "direct"
    LAN = "lan"  # a peer's local address: both behind one NAT
    PREDICTED = "predicted"  # found by the birthday method against a symmetric NAT
    RELAYED = "relayed"


class Transport(enum.StrEnum):
    """How a path's datagrams travel. Each transport says what policy needs to know."""

    UDP_DIRECT = "udp"
    UDP_RELAY = "udp-relay"
    TCP_RELAY = "tcp-relay"  # through the broker over the agent's TCP stream (UDP blocked)

    @property
    def relayed(self) -> bool:
        """Through the broker: budget-limited, a fallback that an upgrade should replace."""
        return self in (Transport.UDP_RELAY, Transport.TCP_RELAY)

    @property
    def carrier(self) -> str:
        """What carries the datagrams out of this host: udp or tcp (status, logs)."""
        return "tcp" if self is Transport.TCP_RELAY else "udp"


MAIN_SOCKET = 0  # the agent's one socket; birthday sockets get higher numbers
# the agent's TCP stream to its broker (TLS, WebSocket: one message per datagram), opened
# when UDP gets no answer; the machine treats it as one more socket
BROKER_STREAM = -1


@dataclass(frozen=True)
class Path:
    """Where one tunnel's datagrams go: a transport, the local socket and the remote address
    (for a relayed path: the broker, and the relay session's key)."""

    transport: Transport
    addr: Endpoint
    socket: int = MAIN_SOCKET
    relay_key: bytes = b""

    @property
    def relayed(self) -> bool:
        return self.transport.relayed

    def __str__(self) -> str:
        if self.relayed:
            return f"relay {self.addr}" + (" (tcp)" if self.transport is Transport.TCP_RELAY else "")
        return str(self.addr)


def direct_path(addr: Endpoint, socket: int = MAIN_SOCKET) -> Path:
    return Path(Transport.UDP_DIRECT, addr, socket)


def relay_path(broker: Endpoint, key: bytes, socket: int = MAIN_SOCKET) -> Path:
    """The broker's relay, reached on ``socket`` (the UDP socket, or the broker stream)."""
    transport = Transport.TCP_RELAY if socket == BROKER_STREAM else Transport.UDP_RELAY
    return Path(transport, broker, socket, key)


def path_label(path: Path, kind: PathKind) -> str:
    """What status and logs call a tunnel's path: direct, lan, predicted, relayed (udp|tcp)."""
    if path.relayed:
        return f"{kind.value} ({path.transport.carrier})"
    return kind.value


# The address every tunnel's QUIC connection believes its peer has. natter routes each
# datagram to the tunnel's current path, so QUIC never sees a path change (aioquic would
# throttle an unvalidated one) and one connection survives any number of moves. It is
# never sent to (0.0.0.0/8 is "this network", not a destination).
QUIC_PEER = Endpoint("0.0.0.0", 9)
