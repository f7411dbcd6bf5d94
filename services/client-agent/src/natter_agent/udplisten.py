"""The listening side of UDP forwards: each flow a peer opens gets one UDP socket towards
its target (if ``--allow-target`` allows it, ``/udp`` rules), and the target's replies go
back to that flow. Flows expire after the same idle time as on the forwarding side.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from typing import TYPE_CHECKING

import structlog

from natter_proto import udpframes
from natter_proto.endpoints import split_host_port
from natter_proto.udpflows import Drop, Flow, FlowState, FlowTable

from .links import AnyLink
from .udpdemux import say_dropped
from .udpsocket import BatchedUdpSocket

if TYPE_CHECKING:
    from .forward import Listener

log = structlog.get_logger("natter.udp")

FlowKey = tuple[int, int]  # (tunnel, the forwarding side's flow number)


class UdpListener:
    def __init__(self, listener: Listener, *, idle_timeout: float, queue_limit: int, max_flows: int) -> None:
        self.listener = listener  # its ACL and resolution, with /udp rules
        self.flows: FlowTable[FlowKey] = FlowTable(idle_timeout, max_flows, queue_limit)
        self.refused: Counter[str] = Counter()
        self._sockets: dict[FlowKey, BatchedUdpSocket] = {}
        self._links: dict[FlowKey, AnyLink] = {}
        self._reasons: dict[FlowKey, str] = {}
        self._expiry: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._expiry = asyncio.get_running_loop().create_task(self._expire())

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        for flow in self.flows:
            self._end(flow)

    def from_peer(self, link: AnyLink, frame: udpframes.UdpFrame) -> None:
        key = (link.tunnel, frame.flow)
        now = asyncio.get_running_loop().time()
        self.flows.datagrams_in += 1
        flow = self.flows.get(key)
        if flow is None:
            if frame.kind is not udpframes.Kind.OPEN:
                self.flows.drop(Drop.UNKNOWN_FLOW)
                link.send_datagram(udpframes.encode_reset(frame.flow))
                return
            flow = self.flows.open(key, now, number=frame.flow)
            if flow is None:
                link.send_datagram(udpframes.encode_refused(frame.flow, "too many UDP flows at the listener"))
                return
            self._links[key] = link
            asyncio.get_running_loop().create_task(self._open(link, flow, frame.target))
        flow.last_seen = now
        flow.datagrams_in += 1
        target = self._sockets.get(key)
        if flow.state is FlowState.REFUSED:
            if frame.kind is udpframes.Kind.OPEN:  # the refusal may have been lost: again
                link.send_datagram(udpframes.encode_refused(frame.flow, self._reasons.get(key, "refused")))
            return
        if target is None:  # still resolving and checking: hold a few
            self.flows.enqueue(flow, frame.payload)
            return
        if frame.kind is udpframes.Kind.OPEN:
            link.send_datagram(udpframes.encode_accepted(frame.flow))  # the first was lost
        if (frame.payload or frame.kind is udpframes.Kind.DATA) and not target.send(frame.payload):
            self.flows.drop(Drop.LOCAL_FULL)

    async def _open(self, link: AnyLink, flow: Flow[FlowKey], target: str) -> None:
        try:
            host, port = split_host_port(target, default_host="localhost")
        except ValueError:
            self._refuse(link, flow, target, f"bad target {target!r}")
            return
        addresses, refusal, _why = await self.listener.resolve_allowed(host, port, socket.SOCK_DGRAM)
        if self.flows.get(flow.key) is not flow:
            return  # expired or closed meanwhile
        if not addresses:
            self._refuse(link, flow, target, refusal)
            return
        try:
            sock = BatchedUdpSocket.connected(
                addresses[0], port, lambda data, _addr: self.reply(link, flow, data)
            )
        except OSError as exc:
            self._refuse(link, flow, target, f"cannot open a UDP socket to {target}: {exc.strerror or exc}")
            return
        self._sockets[flow.key] = sock
        flow.state = FlowState.OPEN
        log.debug("udp flow opened", peer=link.peer, target=target, flow=flow.number)
        link.send_datagram(udpframes.encode_accepted(flow.number))
        while flow.queue:
            sock.send(flow.queue.popleft())

    def _refuse(self, link: AnyLink, flow: Flow[FlowKey], target: str, reason: str) -> None:
        flow.state = FlowState.REFUSED
        flow.queue.clear()
        self._reasons[flow.key] = reason
        self.refused[reason] += 1
        log.warning("refused udp flow", peer=link.peer, target=f"{target}/udp", reason=reason)
        link.send_datagram(udpframes.encode_refused(flow.number, reason))

    def reply(self, link: AnyLink, flow: Flow[FlowKey], payload: bytes) -> None:
        """A datagram from the target: back to the flow, if the tunnel carries it."""
        flow.last_seen = asyncio.get_running_loop().time()
        frame = udpframes.encode_reply(flow.number, payload)
        if len(frame) > link.datagram_room():
            say_dropped(log.bind(peer=link.peer), self.flows, Drop.TOO_BIG, size=len(payload))
            return
        if link.send_datagram(frame):
            flow.datagrams_out += 1
            self.flows.datagrams_out += 1
        else:
            self.flows.drop(Drop.CONGESTED if link.is_alive else Drop.NO_TUNNEL)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.flows.idle_timeout / 4))
            now = asyncio.get_running_loop().time()
            for flow in self.flows.expire(now):
                self._release(flow)
            for key, link in list(self._links.items()):
                orphan = self.flows.get(key)
                if not link.is_alive and orphan is not None:
                    self._end(orphan)

    def _end(self, flow: Flow[FlowKey]) -> None:
        self.flows.close(flow)
        self._release(flow)

    def _release(self, flow: Flow[FlowKey]) -> None:
        self._links.pop(flow.key, None)
        self._reasons.pop(flow.key, None)
        sock = self._sockets.pop(flow.key, None)
        if sock is not None:
            sock.close()

    def status(self) -> dict[str, object]:
        return {
            "flows": len(self.flows),
            "datagrams_in": self.flows.datagrams_in,
            "datagrams_out": self.flows.datagrams_out,
            "dropped": {reason.value: count for reason, count in self.flows.dropped.items()},
            "refused": sum(self.refused.values()),
        }
