"""The relay mesh's socket: relayed packets for agents of another replica go straight to
that replica over UDP (authenticated with the fleet secret), Redis carrying control only.

A replica announces its mesh address in Redis with its liveness; the others look it up
once and keep it a while. Until an address is known (or with no fleet secret) packets
take Redis pub/sub as before, so a fleet upgrades one replica at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import structlog

from natter_proto.endpoints import AddressError, Endpoint, endpoint, split_host_port
from natter_proto.mesh import MeshError, MeshOpener, MeshPacket, MeshSealer, Refusal

from .metrics import BrokerMetrics
from .udp import BrokerSocket

log = structlog.get_logger("natter.mesh")

ADDRESS_TTL = 10.0  # seconds a looked-up mesh address is used before asking again
LookUp = Callable[[str], Awaitable[str | None]]


class Mesh:
    def __init__(
        self,
        broker_id: str,
        secret: bytes,
        look_up: LookUp,
        deliver: Callable[[MeshPacket], None],
        metrics: BrokerMetrics,
    ) -> None:
        self._sealer = MeshSealer(secret, broker_id, first_number=time.time_ns() // 1000)
        self._opener = MeshOpener(secret)
        self._look_up = look_up
        self._deliver = deliver
        self.metrics = metrics
        self._socket = BrokerSocket(self._received)
        self._addresses: dict[str, tuple[Endpoint | None, float]] = {}
        self._asking: set[str] = set()
        self.refused: Counter[Refusal] = Counter()  # datagrams refused, by why (for the log's pace)
        self.address: Endpoint | None = None

    def bind(self, listen: str) -> Endpoint:
        host, port = split_host_port(listen, default_host="0.0.0.0")
        bound = self._socket.bind(host, port)
        self.address = Endpoint(bound[0], bound[1])
        return self.address

    def close(self) -> None:
        self._socket.close()

    def send(self, replica: str, to: str, key: bytes, packet: bytes) -> bool:
        """Relay straight to ``replica``; False if its mesh address is not known (yet)."""
        address = self._address_of(replica)
        if address is None:
            return False
        try:
            datagram = self._sealer.seal(to, key, packet)
        except MeshError:
            return False
        self._socket.sendto(datagram, (address.host, address.port))
        self.metrics.mesh_packets.labels("sent").inc()
        return True

    def _address_of(self, replica: str) -> Endpoint | None:
        known = self._addresses.get(replica)
        now = time.monotonic()
        if known is not None and now - known[1] < ADDRESS_TTL:
            return known[0]
        if replica not in self._asking:
            self._asking.add(replica)
            asyncio.get_running_loop().create_task(self._refresh(replica))
        return known[0] if known is not None else None

    async def _refresh(self, replica: str) -> None:
        try:
            text = await self._look_up(replica)
            address = None
            if text:
                host, port = split_host_port(text)
                address = endpoint(host, port)
            self._addresses[replica] = (address, time.monotonic())
        except (AddressError, ValueError) as exc:
            log.warning("bad mesh address in Redis", replica=replica, error=str(exc))
            self._addresses[replica] = (None, time.monotonic())
        except Exception as exc:  # Redis down: pub/sub fails the same way; try again later
            log.debug("mesh address lookup failed", replica=replica, error=str(exc))
        finally:
            self._asking.discard(replica)

    def _received(self, data: bytes, host: str, port: int) -> None:
        try:
            packet = self._opener.open(data)
        except MeshError as exc:
            self.metrics.dropped.labels(exc.refusal.value).inc()
            self.refused[exc.refusal] += 1  # counted here too: the registry's sample walks every metric
            if self.refused[exc.refusal] % 1000 == 1:
                log.warning("mesh datagram refused", source=f"{host}:{port}", reason=str(exc))
            return
        self.metrics.mesh_packets.labels("received").inc()
        self._deliver(packet)
