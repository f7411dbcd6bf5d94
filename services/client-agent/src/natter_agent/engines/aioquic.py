"""aioquic behind natter's engine interface, with flow control that follows the reader.

aioquic doubles its receive windows as data arrives, whether or not the application has
consumed it, so a slow TCP reader would never slow the remote sender and memory would grow
without bound. ``FlowControlledConnection`` grants credit only for bytes that natter has
handed on (``consume``): the peer may have at most one window in flight per stream and
one connection window in all.
"""

from __future__ import annotations

import ssl
from typing import Any

from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    CONNECTION_LIMIT_FRAME_CAPACITY,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
)
from aioquic.quic.packet import QuicFrameType, QuicPacketType, pull_quic_header
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.stream import QuicStream

from natter_proto.tunnelctl import moved_limit

from ..tls import raw_public_key
from .base import (
    ALPN,
    MAX_DATAGRAM_FRAME,
    MAX_PENDING_DATAGRAMS,
    CidIssued,
    CidRetired,
    DatagramReceived,
    EngineSettings,
    PeerAuthenticated,
    PingAcked,
    StopSending,
    StreamData,
    StreamReset,
    Terminated,
    TunnelEvent,
    datagram_room,
)


class FlowControlledConnection(QuicConnection):
    stream_window: int = 1 << 20
    connection_window: int = 8 << 20

    def __init__(self, *args: Any, max_streams: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # aioquic's 128 has no setting; it grows by one as each of the peer's streams ends
        self._local_max_streams_bidi.value = self._local_max_streams_bidi.sent = max_streams
        self._consumed: dict[int, int] = {}
        self._total_consumed = 0
        self._released = 0  # credit returned by streams that ended unread
        # streams owed a MAX_STREAM_DATA: aioquic asks every stream on every packet, so only
        # these get past the first line of _write_stream_limits (cheap with many streams)
        self._credit_due: set[int] = set()

    # -- natter's additions -----------------------------------------------------
    def send_buffer_size(self, stream_id: int) -> int:
        """Bytes queued on a stream and not yet acknowledged by the peer."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def unsent(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return stream.sender._buffer_stop - stream.sender.highest_offset

    def send_credit(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        if stream is None or stream.is_blocked:
            return 0
        stream_left = stream.max_stream_data_remote - stream.sender._buffer_stop
        return max(0, min(stream_left, self._remote_max_data - self._remote_max_data_used))

    def consume(self, stream_id: int, size: int) -> None:
        consumed = self._consumed.get(stream_id, 0) + size
        self._consumed[stream_id] = consumed
        self._total_consumed += size
        stream = self._streams.get(stream_id)
        granted = stream.max_stream_data_local if stream is not None else 0
        if granted and moved_limit(consumed, self.stream_window, granted) is not None:
            self._credit_due.add(stream_id)

    def release_stream(self, stream_id: int) -> None:
        """A stream is done: return connection credit for what arrived but was never read."""
        self._credit_due.discard(stream_id)
        consumed = self._consumed.pop(stream_id, 0)
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._released += max(0, stream.receiver.highest_offset - consumed)

    def smoothed_rtt(self) -> float:
        return float(self._loss._rtt_smoothed)

    def peer_public_key(self) -> bytes | None:
        """The key the peer proved in the handshake (TLS CertificateVerify), if any."""
        return raw_public_key(self.tls._peer_certificate)

    def handshake_confirmed(self) -> bool:
        return bool(self._handshake_confirmed)

    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        for data in datagrams:
            self.receive_datagram(data, addr, now)

    def stream_slots(self) -> int:
        return max(0, self._remote_max_streams_bidi - self._local_next_stream_id_bidi // 4)

    def new_stream_id(self) -> int:
        stream_id = self.get_next_available_stream_id()
        self._get_or_create_stream_for_send(stream_id)
        return stream_id

    def datagram_room(self) -> int:
        return datagram_room(self._remote_max_datagram_frame_size, self._max_datagram_size)

    def send_datagram(self, data: bytes) -> bool:
        if len(data) > self.datagram_room() or len(self._datagrams_pending) >= MAX_PENDING_DATAGRAMS:
            return False
        self.send_datagram_frame(data)
        return True

    def accept_peer(self) -> None:
        """Nothing to send: TLS already carried both keys, and HANDSHAKE_DONE the acceptance."""

    def poll_event(self) -> TunnelEvent | None:
        while (event := self.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                return StreamData(event.stream_id, event.data, event.end_stream)
            if isinstance(event, events.StreamReset):
                return StreamReset(event.stream_id)
            if isinstance(event, events.StopSendingReceived):
                return StopSending(event.stream_id)
            if isinstance(event, events.HandshakeCompleted):
                return PeerAuthenticated()
            if isinstance(event, events.PingAcknowledged):
                return PingAcked(event.uid)
            if isinstance(event, events.ConnectionIdIssued):
                return CidIssued(event.connection_id)
            if isinstance(event, events.ConnectionIdRetired):
                return CidRetired(event.connection_id)
            if isinstance(event, events.DatagramFrameReceived):
                return DatagramReceived(event.data)
            if isinstance(event, events.ConnectionTerminated):
                return Terminated(event.error_code, event.reason_phrase)
        return None

    def host_connection_id(self) -> bytes:
        return bytes(self.host_cid)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            # aioquic has no public switch for this: ask the client for its certificate, so
            # that both sides prove their natter key (checked at HandshakeCompleted)
            self.tls._request_client_certificate = True

    # -- credit that follows consumption, not arrival -----------------------------
    def _write_connection_limits(self, builder: QuicPacketBuilder, space: Any) -> None:
        limit = self._local_max_data
        moved = moved_limit(self._total_consumed + self._released, self.connection_window, limit.value)
        if moved is not None:
            limit.value = moved
        saved_used, limit.used = limit.used, 0  # keeps aioquic from doubling the window
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = saved_used

    def _on_max_stream_data_delivery(self, delivery: QuicDeliveryState, stream: QuicStream) -> None:
        super()._on_max_stream_data_delivery(delivery, stream)
        if delivery != QuicDeliveryState.ACKED and stream.stream_id is not None:
            self._credit_due.add(stream.stream_id)  # lost: send it again

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: Any, stream: QuicStream) -> None:
        if stream.stream_id not in self._credit_due:
            return
        if not stream.max_stream_data_local or stream.receiver.is_finished:
            self._credit_due.discard(stream.stream_id)  # FIN received: no more credit needed
            return
        consumed = self._consumed.get(stream.stream_id, 0)
        moved = moved_limit(consumed, self.stream_window, stream.max_stream_data_local)
        if moved is not None:
            stream.max_stream_data_local = moved
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            self._credit_due.discard(stream.stream_id)
            return
        buf = builder.start_frame(
            QuicFrameType.MAX_STREAM_DATA,
            capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
            handler=self._on_max_stream_data_delivery,
            handler_args=(stream,),
        )
        buf.push_uint_var(stream.stream_id)
        buf.push_uint_var(stream.max_stream_data_local)
        stream.max_stream_data_local_sent = stream.max_stream_data_local
        self._credit_due.discard(stream.stream_id)


assert CONNECTION_LIMIT_FRAME_CAPACITY > 0  # imported to pin the aioquic internals we rely on


class AioquicEngine(EngineSettings):
    name = "aioquic"

    def _configuration(self, is_client: bool) -> QuicConfiguration:
        cfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=self.idle_timeout,
            max_datagram_size=self.max_datagram_size,
            max_data=self.connection_window,
            max_stream_data=self.stream_window,
            max_datagram_frame_size=MAX_DATAGRAM_FRAME,
            verify_mode=ssl.CERT_NONE,
        )
        cfg.certificate = self.credentials.certificate
        cfg.private_key = self.credentials.private_key
        return cfg

    def _new(self, **kwargs: Any) -> FlowControlledConnection:
        conn = FlowControlledConnection(max_streams=self.max_streams, **kwargs)
        conn.stream_window = self.stream_window
        conn.connection_window = self.connection_window
        return conn

    def client_connection(self) -> FlowControlledConnection:
        return self._new(configuration=self._configuration(True))

    def server_connection(self, initial: bytes) -> FlowControlledConnection | None:
        cfg = self._configuration(False)
        if len(initial) < 1200:
            return None
        try:
            header = pull_quic_header(Buffer(data=initial), host_cid_length=cfg.connection_id_length)
        except ValueError:
            return None
        if header.packet_type != QuicPacketType.INITIAL:
            return None
        return self._new(configuration=cfg, original_destination_connection_id=header.destination_cid)
