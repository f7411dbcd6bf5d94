"""natter's client agent: one UDP socket, hole punching, QUIC tunnels to peers."""

from .agent import Agent
from .client import Client
from .errors import NatterError, PeerUnavailable
from .forward import Forward
from .forwards import ForwardKind, ForwardRequest
from .socksforward import SocksForward
from .udpforward import UdpForward

__all__ = [
    "Agent",
    "Client",
    "Forward",
    "ForwardKind",
    "ForwardRequest",
    "NatterError",
    "PeerUnavailable",
    "SocksForward",
    "UdpForward",
]
