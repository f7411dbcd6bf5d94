"""qh3 behind natter's engine interface: the client's key proof and credit on a control stream.

qh3 checks the server's Ed25519 certificate in TLS like aioquic, but it cannot ask the
client for one, and it widens receive windows as data arrives. So each side opens one
unidirectional control stream (``natter_proto.tunnelctl``): the client proves its natter
key with a signature bound to this TLS session, the server answers ``accept`` once its
link checked that key, and both sides grant stream credit as the application consumes.
Until the proof arrives, the server holds back everything the client sent (bounded: the
client may not send more than one connection window before it is credited).
"""

from __future__ import annotations

import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from qh3 import tls as qtls
from qh3._hazmat import Buffer
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header
from qh3.quic.tls_bridge import QuicTlsBridge

from natter_proto import identity, tunnelctl
from natter_proto.tunnelctl import Accept, ControlError, Credit, Fin, Proof, ReceiveCredit, SendCredit

from .engine import (
    EngineSettings,
    PeerAuthenticated,
    PingAcked,
    StopSending,
    StreamData,
    StreamReset,
    Terminated,
    TunnelEvent,
)
from .tls import Credentials, raw_public_key

ALPN_CONTROL = "natter/1-ctl"  # qh3: key proof and credit on the control stream
SIGNATURE_ALGORITHMS = [qtls.SignatureAlgorithm.ED25519]  # the server's certificate is its natter key
CORE_WINDOW_FACTOR = 2  # qh3's own windows stay wider than natter's credit, so they never bind
MAX_OPEN_FINS = 1024  # final sizes announced for streams whose bytes are still arriving


class _Pending:
    """Bytes the peer has not credited yet, for one stream (plus a FIN behind them)."""

    __slots__ = ("chunks", "fin", "size")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.fin = False


