"""Relay: when no direct path answers, the agents' QUIC packets go through the broker.

A relay frame is binary, for speed: one prefix byte (below 0x40, so never QUIC, and not
the control-frame prefix), the 8-byte session id the broker gave both peers, then the
QUIC packet as it is. The relay sees only ciphertext; the peers' end-to-end TLS with
pinned keys is unchanged.

The broker relays only for pairs it introduced, within per-session byte and time limits.
"""

from __future__ import annotations

from dataclasses import dataclass

RELAY_PREFIX = 0x1F
SESSION_BYTES = 8
MAX_RELAY_FRAME = 1 + SESSION_BYTES + 1500


class RelayFrameError(ValueError):
    pass


def session_key(session_id: str) -> bytes:
    """The 8 raw bytes of a 16-hex-digit session id."""
    try:
        raw = bytes.fromhex(session_id)
    except ValueError:
        raise RelayFrameError("session id is not hex") from None
    if len(raw) != SESSION_BYTES:
        raise RelayFrameError("session id must be 8 bytes")
    return raw


def encode_relay(session: bytes, packet: bytes) -> bytes:
    return bytes([RELAY_PREFIX]) + session + packet


def decode_relay(data: bytes) -> tuple[bytes, bytes]:
    """(session key, packet); RelayFrameError for anything that is not a relay frame."""
    if len(data) > MAX_RELAY_FRAME or len(data) <= 1 + SESSION_BYTES or data[0] != RELAY_PREFIX:
        raise RelayFrameError("not a relay frame")
    return data[1 : 1 + SESSION_BYTES], data[1 + SESSION_BYTES :]


@dataclass
class RelaySession:
    """One introduced pair that may use the relay."""

    a: str  # the requester
    b: str  # the target
    created: float
    bytes_relayed: int = 0
    a_replica: str = ""
    b_replica: str = ""

    def other(self, name: str) -> str | None:
        if name == self.a:
            return self.b
        if name == self.b:
            return self.a
        return None

    def replica_of(self, name: str) -> str:
        return self.a_replica if name == self.a else self.b_replica


class RelayTable:
    """Sessions a broker may relay for, with limits; bounded and expiring (time passed in)."""

    def __init__(self, max_bytes: int, max_seconds: float, capacity: int = 100_000) -> None:
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.capacity = capacity
        self._sessions: dict[bytes, RelaySession] = {}

    def allow(self, key: bytes, session: RelaySession) -> None:
        if key not in self._sessions and len(self._sessions) >= self.capacity:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].created)
            del self._sessions[oldest]
        self._sessions.setdefault(key, session)

    def charge(self, key: bytes, sender: str, size: int, now: float) -> tuple[str | None, str]:
        """Who receives this packet (None: drop it) and, if dropped, why."""
        session = self._sessions.get(key)
        if session is None:
            return None, "relay_unknown_session"
        if now - session.created > self.max_seconds:
            del self._sessions[key]
            return None, "relay_expired"
        receiver = session.other(sender)
        if receiver is None:
            return None, "relay_not_a_party"
        if session.bytes_relayed + size > self.max_bytes:
            return None, "relay_byte_limit"
        session.bytes_relayed += size
        return receiver, ""

    def get(self, key: bytes) -> RelaySession | None:
        return self._sessions.get(key)

    def expire(self, now: float) -> int:
        gone = [k for k, s in self._sessions.items() if now - s.created > self.max_seconds]
        for key in gone:
            del self._sessions[key]
        return len(gone)

    def __len__(self) -> int:
        return len(self._sessions)
