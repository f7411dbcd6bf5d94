"""Where a broker keeps registrations: behind one async interface, so that a fleet can
share them (Redis) while a lone broker keeps them in memory (the embedded default)."""

from __future__ import annotations

from typing import Protocol

from natter_proto.registry import PeerRecord, PeerTable


class Registry(Protocol):
    async def get(self, name: str) -> PeerRecord | None: ...
    async def put(self, record: PeerRecord) -> None: ...
    async def expire(self, now: float) -> list[str]: ...
    async def count(self) -> int: ...


class MemoryRegistry:
    def __init__(self, ttl: float) -> None:
        self.table = PeerTable(ttl)

    async def get(self, name: str) -> PeerRecord | None:
        return self.table.get(name)

    async def put(self, record: PeerRecord) -> None:
        self.table.put(record)

    async def expire(self, now: float) -> list[str]:
        return self.table.expire(now)

    async def count(self) -> int:
        return len(self.table)
