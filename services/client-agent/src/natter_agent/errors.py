"""The agent's errors: each is one clear line for the user."""

from __future__ import annotations

import os

from natter_proto.endpoints import format_host_port
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


def cannot_listen(host: str, port: int, exc: OSError, suffix: str = "") -> NatterError:
    """A forward's local port could not be bound: one line, as every kind of forward says it
    (``natter: cannot listen on 127.0.0.1:8022: address already in use``)."""
    why = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
    return NatterError(f"cannot listen on {format_host_port(host, port)}{suffix}: {why}")
