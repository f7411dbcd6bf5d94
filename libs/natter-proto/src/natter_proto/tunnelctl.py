"""The tunnel's control stream, for QUIC engines that cannot do natter's job in QUIC itself.

qh3 cannot ask a client for its certificate and widens its receive windows as data
arrives rather than as the application reads it. With such an engine each side opens one
unidirectional stream and speaks these frames on it:

- ``proof`` (QUIC client -> server): the client's natter key and an Ed25519 signature over
  a value bound to this TLS session (both sides derive it from the 1-RTT traffic secrets,
  so a proof cannot be replayed into another session), plus the client's receive windows;
- ``accept`` (server -> client): the server checked the proof and its ACLs; its windows;
- ``credit``: natter-level flow control, credit that follows consumption: new limits for
  streams and for the connection, in bytes of payload;
- ``fin``: a stream's final size, so that its end is seen even if the engine loses a FIN.

Layout of a frame: two bytes of big-endian length, then a msgpack map with ``"t"``. The
decoder is bounded and raises only ``ControlError``.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from dataclasses import dataclass, field

import msgpack

MAX_FRAME = 4096
MAX_CREDIT_ENTRIES = 256
MAX_BUFFER = 4 * MAX_FRAME  # a peer may not leave more than this undecoded
RELEASED_MEMORY = 1024  # streams recently released, whose late data is dropped
PROOF_LABEL = b"natter/1 quic client key proof\x00"
BINDING_LABEL = b"natter/1 tls binding\x00"


class ControlError(ValueError):
    """A malformed control frame, or a peer that broke the credit rules."""


@dataclass(frozen=True)
class Proof:
    key: bytes
    signature: bytes
    stream_window: int
    connection_window: int


@dataclass(frozen=True)
class Accept:
    stream_window: int
    connection_window: int


@dataclass(frozen=True)
class Credit:
    streams: dict[int, int] = field(default_factory=dict)  # stream id -> max payload offset
    connection: int | None = None  # max payload bytes over all streams


@dataclass(frozen=True)
class Fin:
    """The sender ended a stream after ``final_size`` bytes (a second signal beside QUIC's
    FIN, which qh3 2.1.0 was seen to lose: the receiver ends the stream on either)."""

    stream_id: int
    final_size: int


ControlFrame = Proof | Accept | Credit | Fin


def session_binding(client_secret: bytes, server_secret: bytes) -> bytes:
    """A value only the two ends of this TLS session know (from the 1-RTT traffic secrets)."""
    return hashlib.sha256(BINDING_LABEL + client_secret + server_secret).digest()


def proof_message(binding: bytes) -> bytes:
    """What the client signs with its natter key."""
    return PROOF_LABEL + binding


def _pack(body: dict[str, object]) -> bytes:
    payload = bytes(msgpack.packb(body, use_bin_type=True))
    if len(payload) > MAX_FRAME:
        raise ControlError("control frame too large")
    return struct.pack("!H", len(payload)) + payload


def encode(frame: ControlFrame) -> bytes:
    if isinstance(frame, Proof):
        return _pack(
            {
                "t": "proof",
                "key": frame.key,
                "sig": frame.signature,
                "w": frame.stream_window,
                "W": frame.connection_window,
            }
        )
    if isinstance(frame, Accept):
        return _pack({"t": "accept", "w": frame.stream_window, "W": frame.connection_window})
    if isinstance(frame, Fin):
        return _pack({"t": "fin", "s": frame.stream_id, "o": frame.final_size})
    body: dict[str, object] = {"t": "credit", "s": [[sid, limit] for sid, limit in frame.streams.items()]}
    if frame.connection is not None:
        body["c"] = frame.connection
    return _pack(body)


def _uint(body: dict[str, object], key: str, *, at_least: int = 0) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not at_least <= value < 1 << 62:
        raise ControlError(f"control frame field {key!r} is not a valid count")
    return value


def _bin(body: dict[str, object], key: str, size: int) -> bytes:
    value = body.get(key)
    if not isinstance(value, bytes) or len(value) != size:
        raise ControlError(f"control frame field {key!r} is not {size} bytes")
    return value


def _decode_body(body: object) -> ControlFrame:
    if not isinstance(body, dict):
        raise ControlError("control frame is not a map")
    kind = body.get("t")
    if kind == "proof":
        return Proof(
            _bin(body, "key", 32),
            _bin(body, "sig", 64),
            _uint(body, "w", at_least=1),
            _uint(body, "W", at_least=1),
        )
    if kind == "accept":
        return Accept(_uint(body, "w", at_least=1), _uint(body, "W", at_least=1))
    if kind == "fin":
        return Fin(_uint(body, "s"), _uint(body, "o"))
    if kind == "credit":
        entries = body.get("s")
        if not isinstance(entries, list) or len(entries) > MAX_CREDIT_ENTRIES:
            raise ControlError("credit frame has no valid stream list")
        streams: dict[int, int] = {}
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 2:
                raise ControlError("credit entry is not a pair")
            pair = {"s": entry[0], "m": entry[1]}
            streams[_uint(pair, "s")] = _uint(pair, "m")
        connection = _uint(body, "c") if "c" in body else None
        return Credit(streams, connection)
    raise ControlError(f"unknown control frame type {kind!r}")


class ControlReader:
    """Reassembles frames from the control stream's bytes, however they were split."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[ControlFrame]:
        self._buffer += data
        frames: list[ControlFrame] = []
        while len(self._buffer) >= 2:
            (size,) = struct.unpack("!H", self._buffer[:2])
            if size > MAX_FRAME:
                raise ControlError(f"control frame of {size} bytes exceeds {MAX_FRAME}")
            if len(self._buffer) < 2 + size:
                break
            payload, self._buffer = self._buffer[2 : 2 + size], self._buffer[2 + size :]
            try:
                body = msgpack.unpackb(
                    payload,
                    raw=False,
                    strict_map_key=True,
                    max_str_len=64,
                    max_bin_len=128,
                    max_array_len=1024,
                )
            except Exception as exc:
                raise ControlError(f"undecodable control frame ({type(exc).__name__})") from None
            frames.append(_decode_body(body))
        if len(self._buffer) > MAX_BUFFER:
            raise ControlError("control stream holds too much undecoded data")
        return frames


