"""Where a tunnel's DATAGRAM frames go: OPEN and DATA to this agent's UDP listener (if it
listens), the rest to the UDP forward whose flow number they carry.

The agent owns one of these; the forwards register their flows in it, the listener plugs
itself in. Anything malformed, or for no flow of ours, is dropped and counted.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from natter_proto import udpframes
from natter_proto.udpflows import Drop, FlowTable, worth_saying

from .links import AnyLink

if TYPE_CHECKING:
    from .udpforward import UdpForward

log = structlog.get_logger("natter.udp")

MAX_FLOW_NUMBER = 0xFFFFFFFF


class FrameSink(Protocol):
    def from_peer(self, link: AnyLink, frame: udpframes.UdpFrame) -> None: ...


class UdpDemux:
    """Flow numbers of this agent's UDP forwards, and the listener that takes the rest."""

    def __init__(self) -> None:
        self.listener: FrameSink | None = None
        self.dropped: Counter[str] = Counter()
        self._by_number: dict[int, UdpForward] = {}
        self._next = 1

    def allocate(self, forward: UdpForward) -> int:
        """A flow number unique in this agent (so a reply names one flow of one forward)."""
        while self._next in self._by_number:
            self._next = self._next % MAX_FLOW_NUMBER + 1
        number, self._next = self._next, self._next % MAX_FLOW_NUMBER + 1
        self._by_number[number] = forward
        return number

    def release(self, number: int) -> None:
        self._by_number.pop(number, None)

    def received(self, link: AnyLink, data: bytes) -> None:
        try:
            frame = udpframes.decode(data)
        except udpframes.UdpFrameError as exc:
            self._drop("dropped_udp_malformed", link, str(exc))
            return
        if frame.kind in udpframes.TO_LISTENER:
            if self.listener is None:
                self._drop("dropped_udp_not_listening", link, "a UDP flow for an agent that does not listen")
                link.send_datagram(udpframes.encode_refused(frame.flow, f"{link.peer} is not listening"))
                return
            self.listener.from_peer(link, frame)
            return
        forward = self._by_number.get(frame.flow)
        if forward is None or forward.peer != link.peer:
            self._drop("dropped_udp_unknown_flow", link, f"{frame.kind.name} for no flow of ours")
            return
        forward.from_peer(frame)

    def _drop(self, counter: str, link: AnyLink, why: str) -> None:
        self.dropped[counter] += 1
        if worth_saying(self.dropped[counter]):
            log.info("udp datagram dropped", peer=link.peer, reason=why, dropped=self.dropped[counter])


def say_dropped(
    logger: Any, flows: FlowTable[Any], reason: Drop, *, counted: bool = False, **fields: object
) -> None:
    """Count a UDP forward's dropped datagram (unless its flow table already did) and say
    so on the first and every LOG_EVERY-th time, on either side of the tunnel."""
    count = flows.dropped[reason] if counted else flows.drop(reason)
    if worth_saying(count):
        logger.warning("udp datagram dropped", reason=reason.value, dropped=count, **fields)
