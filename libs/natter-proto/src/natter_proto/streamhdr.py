"""The header at the start of every tunnelled stream: where to connect, and the answer.

Layout: two bytes of big-endian length, then a msgpack map. The opener sends
``{"v": 1, "target": "host:port"}`` and may send payload right behind it; the acceptor
answers ``{"v": 1, "ok": true}`` or ``{"v": 1, "ok": false, "error": "...", "why": KIND}``
before any payload of its own. ``why`` (a ``Refusal``) lets a SOCKS forward answer with
the right code; a peer that does not send it refused for an unnamed reason.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

import msgpack

from .frames import VERSION

MAX_HEADER = 1024


class StreamHeaderError(ValueError):
    pass


@dataclass(frozen=True)
class OpenHeader:
    target: str


class Refusal(enum.Enum):
    """Why a listener did not connect a stream to its target."""

    DENIED = "denied"  # --allow-target does not allow it
    NO_HOST = "no_host"  # the name does not resolve
    REFUSED = "refused"  # the target refused the connection
    UNREACHABLE = "unreachable"  # no route to the host, or no answer in time
    NO_NETWORK = "no_network"  # no route to its network
    FAILED = "failed"  # anything else


@dataclass(frozen=True)
class ReplyHeader:
    ok: bool
    error: str = ""
    why: Refusal = Refusal.FAILED


def refusal_of_errno(code: int | None) -> Refusal:
    """The refusal a failed connect() means."""
    if code == errno.ECONNREFUSED:
        return Refusal.REFUSED
    if code == errno.ENETUNREACH:
        return Refusal.NO_NETWORK
    if code in (errno.EHOSTUNREACH, errno.ETIMEDOUT, None):
        return Refusal.UNREACHABLE
    return Refusal.FAILED


def _pack(body: dict[str, object]) -> bytes:
    payload = bytes(msgpack.packb(body, use_bin_type=True))
    if len(payload) > MAX_HEADER:
        raise StreamHeaderError("stream header too large")
    return struct.pack("!H", len(payload)) + payload


def encode_open(target: str) -> bytes:
    return _pack({"v": VERSION, "target": target})


def encode_reply(ok: bool, error: str = "", why: Refusal = Refusal.FAILED) -> bytes:
    body: dict[str, object] = {"v": VERSION, "ok": ok}
    if error:
        body["error"] = error[:400]
    if not ok:
        body["why"] = why.value
    return _pack(body)


def split_header(buffer: bytes) -> tuple[dict[str, object] | None, bytes]:
    """Return (header map, rest) once a whole header is buffered, else (None, buffer)."""
    if len(buffer) < 2:
        return None, buffer
    (size,) = struct.unpack("!H", buffer[:2])
    if size > MAX_HEADER:
        raise StreamHeaderError(f"stream header of {size} bytes exceeds {MAX_HEADER}")
    if len(buffer) < 2 + size:
        return None, buffer
    try:
        body = msgpack.unpackb(
            buffer[2 : 2 + size],
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_HEADER,
            max_bin_len=MAX_HEADER,
        )
    except Exception as exc:
        raise StreamHeaderError(f"undecodable stream header ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise StreamHeaderError("stream header has an unsupported version")
    return body, buffer[2 + size :]


def parse_open(body: dict[str, object]) -> OpenHeader:
    target = body.get("target")
    if not isinstance(target, str) or not 0 < len(target) <= 300:
        raise StreamHeaderError("stream header has no valid target")
    return OpenHeader(target)


def parse_reply(body: dict[str, object]) -> ReplyHeader:
    ok = body.get("ok")
    error = body.get("error", "")
    why = body.get("why", Refusal.FAILED.value)
    if not isinstance(ok, bool) or not isinstance(error, str):
        raise StreamHeaderError("stream reply header is malformed")
    known = {refusal.value: refusal for refusal in Refusal}
    return ReplyHeader(ok, error, known.get(why, Refusal.FAILED) if isinstance(why, str) else Refusal.FAILED)
