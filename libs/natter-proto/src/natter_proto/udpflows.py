"""The flows of a UDP forward, as conntrack keeps them: created by the first datagram,
gone after an idle time. Pure bookkeeping, the same on both sides: the forwarding side
keys flows by the local source address, the listener by (tunnel, flow number).
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

DEFAULT_IDLE_TIMEOUT = 60.0  # seconds without a datagram either way, as conntrack's UDP stream
DEFAULT_MAX_FLOWS = 4096  # per forward (or per listener): a flood of sources cannot grow it
DEFAULT_QUEUE = 64  # datagrams a flow holds while its tunnel comes up
LOG_EVERY = 100  # a drop reason is worth a log line on its first time and every hundredth after

K = TypeVar("K", bound=Hashable)


def worth_saying(count: int) -> bool:
    """Whether the count-th drop of one reason deserves a log line (the first, then one in
    LOG_EVERY): a flood is said, not echoed."""
    return count % LOG_EVERY == 1


class Drop(enum.Enum):
    """Why a datagram was not delivered (status counts each)."""

    TOO_BIG = "too_big"  # larger than the tunnel's DATAGRAM frames carry
    QUEUE_FULL = "queue_full"  # the flow's queue was full
    TOO_MANY_FLOWS = "too_many_flows"
    REFUSED = "refused"  # the listener refused the flow
    MALFORMED = "malformed"
    UNKNOWN_FLOW = "unknown_flow"
    NO_TUNNEL = "no_tunnel"
    CONGESTED = "congested"  # the tunnel's congestion control had no room for it
    LOCAL_FULL = "local_full"  # the local socket's send buffer was full


class FlowState(enum.Enum):
    OPENING = "opening"  # sent OPEN, no answer yet
    OPEN = "open"
    REFUSED = "refused"


@dataclass
class Flow(Generic[K]):
    key: K
    number: int
    last_seen: float
    state: FlowState = FlowState.OPENING
    datagrams_in: int = 0
    datagrams_out: int = 0
    queue: deque[bytes] = field(default_factory=deque)


class FlowTable(Generic[K]):
    def __init__(
        self,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_flows: int = DEFAULT_MAX_FLOWS,
        queue_limit: int = DEFAULT_QUEUE,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.queue_limit = queue_limit
        self.dropped: Counter[Drop] = Counter()
        self.datagrams_in = 0  # from the local side (forwarding) or the peer (listening)
        self.datagrams_out = 0
        self._flows: dict[K, Flow[K]] = {}
        self._by_number: dict[int, Flow[K]] = {}
        self._next_number = 1

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow[K]]:
        return iter(list(self._flows.values()))

    @property
    def full(self) -> bool:
        return len(self._flows) >= self.max_flows

    def get(self, key: K) -> Flow[K] | None:
        return self._flows.get(key)

    def by_number(self, number: int) -> Flow[K] | None:
        return self._by_number.get(number)

    def open(self, key: K, now: float, number: int | None = None) -> Flow[K] | None:
        """The key's flow, created if new (None: the table is full, counted)."""
        flow = self._flows.get(key)
        if flow is not None:
            flow.last_seen = now
            return flow
        if len(self._flows) >= self.max_flows:
            self.drop(Drop.TOO_MANY_FLOWS)
            return None
        if number is None:
            number = self._next_number
            self._next_number = self._next_number % 0xFFFFFFFF + 1
        flow = Flow(key, number, now)
        self._flows[key] = flow
        self._by_number[number] = flow
        return flow

    def enqueue(self, flow: Flow[K], payload: bytes) -> bool:
        """Hold a datagram until the flow can send; a full queue drops it (counted)."""
        if len(flow.queue) >= self.queue_limit:
            self.drop(Drop.QUEUE_FULL)
            return False
        flow.queue.append(payload)
        return True

    def drop(self, reason: Drop) -> int:
        """Count a dropped datagram; returns how many were dropped for that reason."""
        self.dropped[reason] += 1
        return self.dropped[reason]

    def close(self, flow: Flow[K]) -> None:
        self._flows.pop(flow.key, None)
        if self._by_number.get(flow.number) is flow:  # a listener's numbers are its peers'
            del self._by_number[flow.number]

    def expire(self, now: float) -> list[Flow[K]]:
        """Flows idle for the timeout, removed."""
        gone = [flow for flow in self._flows.values() if now - flow.last_seen >= self.idle_timeout]
        for flow in gone:
            self.close(flow)
        return gone

    def next_expiry(self) -> float | None:
        if not self._flows:
            return None
        return min(flow.last_seen for flow in self._flows.values()) + self.idle_timeout
