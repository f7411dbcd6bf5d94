"""natter's client agent: one UDP socket, hole punching, QUIC tunnels to peers."""

from .agent import Agent
from .client import Client
from .errors import NatterError, PeerUnavailable
from .forward import Forward

__all__ = ["Agent", "Client", "Forward", "NatterError", "PeerUnavailable"]
