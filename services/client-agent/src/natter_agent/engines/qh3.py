"""qh3 behind natter's engine interface, with natter's tunnel-control machine.

qh3 checks the server's Ed25519 certificate in TLS like aioquic, but it cannot ask the
client for one, and it widens receive windows as data arrives. So the key proof, the
acceptance, stream ends and credit travel on a control stream, decided by
``natter_proto.tunnelcontrol.TunnelControl``. This adapter feeds it what qh3 delivers,
binds the proof to the TLS session's secrets, and joins a batch's data per stream.
"""

from __future__ import annotations

import functools
import ssl
from collections import deque
from collections.abc import Callable
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
from natter_proto.tunnelcontrol import TunnelControl
from natter_proto.tunnelctl import ControlError

from ..tls import Credentials, raw_public_key
from . import qh3_limits
from .base import (
    MAX_DATAGRAM_FRAME,
    MAX_PENDING_DATAGRAMS,
    CidIssued,
    CidRetired,
    DatagramReceived,
    EngineSettings,
    PingAcked,
    StreamData,
    StreamReset,
    Terminated,
    TunnelEvent,
    datagram_room,
)

ALPN_CONTROL = "natter/1-ctl"  # qh3: key proof and credit on the control stream
SIGNATURE_ALGORITHMS = [qtls.SignatureAlgorithm.ED25519]  # the server's certificate is its natter key
CORE_WINDOW_FACTOR = 2  # qh3's own windows stay wider than natter's credit, so they never bind


