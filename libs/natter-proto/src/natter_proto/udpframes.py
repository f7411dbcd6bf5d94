"""What a UDP forward puts in a tunnel's QUIC DATAGRAM frames (RFC 9221).

Every datagram names its flow (one local source address on the forwarding side, one UDP
socket towards the target on the listening side). Until the listener accepted a flow, the
forwarding side sends OPEN, which also names the target: datagrams may be lost or
reordered, so each one can open its flow. Layout, after a kind byte:

- ``OPEN`` (forwarding side to listener): flow (4 bytes), target length (1), target
  (``host:port``), payload;
- ``DATA`` (forwarding side to listener): flow (4 bytes), payload;
- ``REPLY`` (listener to forwarding side): flow (4 bytes), payload;
- ``ACCEPTED``, ``RESET`` (the listener knows no such flow: open it again): flow (4 bytes);
- ``REFUSED``: flow (4 bytes), reason (UTF-8).

Flow numbers are the forwarding side's; the direction is in the kind, so that two agents
may each forward UDP to the other over one tunnel.

The kind byte is never 0: the native engine's pings are one zero byte.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

MAX_TARGET = 255
MAX_REASON = 200
FLOW_HEADER = 5  # kind and flow
_FLOW = struct.Struct("!BI")


class UdpFrameError(ValueError):
    """A datagram no UDP forward sent."""


class Kind(enum.IntEnum):
    OPEN = 0x21
    DATA = 0x22
    ACCEPTED = 0x23
    REFUSED = 0x24
    REPLY = 0x25
    RESET = 0x26


@dataclass(frozen=True)
class UdpFrame:
    kind: Kind
    flow: int
    payload: bytes = b""
    target: str = ""  # OPEN only
    reason: str = ""  # REFUSED only


TO_LISTENER = frozenset({Kind.OPEN, Kind.DATA})  # the rest go to the forwarding side


def overhead(target: str) -> int:
    """Bytes an OPEN frame adds to its payload (DATA adds ``FLOW_HEADER``)."""
    return FLOW_HEADER + 1 + len(target.encode())


def encode_open(flow: int, target: str, payload: bytes) -> bytes:
    raw = target.encode()
    if not 0 < len(raw) <= MAX_TARGET:
        raise UdpFrameError(f"target {target!r} does not fit an OPEN frame")
    return _FLOW.pack(Kind.OPEN, flow) + bytes([len(raw)]) + raw + payload


def encode_data(flow: int, payload: bytes) -> bytes:
    return _FLOW.pack(Kind.DATA, flow) + payload


def encode_reply(flow: int, payload: bytes) -> bytes:
    return _FLOW.pack(Kind.REPLY, flow) + payload


def encode_accepted(flow: int) -> bytes:
    return _FLOW.pack(Kind.ACCEPTED, flow)


def encode_reset(flow: int) -> bytes:
    return _FLOW.pack(Kind.RESET, flow)


def encode_refused(flow: int, reason: str) -> bytes:
    return _FLOW.pack(Kind.REFUSED, flow) + reason.encode()[:MAX_REASON]


def decode(data: bytes) -> UdpFrame:
    if len(data) < FLOW_HEADER:
        raise UdpFrameError(f"UDP frame of {len(data)} bytes")
    kind_byte, flow = _FLOW.unpack_from(data)
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise UdpFrameError(f"unknown UDP frame kind 0x{kind_byte:02x}") from None
    body = data[FLOW_HEADER:]
    if kind in (Kind.DATA, Kind.REPLY):
        return UdpFrame(kind, flow, body)
    if kind in (Kind.ACCEPTED, Kind.RESET):
        if body:
            raise UdpFrameError(f"{kind.name} frame with a body")
        return UdpFrame(kind, flow)
    if kind is Kind.REFUSED:
        if len(body) > MAX_REASON:
            raise UdpFrameError("REFUSED frame with a reason too long")
        return UdpFrame(kind, flow, reason=body.decode(errors="replace"))
    if not body or not 0 < body[0] <= len(body) - 1:
        raise UdpFrameError("OPEN frame without a whole target")
    size = body[0]
    try:
        target = body[1 : 1 + size].decode("ascii")
    except UnicodeDecodeError:
        raise UdpFrameError("OPEN frame with a target that is not ASCII") from None
    return UdpFrame(kind, flow, body[1 + size :], target=target)
