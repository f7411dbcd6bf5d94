"""Where a broker keeps registrations, behind one async interface: in memory for a lone
broker (the embedded default), in Redis for a fleet of replicas that share them.

Calls take lists so that a fleet backend can answer a whole batch of keepalives in one
Redis round trip.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from natter_proto.broker import RecentSessions
from natter_proto.bus import BusMessage
from natter_proto.endpoints import Endpoint
from natter_proto.identity import fingerprint
from natter_proto.names import NameBook
from natter_proto.registry import PeerRecord, PeerTable

from .namestore import NameStore

BusHandler = Callable[[BusMessage], Awaitable[None]]
ConnectLookup = tuple[str, str, str, str]  # peer_from, peer_to, request_id, candidate session id
ConnectFound = tuple[PeerRecord | None, PeerRecord | None, str]


class Registry(Protocol):
    """Shared peer records plus a bus to other replicas (none in memory)."""

    async def start(self, broker_id: str, on_bus_message: BusHandler) -> None: ...
    async def close(self) -> None: ...
    def is_ready(self) -> bool: ...

    async def register(self, records: Sequence[PeerRecord]) -> list[str | None]:
        """Store each record whose name is free or bound to its key (binding it if free);
        for a name bound to another key, return that key's fingerprint instead of storing."""
        ...

    async def touch(
        self, items: Sequence[tuple[str, Endpoint]], now: float, broker_id: str
    ) -> list[bool | None]:
        """Refresh each (name, public) that is registered at exactly that endpoint; None
        where the store could not say (a Redis node failing over): the caller decides."""
        ...

    async def lookup_connects(self, requests: Sequence[ConnectLookup], now: float) -> list[ConnectFound]:
        """For each request: both records and the session id (the same one on a retry)."""
        ...

    async def expire(self, now: float) -> list[str]: ...
    async def publish(self, broker_id: str, message: BusMessage) -> int:
        """Send to another replica; returns how many received it (0: it is gone)."""
        ...

    def announce_mesh(self, address: str) -> None:
        """Where the other replicas reach this one's relay mesh (with its liveness)."""
        ...

    async def mesh_address(self, broker_id: str) -> str | None:
        """Another replica's mesh address, if it announced one."""
        ...


class MemoryRegistry:
    """The embedded default: records in memory, name bindings in ``names`` (kept on disk by
    ``store`` when the broker has a state directory)."""

    def __init__(self, ttl: float, names: NameBook | None = None, store: NameStore | None = None) -> None:
        self.table = PeerTable(ttl)
        self.sessions = RecentSessions()
        self.names = names or NameBook()
        self.store = store
        if store is not None:
            self.names.load(store.load(), time.time())

    async def start(self, broker_id: str, on_bus_message: BusHandler) -> None:
        return None

    async def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def is_ready(self) -> bool:
        return True

    async def register(self, records: Sequence[PeerRecord]) -> list[str | None]:
        results: list[str | None] = []
        now = time.time()
        for record in records:
            held, changed = self.names.claim(record.name, fingerprint(record.public_key or b""), now)
            if held is not None:
                results.append(held.fingerprint)
                continue
            if changed is not None and self.store is not None:
                self.store.save(changed)
            self.table.put(record)
            results.append(None)
        return results

    async def touch(
        self, items: Sequence[tuple[str, Endpoint]], now: float, broker_id: str
    ) -> list[bool | None]:
        results: list[bool | None] = []
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
        lapsed = self.names.expire(time.time())
        if self.store is not None:
            self.store.forget(lapsed)
        return self.table.expire(now)

    async def publish(self, broker_id: str, message: BusMessage) -> int:
        return 0

    def announce_mesh(self, address: str) -> None:
        pass  # alone: no other replica to relay to

    async def mesh_address(self, broker_id: str) -> str | None:
        return None