class SendCredit:
    """How much the peer lets us send: per stream and for the whole connection."""

    def __init__(self, stream_window: int, connection_window: int) -> None:
        self.stream_window = stream_window
        self.connection_limit = connection_window
        self.connection_sent = 0
        self._limits: dict[int, int] = {}
        self._sent: dict[int, int] = {}

    def available(self, stream_id: int) -> int:
        stream_left = self._limits.get(stream_id, self.stream_window) - self._sent.get(stream_id, 0)
        return max(0, min(stream_left, self.connection_limit - self.connection_sent))

    def spend(self, stream_id: int, size: int) -> None:
        self._sent[stream_id] = self._sent.get(stream_id, 0) + size
        self.connection_sent += size

    def sent_on(self, stream_id: int) -> int:
        return self._sent.get(stream_id, 0)

    def forget(self, stream_id: int) -> None:
        self._limits.pop(stream_id, None)
        self._sent.pop(stream_id, None)

    def grant(self, credit: Credit) -> None:
        """Limits only grow (a reordered or stale frame never takes credit back)."""
        for stream_id, limit in credit.streams.items():
            if stream_id not in self._sent:
                continue  # a stream we are done with (or never sent on): nothing to extend
            if limit > self._limits.get(stream_id, self.stream_window):
                self._limits[stream_id] = limit
        if credit.connection is not None and credit.connection > self.connection_limit:
            self.connection_limit = credit.connection


def moved_limit(consumed: int, window: int, limit: int) -> int | None:
    """The receive rule both engines follow: the peer may send ``window`` bytes beyond what
    the application consumed; the limit is re-announced (this new value) only once it can
    move by a quarter window, so a steady reader costs one small frame per quarter window."""
    target = consumed + window
    return target if target - limit >= window // 4 else None


class ReceiveCredit:
    """What we let the peer send: credit follows what the application consumed.

    Limits move by ``moved_limit``, the rule natter's aioquic engine follows too.
    """

    def __init__(self, stream_window: int, connection_window: int) -> None:
        self.stream_window = stream_window
        self.connection_window = connection_window
        self._limits: dict[int, int] = {}
        self._received: dict[int, int] = {}
        self._consumed: dict[int, int] = {}
        self._finished: set[int] = set()
        self.connection_limit = connection_window
        self.connection_received = 0
        self._connection_returned = 0  # consumed, or released unread by finished streams
        self._due: set[int] = set()
        self._released: set[int] = set()
        self._released_order: deque[int] = deque()

    def received(self, stream_id: int, size: int) -> None:
        """Account arriving payload; a peer that exceeds its credit breaks the protocol."""
        if stream_id in self._released:
            # still in flight when we let the stream go: it is dropped, so its credit returns
            self.connection_received += size
            self._connection_returned += size
            return
        total = self._received.get(stream_id, 0) + size
        if total > self._limits.get(stream_id, self.stream_window):
            raise ControlError(f"peer exceeded its credit on stream {stream_id}")
        if self.connection_received + size > self.connection_limit:
            raise ControlError("peer exceeded its connection credit")
        self._received[stream_id] = total
        self.connection_received += size

    def received_on(self, stream_id: int) -> int:
        return self._received.get(stream_id, 0)

    def was_released(self, stream_id: int) -> bool:
        return stream_id in self._released

    def consumed(self, stream_id: int, size: int) -> None:
        self._consumed[stream_id] = self._consumed.get(stream_id, 0) + size
        self._connection_returned += size
        if stream_id not in self._finished:
            limit = self._limits.get(stream_id, self.stream_window)
            if moved_limit(self._consumed[stream_id], self.stream_window, limit) is not None:
                self._due.add(stream_id)

    def finished(self, stream_id: int) -> None:
        """The peer sent FIN: the stream needs no more credit."""
        self._finished.add(stream_id)
        self._due.discard(stream_id)

    def release(self, stream_id: int) -> None:
        """The application is done with a stream: what arrived unread returns to the connection."""
        received = self._received.pop(stream_id, 0)
        consumed = self._consumed.pop(stream_id, 0)
        self._connection_returned += max(0, received - consumed)
        self._limits.pop(stream_id, None)
        self._finished.discard(stream_id)
        self._due.discard(stream_id)
        self._released.add(stream_id)
        self._released_order.append(stream_id)
        if len(self._released_order) > RELEASED_MEMORY:
            self._released.discard(self._released_order.popleft())

    def pending(self) -> Credit | None:
        """The credit frame to send now, if any limit moved far enough."""
        streams: dict[int, int] = {}
        for stream_id in list(self._due)[:MAX_CREDIT_ENTRIES]:
            self._due.discard(stream_id)
            streams[stream_id] = self._consumed.get(stream_id, 0) + self.stream_window
            self._limits[stream_id] = streams[stream_id]
        connection = moved_limit(self._connection_returned, self.connection_window, self.connection_limit)
        if connection is not None:
            self.connection_limit = connection
        if not streams and connection is None:
            return None
        return Credit(streams, connection)
