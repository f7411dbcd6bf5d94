"""The agent's errors: each is one clear line for the user."""

from __future__ import annotations


class NatterError(Exception):
    """A failure worth one clear line to the user."""


class PeerUnavailable(NatterError):
    """The broker could not introduce us to the peer (unknown, offline, not listening...)."""

    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(message)
        self.peer = peer
        self.code = code
