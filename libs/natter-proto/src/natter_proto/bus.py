"""What broker replicas say to each other over Redis pub/sub, as typed messages.

Three kinds: ``Introduce`` (the replica an agent talks to asks the replica that owns the
target to send the target its frames), ``Ack`` (done: now the requester gets its punch
instruction) and ``RelayBatch`` (relayed QUIC packets for agents of the receiving replica).
The wire form is a msgpack map with a ``kind`` key, as before these types existed, so
replicas of both versions understand each other. Every field is bounded and checked:
a message from Redis is input like any datagram.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .endpoints import AddressError, Endpoint, endpoint
from .frames import MAX_FRAME_SIZE, valid_name
from .relay import SESSION_BYTES

MAX_BUS_MESSAGE = 64 * 1024  # a batch of relayed packets at most
MAX_INTRO_FRAMES = 4
RELAY_BATCH = 40  # packets per message (about 60 KB)
MAX_RELAYED_PACKET = 1500
MAX_ID = 64


class BusError(ValueError):
    """A bus message that is not one of ours, or breaks a bound."""


@dataclass(frozen=True)
class Introduce:
    origin: str  # the replica that waits for the ack
    requester: str
    request_id: str
    to: Endpoint  # the target's public endpoint, as its replica knows it
    frames: tuple[bytes, ...]  # encoded control frames for the target
    session: str
    target: str

    KIND = "introduce"


@dataclass(frozen=True)
class Ack:
    requester: str
    request_id: str

    KIND = "ack"


@dataclass(frozen=True)
class RelayItem:
    to: str  # the receiving agent's name
    key: bytes  # the relay session
    packet: bytes


@dataclass(frozen=True)
class RelayBatch:
    items: tuple[RelayItem, ...]

    KIND = "relay"


BusMessage = Introduce | Ack | RelayBatch


def encode(message: BusMessage) -> bytes:
    body: dict[str, Any]
    if isinstance(message, Introduce):
        body = {
            "kind": Introduce.KIND,
            "origin": message.origin,
            "requester": message.requester,
            "request_id": message.request_id,
            "to": [message.to.host, message.to.port],
            "frames": list(message.frames),
            "session": message.session,
            "target": message.target,
        }
    elif isinstance(message, Ack):
        body = {"kind": Ack.KIND, "requester": message.requester, "request_id": message.request_id}
    else:
        body = {"kind": RelayBatch.KIND, "items": [[i.to, i.key, i.packet] for i in message.items]}
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def decode(data: bytes) -> BusMessage:
    if not isinstance(data, bytes) or len(data) > MAX_BUS_MESSAGE:
        raise BusError("not a bus message, or too large")
    try:
        body = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_array_len=RELAY_BATCH, max_map_len=16
        )
    except Exception as exc:
        raise BusError(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise BusError("not a map")
    kind = body.get("kind")
    if kind == Introduce.KIND:
        return _introduce(body)
    if kind == Ack.KIND:
        return Ack(_name(body, "requester"), _text(body, "request_id"))
    if kind == RelayBatch.KIND:
        return RelayBatch(tuple(_relay_item(item) for item in _list(body, "items", RELAY_BATCH)))
    raise BusError(f"unknown kind {str(kind)[:16]!r}")


def _introduce(body: dict[str, Any]) -> Introduce:
    to = _list(body, "to", 2)
    try:
        addr = endpoint(str(to[0]), int(to[1])) if len(to) == 2 else None
    except (AddressError, ValueError, TypeError):
        addr = None
    if addr is None:
        raise BusError("introduce: bad target endpoint")
    datagrams = _list(body, "frames", MAX_INTRO_FRAMES)
    if not all(isinstance(d, bytes) and 0 < len(d) <= MAX_FRAME_SIZE for d in datagrams):
        raise BusError("introduce: bad frames")
    return Introduce(
        _text(body, "origin"),
        _name(body, "requester"),
        _text(body, "request_id"),
        addr,
        tuple(datagrams),
        _text(body, "session"),
        _name(body, "target"),
    )


def _relay_item(item: object) -> RelayItem:
    if not (isinstance(item, list) and len(item) == 3):
        raise BusError("relay: bad item")
    to, key, packet = item
    if not (isinstance(to, str) and valid_name(to) and isinstance(key, bytes) and isinstance(packet, bytes)):
        raise BusError("relay: bad item")
    if len(key) != SESSION_BYTES or not 0 < len(packet) <= MAX_RELAYED_PACKET:
        raise BusError("relay: bad key or packet size")
    return RelayItem(to, key, packet)


def _list(body: dict[str, Any], name: str, limit: int) -> list[Any]:
    value = body.get(name)
    if not isinstance(value, list) or len(value) > limit:
        raise BusError(f"{name}: not a list of at most {limit}")
    return value


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise BusError(f"{name}: not a short string")
    return value


def _name(body: dict[str, Any], name: str) -> str:
    value = _text(body, name)
    if not valid_name(value):
        raise BusError(f"{name}: not a valid agent name")
    return value
