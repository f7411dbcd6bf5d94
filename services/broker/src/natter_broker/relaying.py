"""The broker's relay: forwards the QUIC packets of pairs it introduced when no direct path
answers. Within one replica a packet goes straight to the other peer; across replicas it
goes to the replica that peer talks to (its NAT only answers that one): over the relay
mesh where the fleet has one (mesh.py), else over Redis pub/sub.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from natter_proto.bus import RELAY_BATCH, RelayBatch, RelayItem
from natter_proto.endpoints import Endpoint
from natter_proto.mesh import MeshPacket
from natter_proto.relay import (
    RelayFrameError,
    RelaySession,
    RelayTable,
    decode_relay,
    encode_relay,
    session_key,
)

from .mesh import Mesh
from .metrics import BrokerMetrics
from .registry import Registry

log = structlog.get_logger("natter.relay")


Heard = dict[str, tuple[Endpoint, float]]


class Relayer:
    def __init__(
        self,
        broker_id: str,
        table: RelayTable,
        heard: Heard,
        sendto: Callable[[bytes, Endpoint], None],
        registry: Registry,
        metrics: BrokerMetrics,
    ) -> None:
        self.broker_id = broker_id
        self.table = table
        self.heard = heard  # the broker's own map: agents this replica serves
        self.sendto = sendto
        self.registry = registry
        self.metrics = metrics
        self._by_addr: dict[Endpoint, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # packets for other replicas, gathered over one event-loop turn and published together
        self._outgoing: dict[str, list[RelayItem]] = {}
        self._flush_scheduled = False
        self.mesh: Mesh | None = None  # straight to other replicas, when the fleet has a mesh

    def allow(self, session_id: str, requester: str, target: str, replicas: tuple[str, str]) -> None:
        """Let the pair the broker just introduced use the relay; replicas: whom each talks to."""
        session = RelaySession(requester, target, time.time(), a_replica=replicas[0], b_replica=replicas[1])
        self.table.allow(session_key(session_id), session)

    def datagram(self, data: bytes, source: Endpoint) -> None:
        """A relay frame from an agent: forward it to the other party of its session."""
        try:
            key, packet = decode_relay(data)
        except RelayFrameError:
            self.metrics.dropped.labels("relay_bad_frame").inc()
            return
        sender = self._name_at(source)
        if sender is None:
            self.metrics.dropped.labels("relay_unknown_sender").inc()  # no reply: no reflection
            return
        receiver, reason = self.table.charge(key, sender, len(packet), time.time())
        if receiver is None:
            self.metrics.dropped.labels(reason).inc()
            return
        self.metrics.relayed_bytes.inc(len(packet))
        local = self.heard.get(receiver)
        if local is not None:
            self.sendto(encode_relay(key, packet), local[0])
            return
        session = self.table.get(key)
        replica = session.replica_of(receiver) if session is not None else ""
        if not replica or replica == self.broker_id:
            self.metrics.dropped.labels("relay_peer_gone").inc()
            return
        if self.mesh is not None and self.mesh.send(replica, receiver, key, packet):
            return
        self._outgoing.setdefault(replica, []).append(RelayItem(receiver, key, packet))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """One PUBLISH per replica and batch: Redis round trips, not packets, cost the most."""
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, {}
        loop = asyncio.get_running_loop()
        for replica, items in outgoing.items():
            for start in range(0, len(items), RELAY_BATCH):
                message = RelayBatch(tuple(items[start : start + RELAY_BATCH]))
                task = loop.create_task(self._publish(replica, message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _publish(self, replica: str, message: RelayBatch) -> None:
        try:
            if await self.registry.publish(replica, message) == 0:
                self.metrics.dropped.labels("relay_peer_gone").inc()
        except Exception:
            self.metrics.dropped.labels("relay_publish_failed").inc()

    def on_bus(self, batch: RelayBatch) -> None:
        """Packets another replica relayed for agents of ours (checked by bus.decode)."""
        for item in batch.items:
            self._to_local(item.to, item.key, item.packet)

    def on_mesh(self, packet: MeshPacket) -> None:
        """A packet another replica relayed over the mesh (authenticated and fresh)."""
        self._to_local(packet.to, packet.key, packet.packet)

    def _to_local(self, to: str, key: bytes, packet: bytes) -> None:
        local = self.heard.get(to)
        if local is None:
            self.metrics.dropped.labels("relay_peer_gone").inc()
            return
        self.metrics.relayed_bytes.inc(len(packet))
        self.sendto(encode_relay(key, packet), local[0])

    def _name_at(self, source: Endpoint) -> str | None:
        name = self._by_addr.get(source)
        if name is not None and self.heard.get(name, (None,))[0] == source:
            return name
        for candidate, (addr, _) in self.heard.items():  # rebuilt lazily after changes
            if addr == source:
                self._by_addr[source] = candidate
                return candidate
        return None
