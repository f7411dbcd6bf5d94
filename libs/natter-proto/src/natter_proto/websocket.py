"""WebSocket (RFC 6455) for the broker's TCP transport, free of I/O.

Why WebSocket over TLS: it is what L7 load balancers and ingress controllers pass with no
more than an upgrade (nginx, HAProxy, cloud load balancers), it crosses HTTP CONNECT
proxies as plain TLS, and its binary messages keep datagram boundaries: each message
carries exactly one datagram as it would travel over UDP (a broker frame or a relay
packet), so both ends validate it with the same code as a UDP datagram. Only what natter
needs: the upgrade, binary messages, ping, pong and close; no extensions. Every size is
bounded: the upgrade head, each message, and what the decoder buffers.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from dataclasses import dataclass

PATH = "/natter/v1"  # where a broker takes the upgrade
MAX_HEAD = 4096  # an upgrade request or response longer than this is refused
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
MAX_CONTROL = 125


class WebSocketError(ValueError):
    """The peer broke the protocol; the connection is closed with this reason."""


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED = 1003
    TOO_BIG = 1009
    POLICY = 1008


@dataclass(frozen=True)
class Message:
    data: bytes


@dataclass(frozen=True)
class Ping:
    data: bytes


@dataclass(frozen=True)
class Pong:
    data: bytes


@dataclass(frozen=True)
class Closed:
    code: int
    reason: str


Event = Message | Ping | Pong | Closed


# -- the upgrade ---------------------------------------------------------------------------
def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def client_request(host: str, key: bytes) -> bytes:
    """The upgrade a client sends; ``key`` is 16 random bytes."""
    encoded = base64.b64encode(key).decode("ascii")
    return (
        f"GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {encoded}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: natter\r\n\r\n"
    ).encode("ascii")


def head_end(buffer: bytes | bytearray) -> int:
    """Where an HTTP head ends in buffer (past its blank line), -1 if not yet; raises when
    it is already longer than MAX_HEAD."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise WebSocketError("HTTP head too long")
        return -1
    if end + 4 > MAX_HEAD:
        raise WebSocketError("HTTP head too long")
    return end + 4


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise WebSocketError("HTTP head is not ASCII") from None
    first, *lines = text.rstrip("\r\n").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise WebSocketError("malformed HTTP header")
        headers[name.lower()] = value.strip()
    return first, headers


def parse_request(head: bytes) -> str:
    """Validate a client's upgrade; returns its Sec-WebSocket-Key."""
    first, headers = _parse_head(head)
    parts = first.split(" ")
    if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/1."):
        raise WebSocketError("not an HTTP GET")
    if parts[1] != PATH:
        raise WebSocketError(f"no WebSocket at {parts[1][:64]!r}")
    if headers.get("upgrade", "").lower() != "websocket":
        raise WebSocketError("not a WebSocket upgrade")
    if "upgrade" not in [t.strip().lower() for t in headers.get("connection", "").split(",")]:
        raise WebSocketError("not a WebSocket upgrade")
    if headers.get("sec-websocket-version") != "13":
        raise WebSocketError("unsupported WebSocket version")
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise WebSocketError("bad Sec-WebSocket-Key") from None
    return key


def server_response(key: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_value(key)}\r\n\r\n"
    ).encode("ascii")


