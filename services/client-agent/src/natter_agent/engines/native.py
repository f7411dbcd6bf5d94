"""The native engine (``libs/natter-quic``: quinn and rustls on tokio) behind natter's
engine settings. Unlike the sans-IO engines it owns the agent's UDP socket and carries
forwarded bytes itself; the agent drives it through ``natter_agent.nativeplane``.

It speaks ``natter/1`` as the aioquic engine does (both natter keys in mutual TLS, credit
in QUIC's own flow control, natter_proto's stream headers), so native and aioquic agents
build tunnels with each other. qh3 agents speak ``natter/1-ctl``: that pairing is refused
in the handshake, and the agent says why.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization

from .base import EngineSettings

CONGESTION = ("cubic", "newreno", "bbr")
DEFAULT_CONGESTION = "cubic"  # beat bbr on loopback and in the loss lab (bench/README.md)
ACK_EVERY = 10  # ask the peer to acknowledge every 10th packet (ACK frequency extension)
# DPLPMTUD climbs from 1200 bytes to this on every path (relayed ones too, whose frames
# hold 1500): max_datagram_size is the sans-IO engines' one fixed size
MTU_CEILING = 1452


def available() -> bool:
    """Whether the native module is built and installed (``./scripts/setup.sh`` with cargo)."""
    return importlib.util.find_spec("natter_quic") is not None


@dataclass
class NativeEngine(EngineSettings):
    name = "native"
    congestion: str = DEFAULT_CONGESTION
    threads: int = 1  # tokio workers: 1 beat 2 on 2 cores (bench/native_bench.py, bench/README.md)
    ack_every: int = ACK_EVERY
    mtu_ceiling: int = MTU_CEILING

    def open(self, fd: int, *, header_timeout: float, max_pending_streams: int) -> Any:
        """The native plane on a socket descriptor it takes over (the caller passes a dup)."""
        import natter_quic

        certificate = self.credentials.certificate.public_bytes(serialization.Encoding.DER)
        key = self.credentials.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return natter_quic.Engine(
            fd,
            certificate,
            key,
            idle_timeout=self.idle_timeout,
            stream_window=self.stream_window,
            connection_window=self.connection_window,
            max_streams=self.max_streams,
            max_datagram_size=max(self.max_datagram_size, self.mtu_ceiling),
            header_timeout=header_timeout,
            max_pending_streams=max_pending_streams,
            congestion=self.congestion,
            threads=self.threads,
            ack_every=self.ack_every,
        )
