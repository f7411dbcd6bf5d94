"""natter's QUIC engines behind one interface (``base``), and the factory that picks one.

The adapters import the interface; only the factory imports the adapters, lazily, so the
two never import each other and an agent loads only the engine it runs.
"""

from __future__ import annotations

from typing import Any

from ..errors import NatterError
from . import native
from .base import ENGINES, PeerAuthenticated, QuicEngine, TunnelConnection
from .native import NativeEngine

__all__ = ["ENGINES", "AnyEngine", "QuicEngine", "TunnelConnection", "make_engine", "warm_up"]

AnyEngine = QuicEngine | NativeEngine  # the sans-IO engines, and the native one


def make_engine(name: str, **settings: Any) -> AnyEngine:
    if name == "aioquic":
        from .aioquic import AioquicEngine

        return AioquicEngine(**settings)
    if name == "qh3":
        from .qh3 import Qh3Engine

        return Qh3Engine(**settings)
    if name == "native":
        if not native.available():
            raise NatterError(
                "the native QUIC engine is not built here (./scripts/setup.sh builds it where cargo"
                " is installed); --quic-engine qh3 runs without it"
            )
        return NativeEngine(**settings)
    raise ValueError(f"unknown QUIC engine {name!r} (available: {', '.join(ENGINES)})")


def warm_up(engine: QuicEngine, now: float = 0.0) -> None:
    """One handshake between two in-memory connections of this engine, at agent start: a
    QUIC library's first handshake in a process pays its one-time costs (measured: qh3 26
    ms, then 2 ms), which would otherwise land on the first tunnel. No socket is used."""
    client = engine.client_connection()
    client.connect(("127.0.0.1", 9), now)
    server: TunnelConnection | None = None
    for _ in range(10):
        for data, _addr in client.datagrams_to_send(now):
            server = server or engine.server_connection(data)
            if server is not None:
                server.receive_datagram(data, ("127.0.0.1", 10), now)
        for conn in (client, server):
            while conn is not None and (event := conn.poll_event()) is not None:
                if isinstance(event, PeerAuthenticated):
                    conn.accept_peer()
        if server is not None:
            for data, _addr in server.datagrams_to_send(now):
                client.receive_datagram(data, ("127.0.0.1", 9), now)
        if client.handshake_confirmed():
            break
        now += 0.01  # a pacer with a frozen clock would hold the last flight back
