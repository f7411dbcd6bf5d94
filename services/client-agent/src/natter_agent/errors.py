"""The agent's errors: each is one clear line for the user."""

from __future__ import annotations

from natter_proto.streamhdr import Refusal


class NatterError(Exception):
    """A failure worth one clear line to the user."""


class PeerUnavailable(NatterError):
    """The broker could not introduce us to the peer (unknown, offline, not listening...)."""

    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(message)
        self.peer = peer
        self.code = code


class StreamRefused(NatterError):
    """The peer did not connect a stream to its target, and why (a SOCKS reply code)."""

    def __init__(self, message: str, refusal: Refusal) -> None:
        super().__init__(message)
        self.refusal = refusal
