"""natter's sans-IO protocol core: frames and state machines, never a socket or a clock."""

from .config import Config
from .endpoints import AddressError, Endpoint
from .frames import FrameError

__all__ = ["AddressError", "Config", "Endpoint", "FrameError"]
