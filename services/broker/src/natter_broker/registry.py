"""Where a broker keeps registrations, behind one async interface: in memory for a lone
broker (the embedded default), in Redis for a fleet of replicas that share them.

Calls take lists so that a fleet backend can answer a whole batch of keepalives in one
Redis round trip.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from natter_proto.broker import RecentSessions
from natter_proto.bus import BusMessage
from natter_proto.endpoints import Endpoint
from natter_proto.registry import PeerRecord, PeerTable

BusHandler = Callable[[BusMessage], Awaitable[None]]
ConnectLookup = tuple[str, str, str, str]  # peer_from, peer_to, request_id, candidate session id
ConnectFound = tuple[PeerRecord | None, PeerRecord | None, str]


class Registry(Protocol):
    """Shared peer records plus a bus to other replicas (none in memory)."""

    async def start(self, broker_id: str, on_bus_message: BusHandler) -> None: ...
    async def close(self) -> None: ...
    def is_ready(self) -> bool: ...

    async def register(self, records: Sequence[PeerRecord]) -> list[bytes | None]:
        """Store each record whose name is free or bound to its key (binding it if free);
        for a name bound to another key, return that key instead of storing."""
        ...

    async def touch(self, items: Sequence[tuple[str, Endpoint]], now: float, broker_id: str) -> list[bool]:
        """Refresh each (name, public) that is registered at exactly that endpoint."""
        ...

    async def lookup_connects(self, requests: Sequence[ConnectLookup], now: float) -> list[ConnectFound]:
        """For each request: both records and the session id (the same one on a retry)."""
        ...

    async def expire(self, now: float) -> list[str]: ...
    async def publish(self, broker_id: str, message: BusMessage) -> int:
        """Send to another replica; returns how many received it (0: it is gone)."""
        ...


class MemoryRegistry:
    def __init__(self, ttl: float) -> None:
        self.table = PeerTable(ttl)
        self.sessions = RecentSessions()
        self.owners: dict[str, bytes] = {}  # name -> the key that registered it first

    async def start(self, broker_id: str, on_bus_message: BusHandler) -> None:
        return None

    async def close(self) -> None:
        return None

    def is_ready(self) -> bool:
        return True

    async def register(self, records: Sequence[PeerRecord]) -> list[bytes | None]:
        results: list[bytes | None] = []
        for record in records:
            key = record.public_key or b""
            owner = self.owners.setdefault(record.name, key)
            if owner != key:
                results.append(owner)
                continue
            self.table.put(record)
            results.append(None)
        return results

    async def touch(self, items: Sequence[tuple[str, Endpoint]], now: float, broker_id: str) -> list[bool]:
        results = []
        for name, public in items:
            record = self.table.get(name)
            ok = record is not None and record.public == public
            if ok and record is not None:
                self.table.put(record.seen(now))
            results.append(ok)
        return results

    async def lookup_connects(self, requests: Sequence[ConnectLookup], now: float) -> list[ConnectFound]:
        found = []
        for peer_from, peer_to, request_id, candidate in requests:
            session = self.sessions.session_for(peer_from, request_id, now, candidate)
            found.append((self.table.get(peer_from), self.table.get(peer_to), session))
        return found

    async def expire(self, now: float) -> list[str]:
        return self.table.expire(now)

    async def publish(self, broker_id: str, message: BusMessage) -> int:
        return 0