class Qh3TunnelConnection(QuicConnection):
    def __init__(
        self, *, credentials: Credentials, stream_window: int, connection_window: int, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self._credentials = credentials
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._secrets: dict[qtls.Direction, bytes] = {}
        self._ready: deque[TunnelEvent] = deque()
        self._held: deque[TunnelEvent] = deque()  # server: until the client's proof checks out
        self._authenticated = False
        self._accepted = False  # client: the server said accept
        self._peer_key: bytes | None = None
        self._control_out: int | None = None
        self._control_in: int | None = None
        self._reader = tunnelctl.ControlReader()
        self._send_credit: SendCredit | None = None  # known once the peer told us its windows
        self._receive_credit = ReceiveCredit(stream_window, connection_window)
        self._pending: dict[int, _Pending] = {}
        self._forget_when_sent: set[int] = set()
        self._final_sizes: dict[int, int] = {}  # peer's announced ends not yet reached
        self._ended: set[int] = set()  # streams whose end we passed on (until released)
        self._opened: set[int] = set()  # our own streams, until released
        self._merging: dict[int, StreamData] = {}  # a stream's event still waiting in _ready
        self._parts: dict[int, list[bytes]] = {}  # ... and the data that joined it
        self._host_cids: set[bytes] = {self.host_cid}

    # -- TLS session binding --------------------------------------------------------
    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        bridge = super()._create_tls(remote_source_cid)
        install = bridge.tls.update_traffic_key_cb

        def capture(
            direction: qtls.Direction, epoch: qtls.Epoch, suite: qtls.CipherSuite, secret: bytes
        ) -> None:
            if epoch == qtls.Epoch.ONE_RTT:
                self._secrets.setdefault(direction, secret)  # the first: key updates follow
            install(direction, epoch, suite, secret)

        bridge.tls.update_traffic_key_cb = capture
        return bridge

    def _binding(self) -> bytes:
        if len(self._secrets) < 2:
            raise ControlError("key proof before the TLS handshake finished")
        mine, theirs = self._secrets[qtls.Direction.ENCRYPT], self._secrets[qtls.Direction.DECRYPT]
        return tunnelctl.session_binding(*((mine, theirs) if self._is_client else (theirs, mine)))

    # -- the engine interface ---------------------------------------------------------
    def peer_public_key(self) -> bytes | None:
        return self._peer_key

    def handshake_confirmed(self) -> bool:
        return self._handshake_confirmed and self._accepted

    def accept_peer(self) -> None:
        if self._is_client:
            proof = tunnelctl.proof_message(self._binding())
            key = raw_public_key(self._credentials.certificate)
            assert key is not None, "natter credentials always wrap an Ed25519 key (tls.credentials_for)"
            self._control(
                Proof(
                    key,
                    self._credentials.private_key.sign(proof),
                    self._stream_window,
                    self._connection_window,
                )
            )
        else:
            self._control(Accept(self._stream_window, self._connection_window))

    def smoothed_rtt(self) -> float:
        rtt = self._core.smoothed_rtt if self._core is not None else None
        return float(rtt) if rtt is not None else 0.0

    def owns_connection_id(self, cid: bytes) -> bool:
        return cid in self._host_cids

    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        self.receive_many_datagrams(datagrams, addr, now)

    def new_stream_id(self) -> int:
        try:
            stream_id = self._open_stream(False)
            self._opened.add(stream_id)
            return stream_id
        except QuicConnectionError as exc:
            raise ConnectionError(f"tunnel closed: {exc.reason_phrase}") from None

    def stream_slots(self) -> int:
        if self._core is None:
            return 0
        allowed, _uni, opened, _opened_uni = self._core.stream_limits  # both cumulative
        return max(0, allowed - opened)

    def send_buffer_size(self, stream_id: int) -> int:
        pending = self._pending.get(stream_id)
        return self.get_send_buffer_size(stream_id) + (pending.size if pending is not None else 0)

    def unsent(self, stream_id: int) -> int:
        return self.send_buffer_size(stream_id)  # qh3 counts bytes not yet transmitted

    def send_credit(self, stream_id: int) -> int:
        if self._send_credit is None or stream_id in self._pending:
            return 0
        return self._send_credit.available(stream_id)

    def send_stream_data(self, stream_id: int, data: Any, end_stream: bool = False) -> None:
        try:
            self._send_credited(stream_id, data, end_stream)
        except QuicConnectionError as exc:
            raise ConnectionError(f"tunnel closed: {exc.reason_phrase}") from None

    def _send_credited(self, stream_id: int, data: Any, end_stream: bool) -> None:
        pending = self._pending.get(stream_id)
        if pending is None and self._send_credit is not None:
            allowed = min(len(data), self._send_credit.available(stream_id))
            if allowed == len(data):
                self._send_credit.spend(stream_id, allowed)
                super().send_stream_data(stream_id, bytes(data), end_stream)
                if end_stream:
                    self._announce_fin(stream_id)
                return
            if allowed:
                self._send_credit.spend(stream_id, allowed)
                super().send_stream_data(stream_id, bytes(data[:allowed]), False)
            data = data[allowed:]
        if pending is None:
            pending = self._pending[stream_id] = _Pending()
        if len(data):
            pending.chunks.append(bytes(data))
            pending.size += len(data)
        pending.fin = pending.fin or end_stream

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self._pending.pop(stream_id, None)
        super().reset_stream(stream_id, error_code)

    def consume(self, stream_id: int, size: int) -> None:
        self._receive_credit.consumed(stream_id, size)

    def release_stream(self, stream_id: int) -> None:
        self._receive_credit.release(stream_id)
        self._ended.discard(stream_id)
        self._opened.discard(stream_id)
        self._final_sizes.pop(stream_id, None)
        if stream_id in self._pending:
            self._forget_when_sent.add(stream_id)  # still sending: keep listening for credit
        elif self._send_credit is not None:
            self._send_credit.forget(stream_id)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        if self._authenticated and (credit := self._receive_credit.pending()) is not None:
            self._control(credit)
        core = self._core
        if core is None or self._quic_logger is not None:
            return super().datagrams_to_send(now)
        # qh3's own loop parses every packet's header for a logger even when there is none
        # (measured: 7% of a bulk transfer's CPU); without a logger, poll the core directly
        datagrams: list[tuple[bytes, Any]] = []
        poll = core.poll_transmit
        try:
            while (transmit := poll(now)) is not None:
                datagrams.append((transmit[0], transmit[1]))
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        return datagrams

    def poll_event(self) -> TunnelEvent | None:
        if not self._ready:
            merging, waiting_parts, credit = self._merging, self._parts, self._receive_credit
            while (event := self.next_event()) is not None:  # the whole batch: see _emit
                sid = getattr(event, "stream_id", -1)
                if (
                    sid in merging
                    and type(event) is events.StreamDataReceived
                    and not event.end_stream
                    and not self._final_sizes
                ):
                    # more data for a stream whose event is waiting (per packet, with many
                    # busy streams): the short way through _translate, _deliver and _emit
                    try:
                        credit.received(sid, len(event.data))
                    except ControlError as exc:
                        self._protocol_error(str(exc))
                        continue
                    waiting_parts[sid].append(event.data)
                    continue
                self._translate(event)
            if not self._ready:
                return None
        ready = self._ready.popleft()
        if isinstance(ready, StreamData):
            if self._merging.get(ready.stream_id) is ready:
                del self._merging[ready.stream_id]
            parts = self._parts.pop(ready.stream_id, None)
            if parts is not None and len(parts) > 1:
                ready.data = b"".join(parts)
        return ready

    # -- events ---------------------------------------------------------------------
    def _translate(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if event.stream_id % 4 in (2, 3):  # unidirectional: only the peer's control stream
                self._control_received(event.stream_id, event.data)
                return
            try:
                self._receive_credit.received(event.stream_id, len(event.data))
                self._deliver(event.stream_id, event.data, event.end_stream)
            except ControlError as exc:
                self._protocol_error(str(exc))
        elif isinstance(event, events.StreamReset):
            self._emit(StreamReset(event.stream_id))
        elif isinstance(event, events.StopSendingReceived):
            self._pending.pop(event.stream_id, None)
            self._emit(StopSending(event.stream_id))
        elif isinstance(event, events.HandshakeCompleted) and self._is_client:
            certificate = self.get_peercert()
            if certificate is not None:
                self._peer_key = raw_public_key(x509.load_der_x509_certificate(certificate.public_bytes()))
            self._authenticated = True
            self._ready.append(PeerAuthenticated())
        elif isinstance(event, events.PingAcknowledged):
            self._ready.append(PingAcked(event.uid))
        elif isinstance(event, events.ConnectionIdIssued):
            self._host_cids.add(event.connection_id)
        elif isinstance(event, events.ConnectionIdRetired):
            self._host_cids.discard(event.connection_id)
        elif isinstance(event, events.ConnectionTerminated):
            self._held.clear()
            self._ready.append(Terminated(event.error_code, event.reason_phrase))

    def _emit(self, event: TunnelEvent) -> None:
        if not self._authenticated:
            self._held.append(event)
            return
        if isinstance(event, StreamData):
            # qh3 emits one event per packet; with many busy streams they interleave. Data
            # for a stream that already has an event waiting joins it: one event per stream
            # per batch (bounded by the stream's credit)
            waiting = self._merging.get(event.stream_id)
            if waiting is not None:
                self._parts[event.stream_id].append(event.data)
                waiting.end_stream = event.end_stream
                if event.end_stream:
                    del self._merging[event.stream_id]
                return
            if not event.end_stream:
                self._merging[event.stream_id] = event
                self._parts[event.stream_id] = [event.data]
        elif isinstance(event, StreamReset):
            self._merging.pop(event.stream_id, None)
        self._ready.append(event)

    def _control_received(self, stream_id: int, data: bytes) -> None:
        if self._is_local(stream_id) or self._control_in not in (None, stream_id):
            self._protocol_error("unexpected unidirectional stream")
            return
        self._control_in = stream_id
        try:
            for frame in self._reader.feed(data):
                self._on_control(frame)
        except ControlError as exc:
            self._protocol_error(str(exc))

    def _on_control(self, frame: tunnelctl.ControlFrame) -> None:
        if isinstance(frame, Credit):
            if self._send_credit is None:
                raise ControlError("credit before the windows were announced")
            self._send_credit.grant(frame)
            self._flush_pending()
        elif isinstance(frame, Fin):
            self._on_fin(frame)
        elif isinstance(frame, Proof) and not self._is_client and not self._authenticated:
            if not self._verifies(frame.key, frame.signature):
                raise ControlError("the client's key proof does not verify")
            self._peer_key = frame.key
            self._send_credit = SendCredit(frame.stream_window, frame.connection_window)
            self._authenticated = True
            self._ready.append(PeerAuthenticated())
            self._ready.extend(self._held)
            self._held.clear()
        elif isinstance(frame, Accept) and self._is_client and not self._accepted:
            self._accepted = True
            self._send_credit = SendCredit(frame.stream_window, frame.connection_window)
            self._flush_pending()
        else:
            raise ControlError(f"unexpected {type(frame).__name__.lower()} frame")

    def _deliver(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Pass stream bytes on, ending the stream once, on QUIC's FIN or at the announced size."""
        if not end_stream and not self._final_sizes and stream_id not in self._ended:
            self._emit(StreamData(stream_id, data, False))  # the common case, per packet
            return
        if stream_id in self._ended:
            if data:
                raise ControlError(f"data beyond the end of stream {stream_id}")
            return  # the other end signal, arriving second
        final = self._final_sizes.get(stream_id)
        if final is not None and self._receive_credit.received_on(stream_id) > final:
            raise ControlError(f"stream {stream_id} grew beyond its announced end")
        if final is not None and self._receive_credit.received_on(stream_id) == final:
            end_stream = True
        if end_stream:
            self._final_sizes.pop(stream_id, None)
            if not self._receive_credit.was_released(stream_id):
                self._ended.add(stream_id)
            self._receive_credit.finished(stream_id)
        if data or end_stream:
            self._emit(StreamData(stream_id, data, end_stream))

    def _on_fin(self, frame: Fin) -> None:
        stream_id = frame.stream_id
        if stream_id in self._ended or self._receive_credit.was_released(stream_id):
            return
        if stream_id % 4 in (2, 3):
            raise ControlError("fin for a unidirectional stream")
        if self._is_local(stream_id) and stream_id not in self._opened:
            return  # not a stream of ours: nothing to end
        if not self._is_local(stream_id) and frame.final_size == 0:
            return  # natter's streams open with a header: an empty one is not ours either
        if len(self._final_sizes) >= MAX_OPEN_FINS:
            raise ControlError("too many streams ended ahead of their data")
        self._final_sizes[frame.stream_id] = frame.final_size
        self._deliver(frame.stream_id, b"", False)

    def _announce_fin(self, stream_id: int) -> None:
        if self._send_credit is not None:
            self._control(Fin(stream_id, self._send_credit.sent_on(stream_id)))

    def _verifies(self, key: bytes, signature: bytes) -> bool:
        """A signature by ``key`` over this session's binding: only this client could make it."""
        return identity.verify(key, signature, tunnelctl.proof_message(self._binding()))

    def _flush_pending(self) -> None:
        credit = self._send_credit
        assert credit is not None
        for stream_id in list(self._pending):
            pending = self._pending[stream_id]
            fin_sent = False
            while pending.chunks and (allowed := credit.available(stream_id)) > 0:
                chunk = pending.chunks.popleft()
                if allowed < len(chunk):
                    pending.chunks.appendleft(chunk[allowed:])
                    chunk = chunk[:allowed]
                credit.spend(stream_id, len(chunk))
                pending.size -= len(chunk)
                fin_sent = not pending.chunks and pending.fin
                super().send_stream_data(stream_id, chunk, fin_sent)
            if not pending.chunks:
                if pending.fin and not fin_sent:
                    super().send_stream_data(stream_id, b"", True)
                if pending.fin:
                    self._announce_fin(stream_id)
                del self._pending[stream_id]
                if stream_id in self._forget_when_sent:
                    self._forget_when_sent.discard(stream_id)
                    credit.forget(stream_id)

    def _control(self, frame: tunnelctl.ControlFrame) -> None:
        if self._control_out is None:
            self._control_out = self._open_stream(True)
        super().send_stream_data(self._control_out, tunnelctl.encode(frame), False)

    def _protocol_error(self, reason: str) -> None:
        self.close(error_code=QuicErrorCode.PROTOCOL_VIOLATION, reason_phrase=reason)
        self._held.clear()
        self._ready.append(
            Terminated(QuicErrorCode.PROTOCOL_VIOLATION, f"peer broke the tunnel protocol: {reason}")
        )

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 0) == self._is_client


@dataclass
class Qh3Engine(EngineSettings):
    name = "qh3"

    def __post_init__(self) -> None:
        """qh3 takes its own certificate and key types: convert the agent's once."""
        pem_certificate = self.credentials.certificate.public_bytes(serialization.Encoding.PEM)
        pem_key = self.credentials.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self._certificate = qtls.load_pem_x509_certificates(pem_certificate)[0]
        self._private_key = qtls.load_pem_private_key(pem_key, None)

    def _configuration(self, is_client: bool) -> QuicConfiguration:
        cfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN_CONTROL],
            idle_timeout=self.idle_timeout,
            max_datagram_size=self.max_datagram_size,
            probe_datagram_size=False,  # a relayed path has less room: keep datagrams at one size
            max_data=self.connection_window * CORE_WINDOW_FACTOR,
            max_stream_data=self.stream_window * CORE_WINDOW_FACTOR,
            verify_mode=ssl.CERT_NONE,  # the key is checked by natter, not by a CA
            signature_algorithms=list(SIGNATURE_ALGORITHMS) if is_client else None,
        )
        if not is_client:
            cfg.certificate = self._certificate
            cfg.private_key = self._private_key
        return cfg

    def _new(self, **kwargs: Any) -> Qh3TunnelConnection:
        return Qh3TunnelConnection(
            credentials=self.credentials,
            stream_window=self.stream_window,
            connection_window=self.connection_window,
            **kwargs,
        )

    def client_connection(self) -> Qh3TunnelConnection:
        return self._new(configuration=self._configuration(True))

    def server_connection(self, initial: bytes) -> Qh3TunnelConnection | None:
        if len(initial) < 1200:
            return None
        try:
            header = pull_quic_header(Buffer(data=initial), 8)
        except Exception:
            return None
        if header.packet_type != QuicPacketType.INITIAL:
            return None
        return self._new(
            configuration=self._configuration(False),
            original_destination_connection_id=header.destination_cid,
        )
