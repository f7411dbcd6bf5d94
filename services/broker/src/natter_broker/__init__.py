"""natter's rendezvous broker."""

from .registry import MemoryRegistry, Registry
from .server import Broker

__all__ = ["Broker", "MemoryRegistry", "Registry"]
