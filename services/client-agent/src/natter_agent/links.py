"""A tunnel as the agent, the forwards and status see it, whichever engine carries it."""

from __future__ import annotations

from .link import PeerLink
from .nativelink import NativeLink

AnyLink = PeerLink | NativeLink