class Qh3TunnelConnection(QuicConnection):
    def __init__(
        self,
        *,
        credentials: Credentials,
        stream_window: int,
        connection_window: int,
        limits: Qh3Limits,
        **kwargs: Any,
    ):
        self._limits = limits
        self._datagrams_queued = self._datagram_bytes_queued = 0  # since the last send
        super().__init__(**kwargs)
        self._credentials = credentials
        self._stream_window = stream_window
        self._connection_window = connection_window
        self._secrets: dict[qtls.Direction, bytes] = {}
        self._ready: deque[TunnelEvent] = deque()
        self._control_out: int | None = None
        self._ctl = TunnelControl(
            is_client=self._is_client,
            stream_window=stream_window,
            connection_window=connection_window,
            send_stream=functools.partial(QuicConnection.send_stream_data, self),
            write_control=self._write_control,
            emit=self._emit,
            ready=self._ready.append,
        )
        self._merging: dict[int, StreamData] = {}  # a stream's event still waiting in _ready
        self._parts: dict[int, list[bytes]] = {}  # ... and the data that joined it

    # -- TLS session binding --------------------------------------------------------
    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        self._limits.create_core(self, remote_addr, initial_dcid, now)

    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        bridge: QuicTlsBridge = self._limits.create_tls(self, remote_source_cid)
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
        return self._ctl.peer_key

    def handshake_confirmed(self) -> bool:
        return self._handshake_confirmed and self._ctl.accepted

    def datagram_room(self) -> int:
        return datagram_room(self._remote_max_datagram_frame_size, self._configuration.max_datagram_size)

    def send_datagram(self, data: bytes) -> bool:
        # qh3's core keeps its queue to itself: what it holds back is what congestion
        # control has no room for, so count what went in since the last send
        core = self._core
        if core is None or len(data) > self.datagram_room():
            return False
        room = core.congestion_window - core.bytes_in_flight
        if self._datagrams_queued >= MAX_PENDING_DATAGRAMS or self._datagram_bytes_queued > room:
            return False
        self._datagrams_queued += 1
        self._datagram_bytes_queued += len(data)
        self.send_datagram_frame(data)
        return True

    def accept_peer(self) -> None:
        if self._is_client:
            proof = tunnelctl.proof_message(self._binding())
            key = raw_public_key(self._credentials.certificate)
            assert key is not None, "natter credentials always wrap an Ed25519 key (tls.credentials_for)"
            self._ctl.prove(key, self._credentials.private_key.sign(proof))
        else:
            self._ctl.accept()

    def smoothed_rtt(self) -> float:
        rtt = self._core.smoothed_rtt if self._core is not None else None
        return float(rtt) if rtt is not None else 0.0

    def host_connection_id(self) -> bytes:
        return bytes(self.host_cid)

    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        self.receive_many_datagrams(datagrams, addr, now)

    def new_stream_id(self) -> int:
        try:
            stream_id = self._open_stream(False)
            self._ctl.opened(stream_id)
            return stream_id
        except QuicConnectionError as exc:
            raise ConnectionError(f"tunnel closed: {exc.reason_phrase}") from None

    def stream_slots(self) -> int:
        if self._core is None:
            return 0
        allowed, _uni, opened, _opened_uni = self._core.stream_limits  # both cumulative
        return max(0, allowed - opened)

    def send_buffer_size(self, stream_id: int) -> int:
        return self.get_send_buffer_size(stream_id) + self._ctl.pending_size(stream_id)

    def unsent(self, stream_id: int) -> int:
        return self.send_buffer_size(stream_id)  # qh3 counts bytes not yet transmitted

    def send_credit(self, stream_id: int) -> int:
        return self._ctl.send_credit(stream_id)

    def send_stream_data(self, stream_id: int, data: Any, end_stream: bool = False) -> None:
        try:
            self._ctl.send(stream_id, data, end_stream)
        except QuicConnectionError as exc:
            raise ConnectionError(f"tunnel closed: {exc.reason_phrase}") from None

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self._ctl.drop(stream_id)
        super().reset_stream(stream_id, error_code)

    def consume(self, stream_id: int, size: int) -> None:
        self._ctl.consume(stream_id, size)

    def release_stream(self, stream_id: int) -> None:
        self._ctl.release(stream_id)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        self._ctl.flush_credit()
        self._datagrams_queued = self._datagram_bytes_queued = 0  # sent now, or in flight's way
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
            merging, waiting_parts, credit = self._merging, self._parts, self._ctl.receive_credit
            while (event := self.next_event()) is not None:  # the whole batch: see _emit
                sid = getattr(event, "stream_id", -1)
                if (
                    sid in merging
                    and type(event) is events.StreamDataReceived
                    and not event.end_stream
                    and self._ctl.in_order_delivery
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
        ctl = self._ctl
        try:
            if isinstance(event, events.StreamDataReceived):
                if event.stream_id % 4 in (2, 3):  # unidirectional: only the peer's control stream
                    local = self._is_local(event.stream_id)
                    ctl.control_data(event.stream_id, event.data, local=local, verify=self._verifies)
                else:
                    ctl.stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                ctl.event(StreamReset(event.stream_id))
            elif isinstance(event, events.StopSendingReceived):
                ctl.stop_sending(event.stream_id)
            elif isinstance(event, events.HandshakeCompleted) and self._is_client:
                certificate = self.get_peercert()
                key = None
                if certificate is not None:
                    key = raw_public_key(x509.load_der_x509_certificate(certificate.public_bytes()))
                ctl.client_authenticated(key)
            elif isinstance(event, events.PingAcknowledged):
                self._ready.append(PingAcked(event.uid))
            elif isinstance(event, events.ConnectionIdIssued):
                self._ready.append(CidIssued(event.connection_id))
            elif isinstance(event, events.ConnectionIdRetired):
                self._ready.append(CidRetired(event.connection_id))
            elif isinstance(event, events.DatagramFrameReceived):
                self._ready.append(DatagramReceived(event.data))
            elif isinstance(event, events.ConnectionTerminated):
                ctl.terminated()
                self._ready.append(Terminated(event.error_code, event.reason_phrase))
        except ControlError as exc:
            self._protocol_error(str(exc))

    def _emit(self, event: TunnelEvent) -> None:
        """What the control machine lets through. qh3 emits one event per packet; with many
        busy streams they interleave. Data for a stream that already has an event waiting
        joins it: one event per stream per batch (bounded by the stream's credit)."""
        if isinstance(event, StreamData):
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

    def _verifies(self, key: bytes, signature: bytes) -> bool:
        """A signature by ``key`` over this session's binding: only this client could make it."""
        return identity.verify(key, signature, tunnelctl.proof_message(self._binding()))

    def _write_control(self, data: bytes) -> None:
        if self._control_out is None:
            self._control_out = self._open_stream(True)
        QuicConnection.send_stream_data(self, self._control_out, data, False)

    def _protocol_error(self, reason: str) -> None:
        self.close(error_code=QuicErrorCode.PROTOCOL_VIOLATION, reason_phrase=reason)
        self._ctl.terminated()
        self._ready.append(
            Terminated(QuicErrorCode.PROTOCOL_VIOLATION, f"peer broke the tunnel protocol: {reason}")
        )

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 0) == self._is_client


@dataclass(frozen=True)
class Qh3Limits:
    """qh3's own functions that build a connection's core and TLS, with natter's limit."""

    create_core: Callable[..., None]
    create_tls: Callable[..., QuicTlsBridge]

    @classmethod
    def of(cls, max_streams: int) -> Qh3Limits:
        return cls(qh3_limits.core_factory(max_streams), qh3_limits.create_tls_factory(max_streams))


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
        self._limits = Qh3Limits.of(self.max_streams)

    def _configuration(self, is_client: bool) -> QuicConfiguration:
        cfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN_CONTROL],
            idle_timeout=self.idle_timeout,
            max_datagram_size=self.max_datagram_size,
            probe_datagram_size=False,  # a relayed path has less room: keep datagrams at one size
            max_datagram_frame_size=MAX_DATAGRAM_FRAME,
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
            limits=self._limits,
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
