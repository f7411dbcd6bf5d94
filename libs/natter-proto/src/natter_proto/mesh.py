"""The replicas' relay mesh: a relayed QUIC packet for an agent of another replica goes
straight to that replica over UDP, as DERP's mesh does, instead of through Redis.

Every mesh datagram is authenticated with the fleet secret (HMAC-SHA256, truncated to 16
bytes) and numbered, so nobody without the secret can inject into the mesh and nobody can
replay a captured datagram: a receiver keeps, per sender, the highest number seen and a
window of the 64 below it (IPsec's anti-replay window). Senders number from their start
time in microseconds, so a restarted replica's numbers are above its old ones.

Layout: version (1), sender length (1), sender id, number (8), receiver name length (1),
receiver name, relay session (8), the QUIC packet, tag (16). Pure code: no socket, no
clock (the caller gives the starting number).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass, field

from .frames import valid_name
from .relay import SESSION_BYTES

VERSION = 1
TAG_BYTES = 16
WINDOW = 64
MAX_PACKET = 1500
MAX_DATAGRAM = 2 + 64 + 8 + 1 + 64 + SESSION_BYTES + MAX_PACKET + TAG_BYTES
MIN_SECRET = 16  # bytes: a fleet secret shorter than this is refused
MAX_SENDERS = 1024  # replicas remembered for anti-replay; a fleet has far fewer


class Refusal(enum.Enum):
    """Why a mesh datagram was refused (the broker counts each)."""

    MALFORMED = "mesh_bad_frame"
    BAD_TAG = "mesh_bad_tag"  # not sealed with this fleet's secret
    REPLAYED = "mesh_replayed"


class MeshError(ValueError):
    """A datagram that is not an authentic, fresh mesh datagram."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


@dataclass(frozen=True)
class MeshPacket:
    sender: str  # the replica that relayed it
    to: str  # the agent it is for, served by the receiving replica
    key: bytes  # the relay session
    packet: bytes


def _tag(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()[:TAG_BYTES]


class MeshSealer:
    """Numbers and authenticates this replica's mesh datagrams."""

    def __init__(self, secret: bytes, sender: str, first_number: int) -> None:
        if len(secret) < MIN_SECRET:
            raise ValueError(f"the fleet secret needs at least {MIN_SECRET} bytes")
        if not valid_name(sender):
            raise ValueError(f"bad replica id {sender!r}")
        self._secret = secret
        self._sender = sender.encode()
        self._number = first_number

    def seal(self, to: str, key: bytes, packet: bytes) -> bytes:
        if len(key) != SESSION_BYTES or len(packet) > MAX_PACKET or not valid_name(to):
            raise MeshError(Refusal.MALFORMED, "not a relayable packet")
        self._number += 1
        raw_to = to.encode()
        body = (
            bytes([VERSION, len(self._sender)])
            + self._sender
            + struct.pack("!Q", self._number)
            + bytes([len(raw_to)])
            + raw_to
            + key
            + packet
        )
        return body + _tag(self._secret, body)


@dataclass
class _Window:
    highest: int = 0
    seen: int = 0  # bit i: highest - i was seen


@dataclass
class MeshOpener:
    """Checks mesh datagrams: authentic, well formed, and not seen before."""

    secret: bytes
    windows: dict[str, _Window] = field(default_factory=dict)

    def open(self, data: bytes) -> MeshPacket:
        if not TAG_BYTES + 2 < len(data) <= MAX_DATAGRAM or data[0] != VERSION:
            raise MeshError(Refusal.MALFORMED, "not a mesh datagram")
        body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        if not hmac.compare_digest(tag, _tag(self.secret, body)):
            raise MeshError(Refusal.BAD_TAG, "bad tag: not from a replica of this fleet")
        try:
            size = body[1]
            sender = body[2 : 2 + size].decode("ascii")
            at = 2 + size
            (number,) = struct.unpack_from("!Q", body, at)
            to_size = body[at + 8]
            to = body[at + 9 : at + 9 + to_size].decode("ascii")
            start = at + 9 + to_size
        except (IndexError, struct.error, UnicodeDecodeError):
            raise MeshError(Refusal.MALFORMED, "malformed mesh datagram") from None
        key, packet = body[start : start + SESSION_BYTES], body[start + SESSION_BYTES :]
        if len(key) != SESSION_BYTES or not packet or not valid_name(sender) or not valid_name(to):
            raise MeshError(Refusal.MALFORMED, "malformed mesh datagram")
        self._check_fresh(sender, number)
        return MeshPacket(sender, to, key, packet)

    def _check_fresh(self, sender: str, number: int) -> None:
        window = self.windows.get(sender)
        if window is None:
            if len(self.windows) >= MAX_SENDERS:
                self.windows.pop(next(iter(self.windows)))
            window = self.windows[sender] = _Window()
        if number > window.highest:
            shift = number - window.highest
            window.seen = ((window.seen << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            window.highest = number
            return
        age = window.highest - number
        if age >= WINDOW:
            raise MeshError(Refusal.REPLAYED, "replayed or too old")
        if window.seen >> age & 1:
            raise MeshError(Refusal.REPLAYED, "replayed")
        window.seen |= 1 << age
