"""Punch session: probe every candidate endpoint of the peer until one answers.

Both agents run one at the same moment (the broker tells both at once, RFC 5128 3.3).
Probes leave every ``interval`` seconds to every candidate; the first probe answer names
the winning path, which is the exact (ip, port) the answer came from. Probes from the
peer are always answered, so the peer finds its path too.

Against a symmetric ("hard") NAT on one side, the birthday method: the hard side probes
the easy side from many sockets (``sources``), opening as many mappings on its NAT, while
the easy side sprays probes at random ports of the hard side's address (``spray``), within
a budget and paced. One probe landing on one mapping is a path. Every frame carries the
index of the socket it leaves from (0: the agent's own socket).
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass

from .endpoints import Endpoint
from .frames import Message, NoTunnel, Probe, ProbeAck, Punch

MAX_ACKS_PER_SOURCE = 100  # more than a whole punch of probes from one candidate
MAX_CANDIDATES = 16
SOURCE_EVERY = 8  # extra sockets re-probe every 8th tick (about 0.6 s): mappings, not load
MAX_SOURCES = 32


class PunchState(enum.Enum):
    PROBING = "probing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class PathFound:
    """A probe answer arrived: this path works both ways."""

    path: Endpoint
    rtt: float
    source: int = 0  # which of our sockets the path uses


@dataclass(frozen=True)
class PunchTimedOut:
    tried: tuple[Endpoint, ...]


@dataclass(frozen=True)
class PeerLostTunnel:
    """The peer answered that it has no tunnel with us (it restarted)."""


PunchEvent = PathFound | PunchTimedOut | PeerLostTunnel


def candidate_endpoints(punch: Punch) -> tuple[Endpoint, ...]:
    """The peer's public endpoint first, then its local ones, without repeats."""
    seen: dict[Endpoint, None] = {punch.peer_public: None}
    for local in punch.peer_locals:
        seen.setdefault(local, None)
    return tuple(seen)


class PunchSession:
    def __init__(
        self,
        me: str,
        punch: Punch,
        now: float,
        *,
        interval: float = 0.075,
        timeout: float = 5.0,
        sources: int = 1,
        spray: int = 0,
        spray_per_tick: int = 48,
        rng: random.Random | None = None,
        no_tunnel: bool = False,
    ) -> None:
        self.me = me
        self.punch = punch
        self.candidates = list(candidate_endpoints(punch))
        self.state = PunchState.PROBING
        self.path: Endpoint | None = None
        self.path_source = 0
        self.heard_from: set[tuple[Endpoint, int]] = set()
        self.sources = max(1, sources)
        self._spray_left = spray
        self._spray_per_tick = spray_per_tick
        self._sprayed: set[int] = set()
        self._rng = rng or random.Random()
        self._ticks = 0
        self.probes_sent = 0
        self.predicting = self.sources > 1 or spray > 0  # the birthday method is in use
        self._interval = interval
        self._start = now + punch.delay_ms / 1000
        self._deadline = self._start + timeout
        self._next_probe = self._start
        self._nonce = 0
        self._sent_at: dict[int, float] = {}
        self._acks_sent: dict[Endpoint, int] = {}
        self._outbox: list[tuple[Message, Endpoint, int]] = []
        self._events: deque[PunchEvent] = deque()
        self._tell_no_tunnel = no_tunnel  # a listener without a tunnel to this peer says so, once
        self._lost_heard = False

    @property
    def session_id(self) -> str:
        return self.punch.session_id

    @property
    def peer(self) -> str:
        return self.punch.peer

    @property
    def role(self) -> str:
        return self.punch.role

    def knows(self, addr: Endpoint, source: int = 0) -> bool:
        """True if the peer may be at addr (seen on that socket): a probe came from it, or
        it answered one."""
        return (addr, source) in self.heard_from or (addr == self.path and source == self.path_source)

    def receive(self, message: Message, addr: Endpoint, now: float, source: int = 0) -> None:
        if isinstance(message, Probe) and message.sender == self.peer:
            answered = self._acks_sent.get(addr, 0)
            if answered >= MAX_ACKS_PER_SOURCE or len(self._acks_sent) >= MAX_SOURCES:
                return  # a flood with a guessed session id gets a bounded number of answers
            self._acks_sent[addr] = answered + 1
            self.heard_from.add((addr, source))
            if source == 0 and addr not in self.candidates and len(self.candidates) < MAX_CANDIDATES:
                # peer-reflexive (ICE): the peer's NAT chose another port towards us; probe it
                self.candidates.append(addr)
            ack = ProbeAck(self.session_id, sender=self.me, nonce=message.nonce, observed=addr)
            self._outbox.append((ack, addr, source))
            if self._tell_no_tunnel:
                self._tell_no_tunnel = False
                self._outbox.append((NoTunnel(self.session_id, sender=self.me), addr, source))
        elif isinstance(message, NoTunnel) and message.sender == self.peer:
            known = (addr, source) in self.heard_from or addr in self.candidates
            if known and not self._lost_heard:
                self._lost_heard = True
                self._events.append(PeerLostTunnel())
        elif isinstance(message, ProbeAck) and message.sender == self.peer:
            sent = self._sent_at.get(message.nonce)
            if sent is None:
                return
            self.heard_from.add((addr, source))
            if self.state is PunchState.PROBING:
                self.state = PunchState.SUCCEEDED
                self.path, self.path_source = addr, source
                self._events.append(PathFound(addr, max(0.0, now - sent), source))

    def succeed(self, addr: Endpoint, source: int = 0) -> None:
        """The path was proven another way (QUIC arrived from it); stop probing."""
        if self.state is PunchState.PROBING:
            self.state = PunchState.SUCCEEDED
            self.path, self.path_source = addr, source

    def handle_timer(self, now: float) -> None:
        if self.state is not PunchState.PROBING:
            return
        if now >= self._deadline:
            self.state = PunchState.FAILED
            self._events.append(PunchTimedOut(tuple(self.candidates)))
            return
        if now >= self._next_probe:
            self._nonce += 1
            self._sent_at[self._nonce] = now
            probe = Probe(self.session_id, sender=self.me, nonce=self._nonce)
            for candidate in self.candidates:
                self._outbox.append((probe, candidate, 0))
            if self.sources > 1 and self._ticks % SOURCE_EVERY == 0:
                # open (and keep open) one NAT mapping per extra socket towards the peer
                for source in range(1, self.sources):
                    self._outbox.append((probe, self.punch.peer_public, source))
            self._spray(probe)
            self._ticks += 1
            self._next_probe = now + self._interval

    def _spray(self, probe: Probe) -> None:
        """Probes to random ports of the peer's address (distinct, within the budget)."""
        host = self.punch.peer_public.host
        for _ in range(min(self._spray_per_tick, self._spray_left)):
            port = self._rng.randrange(1024, 65536)
            while port in self._sprayed:
                port = self._rng.randrange(1024, 65536)
            self._sprayed.add(port)
            self._spray_left -= 1
            self._outbox.append((probe, Endpoint(host, port), 0))

    def get_timer(self) -> float | None:
        if self.state is not PunchState.PROBING:
            return None
        return min(self._next_probe, self._deadline)

    def frames_to_send(self) -> list[tuple[Message, Endpoint, int]]:
        out, self._outbox = self._outbox, []
        self.probes_sent += sum(1 for message, _, _ in out if isinstance(message, Probe))
        return out

    def next_event(self) -> PunchEvent | None:
        return self._events.popleft() if self._events else None
