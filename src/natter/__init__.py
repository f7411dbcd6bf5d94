"""natter: peer-to-peer TCP port forwarding through NATs.

``from natter import Broker, Client, Config`` mirrors the original Go API.
"""

from natter_agent import Client, Forward, NatterError, PeerUnavailable
from natter_broker import Broker
from natter_proto import AddressError, Config

__version__ = "0.1.0"

__all__ = [
    "AddressError",
    "Broker",
    "Client",
    "Config",
    "Forward",
    "NatterError",
    "PeerUnavailable",
    "__version__",
]
