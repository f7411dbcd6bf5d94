"""The tunnel-control machine: natter's key proof, acceptance, stream ends and credit for a
QUIC engine that has neither mutual TLS nor application-driven flow control (qh3 today).

Each side opens one unidirectional control stream (frames of ``tunnelctl``): the client
proves its natter key with a signature bound to the TLS session, the server answers
``accept`` once its link has checked that key, and both sides grant stream credit as the
application consumes. Until the proof arrives, the server holds back everything the
client sent (bounded: the client may not send more than one connection window before it
is credited). A stream's end travels as QUIC's FIN and as a ``fin`` frame with its final
size, whichever arrives first ends it, once.

Pure: the engine hands it what QUIC delivered and gives it three outlets (raw stream
sends, control-stream bytes, events); protocol violations raise ``ControlError``, which
the engine answers by closing the connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from . import tunnelctl
from .tunnelctl import Accept, ControlError, Credit, Fin, Proof, ReceiveCredit, SendCredit
from .tunnelevents import PeerAuthenticated, StopSending, StreamData, TunnelEvent

MAX_OPEN_FINS = 1024  # final sizes announced for streams whose bytes are still arriving

SendStream = Callable[[int, bytes, bool], None]
Emit = Callable[[TunnelEvent], None]


class _Pending:
    """Bytes the peer has not credited yet, for one stream (plus a FIN behind them)."""

    __slots__ = ("chunks", "fin", "size")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.fin = False


class TunnelControl:
    def __init__(
        self,
        *,
        is_client: bool,
        stream_window: int,
        connection_window: int,
        send_stream: SendStream,
        write_control: Callable[[bytes], None],
        emit: Emit,
        ready: Emit,
    ) -> None:
        """``emit``: stream events for the application (the engine may merge them);
        ``ready``: events that go out as they are."""
        self.is_client = is_client
        self.stream_window = stream_window
        self.connection_window = connection_window
        self._send_stream = send_stream
        self._write_control = write_control
        self._emit_out = emit
        self._ready = ready
        self.authenticated = False
        self.accepted = False  # client: the server said accept
        self.peer_key: bytes | None = None
        self._held: deque[TunnelEvent] = deque()  # server: until the client's proof checks out
        self._control_in: int | None = None
        self._reader = tunnelctl.ControlReader()
        self._send_credit: SendCredit | None = None  # known once the peer told us its windows
        self.receive_credit = ReceiveCredit(stream_window, connection_window)
        self._pending: dict[int, _Pending] = {}
        self._forget_when_sent: set[int] = set()
        self._final_sizes: dict[int, int] = {}  # peer's announced ends not yet reached
        self._ended: set[int] = set()  # streams whose end we passed on (until released)
        self._opened: set[int] = set()  # our own streams, until released

    # -- the handshake -------------------------------------------------------------------
    def client_authenticated(self, server_key: bytes | None) -> None:
        """The client checked the server's key in TLS."""
        self.peer_key = server_key
        self.authenticated = True
        self._ready(PeerAuthenticated())

    def prove(self, key: bytes, signature: bytes) -> None:
        """Client: our key, and a signature over this session's binding."""
        self._control(Proof(key, signature, self.stream_window, self.connection_window))

    def accept(self) -> None:
        """Server: the link checked the client's key and ACLs; it may go ahead."""
        self._control(Accept(self.stream_window, self.connection_window))

    @property
    def in_order_delivery(self) -> bool:
        """The common case: no announced ends pending (the engine's fast path applies)."""
        return not self._final_sizes

    # -- sending -------------------------------------------------------------------------
    def opened(self, stream_id: int) -> None:
        self._opened.add(stream_id)

    def pending_size(self, stream_id: int) -> int:
        pending = self._pending.get(stream_id)
        return pending.size if pending is not None else 0

    def send_credit(self, stream_id: int) -> int:
        if self._send_credit is None or stream_id in self._pending:
            return 0
        return self._send_credit.available(stream_id)

    def send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Pass data to QUIC as far as the peer's credit goes; hold the rest."""
        pending = self._pending.get(stream_id)
        if pending is None and self._send_credit is not None:
            allowed = min(len(data), self._send_credit.available(stream_id))
            if allowed == len(data):
                self._send_credit.spend(stream_id, allowed)
                self._send_stream(stream_id, bytes(data), end_stream)
                if end_stream:
                    self._announce_fin(stream_id)
                return
            if allowed:
                self._send_credit.spend(stream_id, allowed)
                self._send_stream(stream_id, bytes(data[:allowed]), False)
            data = data[allowed:]
        if pending is None:
            pending = self._pending[stream_id] = _Pending()
        if len(data):
            pending.chunks.append(bytes(data))
            pending.size += len(data)
        pending.fin = pending.fin or end_stream

    def drop(self, stream_id: int) -> None:
        """The stream was reset: what waited for credit goes."""
        self._pending.pop(stream_id, None)

    def stop_sending(self, stream_id: int) -> None:
        self._pending.pop(stream_id, None)
        self._emit(StopSending(stream_id))

    def consume(self, stream_id: int, size: int) -> None:
        self.receive_credit.consumed(stream_id, size)

    def release(self, stream_id: int) -> None:
        self.receive_credit.release(stream_id)
        self._ended.discard(stream_id)
        self._opened.discard(stream_id)
        self._final_sizes.pop(stream_id, None)
        if stream_id in self._pending:
            self._forget_when_sent.add(stream_id)  # still sending: keep listening for credit
        elif self._send_credit is not None:
            self._send_credit.forget(stream_id)

    def flush_credit(self) -> None:
        """Before the engine transmits: the credit the application freed, in one frame."""
        if self.authenticated and (credit := self.receive_credit.pending()) is not None:
            self._control(credit)

    # -- receiving -----------------------------------------------------------------------
    def event(self, event: TunnelEvent) -> None:
        """An engine event for the application, held until the peer is authenticated."""
        self._emit(event)

    def terminated(self) -> None:
        self._held.clear()

    def stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.receive_credit.received(stream_id, len(data))
        self._deliver(stream_id, data, end_stream)

    def control_data(
        self, stream_id: int, data: bytes, *, local: bool, verify: Callable[[bytes, bytes], bool]
    ) -> None:
        """Bytes on a unidirectional stream: only the peer's one control stream may send."""
        if local or self._control_in not in (None, stream_id):
            raise ControlError("unexpected unidirectional stream")
        self._control_in = stream_id
        for frame in self._reader.feed(data):
            self._on_control(frame, verify)

    def _on_control(self, frame: tunnelctl.ControlFrame, verify: Callable[[bytes, bytes], bool]) -> None:
        if isinstance(frame, Credit):
            if self._send_credit is None:
                raise ControlError("credit before the windows were announced")
            self._send_credit.grant(frame)
            self._flush_pending()
        elif isinstance(frame, Fin):
            self._on_fin(frame)
        elif isinstance(frame, Proof) and not self.is_client and not self.authenticated:
            if not verify(frame.key, frame.signature):
                raise ControlError("the client's key proof does not verify")
            self.peer_key = frame.key
            self._send_credit = SendCredit(frame.stream_window, frame.connection_window)
            self.authenticated = True
            self._ready(PeerAuthenticated())
            while self._held:
                self._ready(self._held.popleft())
        elif isinstance(frame, Accept) and self.is_client and not self.accepted:
            self.accepted = True
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
        received = self.receive_credit.received_on(stream_id)
        if final is not None and received > final:
            raise ControlError(f"stream {stream_id} grew beyond its announced end")
        if final is not None and received == final:
            end_stream = True
        if end_stream:
            self._final_sizes.pop(stream_id, None)
            if not self.receive_credit.was_released(stream_id):
                self._ended.add(stream_id)
            self.receive_credit.finished(stream_id)
        if data or end_stream:
            self._emit(StreamData(stream_id, data, end_stream))

    def _on_fin(self, frame: Fin) -> None:
        stream_id = frame.stream_id
        if stream_id in self._ended or self.receive_credit.was_released(stream_id):
            return
        if stream_id % 4 in (2, 3):
            raise ControlError("fin for a unidirectional stream")
        local = (stream_id % 2 == 0) == self.is_client
        if local and stream_id not in self._opened:
            return  # not a stream of ours: nothing to end
        if not local and frame.final_size == 0:
            return  # natter's streams open with a header: an empty one is not ours either
        if len(self._final_sizes) >= MAX_OPEN_FINS:
            raise ControlError("too many streams ended ahead of their data")
        self._final_sizes[stream_id] = frame.final_size
        self._deliver(stream_id, b"", False)

    # -- helpers -------------------------------------------------------------------------
    def _emit(self, event: TunnelEvent) -> None:
        if not self.authenticated:
            self._held.append(event)
        else:
            self._emit_out(event)

    def _announce_fin(self, stream_id: int) -> None:
        if self._send_credit is not None:
            self._control(Fin(stream_id, self._send_credit.sent_on(stream_id)))

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
                self._send_stream(stream_id, chunk, fin_sent)
            if not pending.chunks:
                if pending.fin and not fin_sent:
                    self._send_stream(stream_id, b"", True)
                if pending.fin:
                    self._announce_fin(stream_id)
                del self._pending[stream_id]
                if stream_id in self._forget_when_sent:
                    self._forget_when_sent.discard(stream_id)
                    credit.forget(stream_id)

    def _control(self, frame: tunnelctl.ControlFrame) -> None:
        self._write_control(tunnelctl.encode(frame))
