"""The kinds of forward a client runs, and one way to ask for any of them."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .agent import Agent
from .forward import Forward
from .socksforward import SocksForward
from .udpforward import UdpForward

AnyForward = Forward | UdpForward | SocksForward


class ForwardKind(enum.Enum):
    TCP = "tcp"  # LOCALPORT:PEER:REMOTEPORT, as ssh -L
    UDP = "udp"  # the same with /udp: datagrams in the tunnel's DATAGRAM frames
    SOCKS = "socks"  # -D PORT:PEER, as ssh -D: each CONNECT names its own target


@dataclass(frozen=True)
class ForwardRequest:
    local: str  # [HOST:]PORT to listen on
    peer: str
    remote: str = ""  # [HOST:]PORT on the peer's side; none for SOCKS
    kind: ForwardKind = ForwardKind.TCP


def new_forward(agent: Agent, request: ForwardRequest) -> AnyForward:
    if request.kind is ForwardKind.UDP:
        return UdpForward(agent, request.local, request.peer, request.remote)
    if request.kind is ForwardKind.SOCKS:
        return SocksForward(agent, request.local, request.peer)
    return Forward(agent, request.local, request.peer, request.remote)
