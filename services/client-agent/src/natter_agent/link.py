"""One QUIC connection to one peer, driven from natter's own loop over the shared socket.

A ``PeerLink`` feeds datagrams and timers into the sans-IO connection, sends what it
produces once per event-loop turn and dispatches its events to ``StreamChannel`` objects.
Channels give the tunnel bounded buffers both ways. Paths are not its business: the
connection always sees its peer at ``QUIC_PEER`` and the agent sends where the machine
routes (``route``, ``kind`` are kept here for status).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any

import structlog

from natter_proto.agent.kinds import QUIC_PEER, Path, PathKind, Role, path_label
from natter_proto.fairqueue import FairQueue
from natter_proto.sendqueue import SendQueue

from .engines.base import (
    CidIssued,
    CidRetired,
    DatagramReceived,
    PeerAuthenticated,
    PingAcked,
    StopSending,
    StreamData,
    StreamReset,
    Terminated,
    TunnelConnection,
    explain_engine_mismatch,
)
from .stream import StreamChannel, StreamClosed

log = structlog.get_logger("natter.link")

ERR_RESET = 0x1  # application error code used on RESET_STREAM / STOP_SENDING
FEED_ROUND = 16 * 1024  # bytes handed to the engine before it packs them: about 12 packets
SMALL_WRITE = 4096  # a write this small, with nothing queued, skips the send queue
QUIC_ADDR = (QUIC_PEER.host, QUIC_PEER.port)


class PeerLink:
    """The QUIC tunnel to one peer over one punched path."""

    def __init__(
        self,
        *,
        tunnel: int,
        send: Callable[[list[tuple[bytes, Any]]], None],
        conn: TunnelConnection,
        peer: str,
        route: Path,
        kind: PathKind,
        role: Role,
        on_incoming: Callable[[StreamChannel], None],
        on_ready: Callable[[PeerLink], None],
        on_pong: Callable[[PeerLink, int, bool], None],
        on_cid: Callable[[PeerLink, bytes, bool], None],
        on_closed: Callable[[PeerLink], None],
        on_datagram: Callable[[PeerLink, bytes], None],
        verify: Callable[[PeerLink], str | None],
        expected_key: bytes | None,
        send_buffer_limit: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.tunnel = tunnel  # the machine's number for it
        self._send_datagrams = send  # the agent sends on the current route
        self.conn = conn
        self.peer = peer
        self.route = route
        self.kind = kind
        self.role = role
        self.ready = False  # verified and, as the client, accepted: told with on_ready
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._on_incoming = on_incoming
        self._on_ready = on_ready
        self._on_pong = on_pong
        self._on_cid = on_cid
        self._on_closed = on_closed
        self._on_datagram = on_datagram
        self._verify = verify
        self.expected_key = expected_key  # what the broker vouched for
        self.peer_key: bytes | None = None  # what the peer proved in the handshake
        self._verified = False
        self.vetted = True  # False: a listener's tunnel from a peer the user never named
        self._send_limit = send_buffer_limit
        self._channels: dict[int, StreamChannel] = {}
        self._blocked: set[StreamChannel] = set()
        self._queue = SendQueue()  # written, not yet handed to the engine: see flush
        self._fed: set[int] = set()  # streams the engine may still hold unsent bytes of
        self._release_when_sent: set[int] = set()
        self._stream_waiters: FairQueue[asyncio.Future[None]] = FairQueue()  # per forward, in turn
        self._granted = 0  # slots handed to woken waiters that have not opened their stream yet
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._inbox: list[bytes] = []
        self._moved_at_ping = 0  # bytes both ways when the last ping was acknowledged
        self.started = self.loop.time()
        self.bytes_sent = 0  # payload bytes, both ways, over the tunnel's life
        self.bytes_received = 0
        self.streams_opened = 0

    @property
    def is_alive(self) -> bool:
        return not self.closed.is_set()

    @property
    def rtt(self) -> float:
        return self.conn.smoothed_rtt()

    def start_client(self) -> None:
        self.conn.connect(QUIC_ADDR, now=self.loop.time())
        self.flush()

    def ping(self, uid: int) -> None:
        """A QUIC PING the machine asked for; its acknowledgement goes back as a pong."""
        if not self.is_alive:
            return
        try:
            self.conn.send_ping(uid)
        except Exception as exc:  # the engine closed it first (the peer's close, an error)
            self._closed_by_engine(exc)
            return
        self.flush()

    # -- DATAGRAM frames (UDP forwards) ---------------------------------------------
    def datagram_room(self) -> int:
        return self.conn.datagram_room() if self.ready else 0

    def send_datagram(self, data: bytes) -> bool:
        """A UDP forward's frame, sent at the end of this turn; False: not sent (the tunnel
        is not up, or the frame is larger than it carries)."""
        if not self.ready or not self.is_alive or not self.conn.send_datagram(data):
            return False
        self.schedule_flush()
        return True

    # -- input ----------------------------------------------------------------
    def datagram_received(self, data: bytes) -> None:
        """Queue a datagram; the socket's whole batch is fed to the engine at once, after it."""
        if not self._inbox:
            self.loop.call_soon(self._drain_inbox)
        self._inbox.append(data)

    def _drain_inbox(self) -> None:
        inbox, self._inbox = self._inbox, []
        if self.closed.is_set():
            return
        try:
            self.conn.receive_datagrams(inbox, QUIC_ADDR, self.loop.time())
            self._process_events()
        except Exception as exc:  # the engine itself failed: end this tunnel, not the agent
            self._engine_failed(exc)
            return
        self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.conn.handle_timer(now=self.loop.time())
            self._process_events()
        except Exception as exc:
            self._engine_failed(exc)
            return
        self.flush()

    def _closed_by_engine(self, exc: Exception) -> None:
        """The engine refused a call because its connection is over: end the tunnel as if we
        had seen the close (nothing of it may reach the agent as an exception)."""
        log.debug("tunnel closed by its engine", peer=self.peer, error=f"{type(exc).__name__}: {exc}")
        self._terminated(f"connection closed: {exc}")

    def _engine_failed(self, exc: Exception) -> None:
        """An engine bug (seen: qh3 2.1.0 under loss) must not leave a half-dead tunnel: the
        agent logs it and rebuilds the tunnel as it would after any loss of the peer."""
        log.error("QUIC engine failed", peer=self.peer, error=f"{type(exc).__name__}: {exc}")
        self._terminated(f"QUIC engine error: {type(exc).__name__}: {exc}")

    def _process_events(self) -> None:
        while (event := self.conn.poll_event()) is not None:
            if self.closed.is_set():
                continue  # refused or closed: nothing after that may reach a stream
            if isinstance(event, StreamData):
                channel = self._channels.get(event.stream_id)
                if channel is None:
                    if self._is_local_stream(event.stream_id):
                        continue  # data for a stream we already finished with
                    channel = StreamChannel(self, event.stream_id)
                    self._channels[event.stream_id] = channel
                    self.streams_opened += 1
                    self._on_incoming(channel)
                self.bytes_received += len(event.data)
                channel._feed(event.data, event.end_stream)
            elif isinstance(event, StreamReset):
                self._fail_channel(event.stream_id, "peer reset the stream")
            elif isinstance(event, StopSending):
                self._fail_channel(event.stream_id, "peer stopped reading")
                self.conn.reset_stream(event.stream_id, ERR_RESET)
                self._drop_unsent(event.stream_id)
            elif isinstance(event, PeerAuthenticated):
                self.peer_key = self.conn.peer_public_key()
                refusal = self._verify(self)
                if refusal is not None:
                    self.close(refusal)
                    continue
                self._verified = True
                self.conn.accept_peer()
            elif isinstance(event, DatagramReceived):
                if self.ready:  # nothing from a peer not yet checked
                    self._on_datagram(self, event.data)
            elif isinstance(event, CidIssued | CidRetired):
                self._on_cid(self, event.cid, isinstance(event, CidIssued))
            elif isinstance(event, PingAcked):
                moved = self.bytes_sent + self.bytes_received
                busy, self._moved_at_ping = moved != self._moved_at_ping, moved
                self._on_pong(self, event.uid, busy)
            elif isinstance(event, Terminated):
                reason = explain_engine_mismatch(self.peer, event.reason or f"error 0x{event.error_code:x}")
                self._terminated(f"connection closed by {self.peer}: {reason}")
        self._wake_stream_waiters()
        self._maybe_ready()

    def _wake_stream_waiters(self) -> None:
        """The peer's MAX_STREAMS may have let more streams in: wake one waiter per free slot,
        taking the forwards in turn (a closed tunnel wakes them all, to fail)."""
        waiters = self._stream_waiters
        if not waiters:
            return
        slots = self.conn.stream_slots() - self._granted if self.is_alive else len(waiters)
        while slots > 0 and (waiter := waiters.pop()) is not None:
            if not waiter.done():
                waiter.set_result(None)
                self._granted += 1
                slots -= 1

    def _maybe_ready(self) -> None:
        """Up once we verified the peer and, as the QUIC client, the server has confirmed the
        handshake (HANDSHAKE_DONE): a server that refuses us closes instead of confirming."""
        confirmed = self.role is Role.SERVER or self.conn.handshake_confirmed()
        if self._verified and confirmed and not self.ready and self.is_alive:
            self.ready = True
            self._on_ready(self)

    def _is_local_stream(self, stream_id: int) -> bool:
        client_initiated = stream_id % 2 == 0
        return client_initiated == (self.role is Role.CLIENT)

    # -- output ---------------------------------------------------------------
    def schedule_flush(self) -> None:
        """Transmit once at the end of this event-loop turn (coalesces many writes)."""
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand the engine written bytes one stream's quantum at a time and send what it makes.

        Engines take turns between streams packet by packet; fed one stream at a time, they
        send runs of packets of one stream, which the receiver takes in few events
        (natter_proto.sendqueue). The next quantum goes in once the engine has sent the last.
        """
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        try:
            now = self.loop.time()
            self._feed_engine()
            datagrams = self.conn.datagrams_to_send(now=now)
            while self._queue and self._feed_engine():
                datagrams += self.conn.datagrams_to_send(now=now)
            self._arm_timer()
        except Exception as exc:
            self._engine_failed(exc)
            return
        if datagrams:
            self._send_datagrams(datagrams)
        self._wake_writers()

    def _feed_engine(self) -> bool:
        """Give the engine the next chunks if it has sent what it had; True if it got any.

        Chunks go in until FEED_ROUND bytes: a bulk chunk is a round of its own (runs of
        packets of one stream), while the small writes of many connections (requests, each
        on its own stream) go in together and share packets instead of one packet each."""
        conn, fed = self.conn, self._fed
        for stream_id in list(fed):
            if conn.unsent(stream_id):
                return False  # the engine still has bytes to send (congestion window)
            fed.discard(stream_id)
        given = 0
        while given < FEED_ROUND and (item := self._queue.next_chunk(conn.send_credit)) is not None:
            stream_id, data, fin = item
            conn.send_stream_data(stream_id, data, end_stream=fin)
            given += len(data) + 1  # an end of stream counts too
            fed.add(stream_id)
            if stream_id in self._release_when_sent and stream_id not in self._queue:
                self._release_when_sent.discard(stream_id)
                conn.release_stream(stream_id)
        return given > 0

    def _arm_timer(self) -> None:
        when = self.conn.get_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None and not self.closed.is_set():
            self._timer = self.loop.call_at(when, self._on_timer)

    def _wake_writers(self) -> None:
        if not self._blocked:
            return
        for channel in list(self._blocked):
            if self.send_capacity(channel.stream_id) > 0:
                self._blocked.discard(channel)
                channel._writable.set()

    # -- used by channels -------------------------------------------------------
    async def open_stream(self, owner: Hashable = None) -> StreamChannel:
        """A new stream of ours, once the peer allows one more. QUIC limits how many are open
        at once (``EngineSettings.max_streams``); beyond that, connections wait in their
        owner's line and the owners (forwards) take turns as streams end."""
        if self.is_alive and (self.conn.stream_slots() - self._granted <= 0 or self._stream_waiters):
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._stream_waiters.push(owner, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                queued = self._stream_waiters.remove(owner, waiter)
                if not queued and waiter.done() and not waiter.cancelled():
                    self._granted -= 1  # woken, then given up: its slot goes to the next
                    self._wake_stream_waiters()
                raise
            self._granted -= 1
        if not self.is_alive:
            raise StreamClosed(self.close_reason or "tunnel closed")
        try:
            stream_id = self.conn.new_stream_id()
        except ConnectionError as exc:  # the engine saw the close before we did
            raise StreamClosed(str(exc)) from None
        channel = StreamChannel(self, stream_id)
        self._channels[stream_id] = channel
        self.streams_opened += 1
        return channel

    @property
    def open_streams(self) -> int:
        return len(self._channels)

    def status(self) -> dict[str, object]:
        """What `natter status` shows for this tunnel."""
        return {
            "peer": self.peer,
            "path": path_label(self.route, self.kind),  # direct, lan, predicted, relayed (udp|tcp)
            "endpoint": str(self.route),
            "role": self.role.value,
            "rtt_ms": round(self.rtt * 1000, 2),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "open_connections": self.open_streams,
            "connections": self.streams_opened,
            "uptime_s": round(self.loop.time() - self.started, 1),
        }

    def send_capacity(self, stream_id: int) -> int:
        return self._send_limit - self._queue.size(stream_id) - self.conn.send_buffer_size(stream_id)

    def wait_writable(self, channel: StreamChannel) -> None:
        self._blocked.add(channel)

    def send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if not self.is_alive:
            raise StreamClosed(self.close_reason or "tunnel closed")
        self.bytes_sent += len(data)
        if not self._queue and len(data) <= SMALL_WRITE and self.conn.send_credit(stream_id) >= len(data):
            # nothing waits before it (a request on an idle tunnel): straight to the engine,
            # which packs this turn's small writes together at the flush
            try:
                self.conn.send_stream_data(stream_id, data, end_stream=end_stream)
            except Exception as exc:
                self._engine_failed(exc)
                raise StreamClosed(self.close_reason) from None
            self._fed.add(stream_id)
        else:
            self._queue.push(stream_id, data, end_stream)
        self.schedule_flush()

    def consume(self, stream_id: int, size: int) -> None:
        self.conn.consume(stream_id, size)
        self.schedule_flush()

    def abort_stream(self, stream_id: int) -> None:
        if not self.is_alive:
            return
        try:
            self.conn.reset_stream(stream_id, ERR_RESET)
            self.conn.stop_stream(stream_id, ERR_RESET)
        except ValueError:
            pass  # the stream is already finished in that direction
        except Exception as exc:  # the whole connection is over
            self._closed_by_engine(exc)
            return
        self._drop_unsent(stream_id)
        self.schedule_flush()

    def _drop_unsent(self, stream_id: int) -> None:
        """A reset stream: its queued bytes go, what the engine held no longer holds back the
        feed, and a release that waited for its last bytes happens now."""
        self._queue.drop(stream_id)
        self._fed.discard(stream_id)
        if stream_id in self._release_when_sent:
            self._release_when_sent.discard(stream_id)
            self.conn.release_stream(stream_id)

    def release(self, channel: StreamChannel) -> None:
        """The application is done with a stream: drop it and return its unread credit."""
        if self._channels.pop(channel.stream_id, None) is not None:
            self._blocked.discard(channel)
            if channel.stream_id in self._queue:  # its last bytes still go out first
                self._release_when_sent.add(channel.stream_id)
            else:
                self.conn.release_stream(channel.stream_id)
            self.schedule_flush()

    def _fail_channel(self, stream_id: int, reason: str) -> None:
        channel = self._channels.get(stream_id)
        if channel is not None:
            channel._fail(reason)

    # -- lifetime ---------------------------------------------------------------
    def close(self, reason: str = "closed") -> None:
        if not self.is_alive:
            return
        try:
            self.conn.close(error_code=0, reason_phrase=reason)
        except Exception as exc:  # already over inside the engine: nothing left to tell the peer
            log.debug("tunnel was already closed by its engine", peer=self.peer, error=str(exc))
        else:
            self.flush()
        self._terminated(reason)

    def _terminated(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        for channel in list(self._channels.values()):
            channel._fail(reason)
        self._wake_stream_waiters()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_closed(self)