def refusal(status: int, reason: str) -> bytes:
    """A plain HTTP answer to what is not a natter upgrade (a browser, a scanner)."""
    body = f"natter broker: {reason}\n".encode()
    phrase = {400: "Bad Request", 404: "Not Found", 426: "Upgrade Required", 503: "Service Unavailable"}
    return (
        f"HTTP/1.1 {status} {phrase.get(status, 'Error')}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


def parse_response(head: bytes, key: bytes) -> None:
    """Validate the server's answer to our upgrade (``key`` as sent)."""
    first, headers = _parse_head(head)
    parts = first.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise WebSocketError("not an HTTP response")
    if parts[1] != "101":
        raise WebSocketError(f"upgrade refused: {first[:120]}")
    if headers.get("sec-websocket-accept") != accept_value(base64.b64encode(key).decode("ascii")):
        raise WebSocketError("wrong Sec-WebSocket-Accept")


# -- frames --------------------------------------------------------------------------------
def encode(payload: bytes, mask: bytes | None, opcode: Opcode = Opcode.BINARY) -> bytes:
    """One final frame; a client masks with 4 random bytes (RFC 6455 5.3), a server does not."""
    size = len(payload)
    head = bytearray([0x80 | opcode])
    bit = 0x80 if mask is not None else 0
    if size < 126:
        head.append(bit | size)
    elif size < 1 << 16:
        head.append(bit | 126)
        head += struct.pack("!H", size)
    else:
        head.append(bit | 127)
        head += struct.pack("!Q", size)
    if mask is None:
        return bytes(head) + payload
    return bytes(head) + mask + _masked(payload, mask)


def close_frame(code: CloseCode, reason: str, mask: bytes | None) -> bytes:
    return encode(struct.pack("!H", code) + reason.encode()[:120], mask, Opcode.CLOSE)


def _masked(payload: bytes, mask: bytes) -> bytes:
    size = len(payload)
    if not size:
        return b""
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(size, "little")


class Decoder:
    """Frames in, events out. ``masked``: frames must be masked (a server reading a client)
    or must not be (a client reading a server). Buffers at most one frame's header and
    payload, and a message at most ``max_message`` bytes."""

    def __init__(self, *, max_message: int, masked: bool) -> None:
        self.max_message = max_message
        self.masked = masked
        self._buffer = bytearray()
        self._parts: list[bytes] = []
        self._size = 0
        self._closed = False

    def feed(self, data: bytes) -> list[Event]:
        if self._closed:
            return []
        self._buffer += data
        events: list[Event] = []
        while (event := self._next()) is not None:
            if event is not _NOTHING:
                events.append(event)  # type: ignore[arg-type]
            if isinstance(event, Closed):
                self._closed = True
                self._buffer.clear()
                break
        return events

    def _next(self) -> Event | object | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        fin, opcode, masked, size = first & 0x80, first & 0x0F, second & 0x80, second & 0x7F
        if first & 0x70:
            raise WebSocketError("reserved bits set (no extension was agreed)")
        if bool(masked) != self.masked:
            raise WebSocketError("frame masking is wrong for this side")
        offset = 2
        if size == 126:
            if len(buf) < 4:
                return None
            size, offset = struct.unpack_from("!H", buf, 2)[0], 4
        elif size == 127:
            if len(buf) < 10:
                return None
            size, offset = struct.unpack_from("!Q", buf, 2)[0], 10
        control = opcode >= Opcode.CLOSE
        if control and (size > MAX_CONTROL or not fin):
            raise WebSocketError("bad control frame")
        if opcode not in Opcode.__members__.values():
            raise WebSocketError(f"unknown opcode {opcode}")
        if not control and self._size + size > self.max_message:
            raise WebSocketError(f"message larger than {self.max_message} bytes")
        mask = b""
        if masked:
            if len(buf) < offset + 4:
                return None
            mask, offset = bytes(buf[offset : offset + 4]), offset + 4
        if len(buf) < offset + size:
            return None
        payload = bytes(buf[offset : offset + size])
        del buf[: offset + size]
        if mask:
            payload = _masked(payload, mask)
        return self._frame(Opcode(opcode), bool(fin), payload)

    def _frame(self, opcode: Opcode, fin: bool, payload: bytes) -> Event | object:
        if opcode is Opcode.PING:
            return Ping(payload)
        if opcode is Opcode.PONG:
            return Pong(payload)
        if opcode is Opcode.CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else CloseCode.NORMAL
            return Closed(code, payload[2:].decode(errors="replace"))
        if opcode is Opcode.TEXT:
            raise WebSocketError("text messages are not natter's")
        if (opcode is Opcode.CONTINUATION) != bool(self._parts):
            raise WebSocketError("continuation out of place")
        self._parts.append(payload)
        self._size += len(payload)
        if not fin:
            return _NOTHING
        message = b"".join(self._parts)
        self._parts, self._size = [], 0
        return Message(message)


_NOTHING = object()  # a frame that completes no event (a message's first part)
