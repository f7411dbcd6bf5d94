"""The QUIC engine interface: what natter needs from a sans-IO QUIC implementation.

Two engines implement it: aioquic (natter's keys in mutual TLS, credit in QUIC's own
flow control) and qh3 (the client's key proof and the credit on a control stream, see
``natter_proto.tunnelctl``). The link sees only the events below, whatever the engine.
The engines speak different ALPNs, so two agents with different engines fail the
handshake with a clear reason instead of misreading each other.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, Protocol

from natter_proto.config import QUIC_ENGINES, Config
from natter_proto.tunnelevents import CidIssued as CidIssued
from natter_proto.tunnelevents import CidRetired as CidRetired
from natter_proto.tunnelevents import DatagramReceived as DatagramReceived
from natter_proto.tunnelevents import (  # the engines' vocabulary, re-exported for the shell
    PeerAuthenticated as PeerAuthenticated,
)
from natter_proto.tunnelevents import PingAcked as PingAcked
from natter_proto.tunnelevents import StopSending as StopSending
from natter_proto.tunnelevents import StreamData as StreamData
from natter_proto.tunnelevents import StreamReset as StreamReset
from natter_proto.tunnelevents import Terminated as Terminated
from natter_proto.tunnelevents import TunnelEvent as TunnelEvent

from ..tls import Credentials

ALPN = "natter/1"  # aioquic: mutual TLS
ENGINES = QUIC_ENGINES
MAX_DATAGRAM_FRAME = 65536  # what each side offers to receive in DATAGRAM frames (RFC 9221)
# a short header with 8-byte connection IDs, a 4-byte packet number, the AEAD tag and the
# frame's type and length, with room to spare: a DATAGRAM payload fits a packet under it
DATAGRAM_OVERHEAD = 48
# DATAGRAM frames an engine holds while congestion control keeps them from leaving: more
# are refused (the UDP forward drops and counts them) instead of queueing without bound
MAX_PENDING_DATAGRAMS = 256
# how the engines word TLS alert 120 (no_application_protocol): aioquic and qh3, rustls
ALPN_REFUSALS = ("alpn", "no application protocol", "known protocol", "error 120")


def datagram_room(peer_max_frame: int | None, max_datagram_size: int) -> int:
    """A DATAGRAM payload that fits one packet and the peer's limit (0: it takes none)."""
    if not peer_max_frame:
        return 0
    return max(0, min(peer_max_frame - 4, max_datagram_size - DATAGRAM_OVERHEAD))


def explain_engine_mismatch(peer: str, reason: str) -> str:
    """A handshake refused for its ALPN means the peer runs an engine this one cannot talk
    to: say which pairings work, so that the user knows what to change."""
    if not any(word in reason.lower() for word in ALPN_REFUSALS):
        return reason
    return (
        f"{reason} ({peer} runs another QUIC engine: native and aioquic agents talk to each"
        " other, qh3 agents only to qh3: both sides need a matching --quic-engine)"
    )


class TunnelConnection(Protocol):
    """A sans-IO QUIC connection with receive-side credit under natter's control."""

    def connect(self, addr: Any, now: float) -> None: ...
    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...
    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        """Several datagrams from one address, read in one batch."""
        ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def poll_event(self) -> TunnelEvent | None: ...
    def new_stream_id(self) -> int:
        """Open a bidirectional stream of ours and return its ID."""
        ...

    def stream_slots(self) -> int:
        """How many more streams of ours the peer allows now (QUIC's MAX_STREAMS)."""
        ...

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int) -> None: ...
    def stop_stream(self, stream_id: int, error_code: int) -> None: ...
    def send_ping(self, uid: int) -> None: ...

    def datagram_room(self) -> int:
        """The largest DATAGRAM payload this tunnel carries (0: the peer takes none)."""
        ...

    def send_datagram(self, data: bytes) -> bool:
        """Queue a DATAGRAM frame; False if it is too large, or congestion control holds
        ``MAX_PENDING_DATAGRAMS`` already (dropped: UDP is not retransmitted either)."""
        ...

    def close(self, error_code: int = 0, frame_type: int | None = None, reason_phrase: str = "") -> None: ...

    # natter's additions: bounded buffering in both directions
    def send_buffer_size(self, stream_id: int) -> int: ...
    def unsent(self, stream_id: int) -> int:
        """Bytes handed to the engine for this stream and not transmitted yet."""
        ...

    def send_credit(self, stream_id: int) -> int:
        """Bytes the peer lets this stream send beyond what the engine already holds."""
        ...

    def consume(self, stream_id: int, size: int) -> None: ...
    def release_stream(self, stream_id: int) -> None: ...
    def smoothed_rtt(self) -> float: ...
    def peer_public_key(self) -> bytes | None: ...
    def handshake_confirmed(self) -> bool:
        """As the client: the server accepted us (a refusing server closes instead)."""
        ...

    def accept_peer(self) -> None:
        """The link checked the peer's key and ACLs: tell the peer it may go ahead."""
        ...

    def host_connection_id(self) -> bytes:
        """Our first connection ID (those issued later come as ``CidIssued`` events)."""
        ...


@dataclass
class EngineSettings:
    """What every engine is built from: the agent's key and the tunnel's limits."""

    credentials: Credentials
    _: KW_ONLY
    max_datagram_size: int = Config.max_datagram_size  # every default is Config's
    idle_timeout: float = Config.idle_timeout
    stream_window: int = Config.stream_window
    connection_window: int = Config.connection_window
    max_streams: int = Config.max_streams


class QuicEngine(Protocol):
    name: str

    def client_connection(self) -> TunnelConnection: ...

    def server_connection(self, initial: bytes) -> TunnelConnection | None:
        """Accept a client's first datagram, or return None if it is not a valid Initial."""
        ...
