"""The forwarding side of a UDP forward: a local UDP port whose every source address is a
flow to the peer's target, carried in the tunnel's DATAGRAM frames.

Replies go back to the source that opened the flow. Nothing here is reliable, as UDP
is not: a datagram the tunnel cannot carry now (too large, no tunnel yet and the flow's
queue full, a refused flow) is dropped and counted, never fragmented or truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import TYPE_CHECKING, Any

import structlog

from natter_proto import udpframes
from natter_proto.endpoints import Endpoint, format_host_port, split_host_port
from natter_proto.udpflows import Drop, Flow, FlowState, FlowTable

from .errors import cannot_listen
from .keeper import TunnelKeeper
from .links import AnyLink
from .udpdemux import say_dropped
from .udpsocket import BatchedUdpSocket

if TYPE_CHECKING:
    from .agent import Agent

log = structlog.get_logger("natter.udp")

Source = tuple[Any, ...]  # a local sender's address, as asyncio gives it


class UdpForward:
    """``local -> peer:remote`` for UDP; runs until ``close()``."""

    def __init__(self, agent: Agent, local: str, peer: str, remote: str) -> None:
        self.agent = agent
        self.peer = peer
        host, port = split_host_port(remote, default_host="localhost")
        if port == 0:
            raise ValueError(f"remote address {remote!r} needs a port")
        self.target = format_host_port(host, port)
        self._bind = split_host_port(local, default_host="127.0.0.1")
        self.local: Endpoint | None = None
        config = agent.config
        self.flows: FlowTable[Source] = FlowTable(
            config.udp_idle_timeout, config.udp_max_flows, config.udp_flow_queue
        )
        self.refusals: Counter[str] = Counter()
        self._socket: BatchedUdpSocket | None = None
        self._expiry: asyncio.Task[None] | None = None
        self.log = log.bind(peer=peer, target=f"{self.target}/udp")
        self.keeper = TunnelKeeper(agent, peer, f"{self.target}/udp", self.log, on_up=self._tunnel_up)

    # -- life -------------------------------------------------------------------------
    async def bind(self) -> None:
        host, port = self._bind
        try:
            self._socket = BatchedUdpSocket.bound(host or "127.0.0.1", port, self.from_local)
        except OSError as exc:
            raise cannot_listen(host, port, exc, "/udp") from None
        sockname = self._socket.address
        self.local = Endpoint(sockname[0], sockname[1])

    def run(self) -> None:
        self.log.info(f"forwarding {self.local}/udp -> {self.peer}:{self.target}/udp")
        self.keeper.start()
        self._expiry = asyncio.get_running_loop().create_task(self._expire())

    async def close(self) -> None:
        await self.keeper.close()
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        for flow in self.flows:
            self._end(flow)
        if self._socket is not None:
            self._socket.close()

    def _tunnel_up(self, link: AnyLink) -> None:
        """Queued datagrams leave once the tunnel is up; its listener knows no flow yet."""
        if not link.datagram_room():
            self.log.warning(f"{self.peer}'s tunnel carries no datagrams: its natter is too old for UDP")
        for flow in self.flows:
            flow.state = FlowState.OPENING
            self._flush(flow)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.flows.idle_timeout / 4))
            for flow in self.flows.expire(asyncio.get_running_loop().time()):
                self.log.debug("udp flow expired", source=str(flow.key[:2]), flow=flow.number)
                self.agent.udp.release(flow.number)

    def _end(self, flow: Flow[Source]) -> None:
        self.flows.close(flow)
        self.agent.udp.release(flow.number)

    # -- datagrams ----------------------------------------------------------------------
    def from_local(self, payload: bytes, source: Source) -> None:
        now = asyncio.get_running_loop().time()
        self.flows.datagrams_in += 1
        flow = self.flows.get(source)
        if flow is None:
            if self.flows.full:
                self._dropped(Drop.TOO_MANY_FLOWS)
                return
            flow = self.flows.open(source, now, number=self.agent.udp.allocate(self))
            assert flow is not None
            self.log.debug("udp flow opened", source=str(source[:2]), flow=flow.number)
        flow.last_seen = now
        if flow.state is FlowState.REFUSED:
            self._dropped(Drop.REFUSED)
            return
        flow.datagrams_in += 1
        link = self.keeper.link
        if link is None or not link.is_alive or flow.queue:
            if not self.flows.enqueue(flow, payload):
                self._dropped(Drop.QUEUE_FULL, counted=True)
            return
        self._send(link, flow, payload)

    def _send(self, link: AnyLink, flow: Flow[Source], payload: bytes) -> None:
        if flow.state is FlowState.OPENING:
            frame = udpframes.encode_open(flow.number, self.target, payload)
        else:
            frame = udpframes.encode_data(flow.number, payload)
        if len(frame) > link.datagram_room():
            self._dropped(
                Drop.TOO_BIG, size=len(payload), room=link.datagram_room() - (len(frame) - len(payload))
            )
            return
        if not link.send_datagram(frame):
            self._dropped(Drop.CONGESTED if link.is_alive else Drop.NO_TUNNEL)
            return
        self.flows.datagrams_out += 1

    def _flush(self, flow: Flow[Source]) -> None:
        link = self.keeper.link
        while flow.queue and link is not None and link.is_alive:
            self._send(link, flow, flow.queue.popleft())

    def from_peer(self, frame: udpframes.UdpFrame) -> None:
        flow = self.flows.by_number(frame.flow)
        if flow is None:
            return
        if frame.kind is udpframes.Kind.ACCEPTED:
            flow.state = FlowState.OPEN
        elif frame.kind is udpframes.Kind.RESET:
            flow.state = FlowState.OPENING  # the listener forgot it (expired there): open again
        elif frame.kind is udpframes.Kind.REFUSED:
            if flow.state is not FlowState.REFUSED:
                self.refusals[frame.reason] += 1
                self.log.warning("udp flow refused", source=str(flow.key[:2]), reason=frame.reason)
            flow.state = FlowState.REFUSED
            flow.queue.clear()
        elif frame.kind is udpframes.Kind.REPLY and self._socket is not None:
            flow.last_seen = asyncio.get_running_loop().time()
            if self._socket.send(frame.payload, flow.key):
                flow.datagrams_out += 1
            else:
                self._dropped(Drop.LOCAL_FULL)

    def _dropped(self, reason: Drop, *, counted: bool = False, **fields: object) -> None:
        say_dropped(self.log, self.flows, reason, counted=counted, **fields)

    def status(self) -> dict[str, object]:
        return {
            "local": f"{self.local}/udp",
            "peer": self.peer,
            "target": f"{self.target}/udp",
            "flows": len(self.flows),
            "datagrams_in": self.flows.datagrams_in,
            "datagrams_out": self.flows.datagrams_out,
            "dropped": {reason.value: count for reason, count in self.flows.dropped.items()},
            "problem": self.keeper.problem,
        }
