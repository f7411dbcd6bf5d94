"""natter's client agent: one UDP socket, hole punching, QUIC tunnels to peers."""

from .agent import Agent, NatterError, PeerUnavailable
from .client import Client
from .forward import Forward

__all__ = ["Agent", "Client", "Forward", "NatterError", "PeerUnavailable"]
