"""The broker's view of registered agents, with expiry of silent ones (pure, time passed in)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .endpoints import Endpoint


@dataclass(frozen=True)
class PeerRecord:
    """What the broker knows of one agent: where it was seen, what it offers, when."""

    name: str
    public: Endpoint
    locals: tuple[Endpoint, ...]
    listening: bool
    last_seen: float
    broker_id: str = ""
    public_key: bytes | None = None
    nat: str | None = None

    def seen(self, now: float) -> PeerRecord:
        return replace(self, last_seen=now)

    def expired(self, now: float, ttl: float) -> bool:
        return now - self.last_seen > ttl


class PeerTable:
    """In-memory registry: the embedded default of a single broker.

    An agent silent for ``ttl`` counts as offline (peers asking for it are told so); one
    silent for ``forget_after`` is dropped, so the table cannot grow without bound.
    """

    def __init__(self, ttl: float, forget_after: float | None = None) -> None:
        self.ttl = ttl
        self.forget_after = forget_after if forget_after is not None else ttl * 10
        self._records: dict[str, PeerRecord] = {}

    def get(self, name: str) -> PeerRecord | None:
        return self._records.get(name)

    def put(self, record: PeerRecord) -> None:
        self._records[record.name] = record

    def remove(self, name: str) -> None:
        self._records.pop(name, None)

    def expire(self, now: float) -> list[str]:
        gone = [n for n, r in self._records.items() if r.expired(now, self.forget_after)]
        for name in gone:
            del self._records[name]
        return gone

    def __len__(self) -> int:
        return len(self._records)

    def names(self) -> list[str]:
        return sorted(self._records)
