"""Introductions across replicas: the replica an agent talks to asks the replica that owns
the target (its NAT answers only that replica's address) to send the target its frames,
and sends the requester its punch instruction once that replica acks. Typed messages on
the bus (``natter_proto.bus``); what waits for an ack is bounded in time."""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import structlog

from natter_proto import frames
from natter_proto.broker import Introduction
from natter_proto.bus import Ack, BusMessage, Introduce, RelayBatch
from natter_proto.endpoints import Endpoint
from natter_proto.frames import Error, ErrorCode

from .metrics import BrokerMetrics
from .registry import Registry
from .relaying import Relayer

PENDING_TTL = 15.0  # an introduction whose ack has not come by then is forgotten


class ReplicaIntroductions:
    def __init__(
        self,
        broker_id: str,
        registry: Registry,
        relayer: Relayer,
        metrics: BrokerMetrics,
        sendto: Callable[[bytes, Endpoint], None],
    ) -> None:
        self.broker_id = broker_id
        self.registry = registry
        self.relayer = relayer
        self.metrics = metrics
        self.sendto = sendto
        self._awaiting: OrderedDict[tuple[str, str], tuple[bytes, Endpoint, float]] = OrderedDict()
        self._log = structlog.get_logger("natter.broker").bind(broker_id=broker_id)

    async def introduce(self, intro: Introduction, owner: str, request_id: str, rlog: Any) -> None:
        """Ask replica ``owner`` to introduce the target; the requester waits for its ack."""
        key = (intro.requester.name, request_id)
        self._awaiting[key] = (frames.encode(intro.to_requester), intro.requester.public, time.time())
        message = Introduce(
            self.broker_id,
            intro.requester.name,
            request_id,
            intro.target.public,
            tuple(frames.encode(m) for m in intro.to_target),
            intro.session_id,
            intro.target.name,
        )
        if await self.registry.publish(owner, message) == 0:
            self._awaiting.pop(key, None)
            self.metrics.connects.labels(ErrorCode.PEER_UNREACHABLE).inc()
            text = (
                f"peer {intro.target.name!r} is registered with broker replica {owner}, which is gone; "
                "it will re-register with another replica shortly"
            )
            rlog.warning("connect: owner replica gone", owner=owner)
            self.sendto(
                frames.encode(Error(ErrorCode.PEER_UNREACHABLE, text, request_id)), intro.requester.public
            )
            return
        rlog.info("connect relayed to owner replica", owner=owner, session=intro.session_id)

    async def on_bus(self, message: BusMessage) -> None:
        if isinstance(message, RelayBatch):
            self.relayer.on_bus(message)
        elif isinstance(message, Introduce):
            await self._on_introduce(message)
        else:
            self._on_ack(message)

    def expire(self, now: float) -> None:
        while self._awaiting and now - next(iter(self._awaiting.values()))[2] > PENDING_TTL:
            self._awaiting.popitem(last=False)

    async def _on_introduce(self, message: Introduce) -> None:
        for data in message.frames:
            self.sendto(data, message.to)
        with contextlib.suppress(ValueError):
            self.relayer.allow(
                message.session, message.requester, message.target, (message.origin, self.broker_id)
            )
        self.metrics.punches.inc()
        self._log.info(
            "introduced on behalf of replica", origin=message.origin, request_id=message.request_id
        )
        with contextlib.suppress(Exception):
            await self.registry.publish(message.origin, Ack(message.requester, message.request_id))

    def _on_ack(self, message: Ack) -> None:
        pending = self._awaiting.pop((message.requester, message.request_id), None)
        if pending is not None:
            data, addr, _ = pending
            self.sendto(data, addr)
            self.metrics.punches.inc()
            self.metrics.connects.labels("introduced").inc()
            self._log.info(
                "connect introduced across replicas",
                request_id=message.request_id,
                peer_from=message.requester,
            )
