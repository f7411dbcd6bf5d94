"""A deterministic simulated network: realms, NATs, loss, MTU and a virtual clock.

The internet is one realm; each NAT joins an inside realm to an outside one (a NAT inside
another NAT's realm is a carrier-grade NAT). Packets cross a realm boundary with a fixed
latency and may be lost (seeded), dropped for size (path MTU) or blocked (UDP blocked).
NAT models follow RFC 4787: mapping endpoint-independent or endpoint-dependent (random
ports), filtering full cone, address- or port-restricted, mapping timeouts, hairpinning.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from natter_proto.endpoints import Endpoint

Receive = Callable[[bytes, Endpoint], None]


class Clock:
    """Virtual time and the events scheduled in it."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._seq), callback))

    def run_until(self, when: float, idle: Callable[[], float | None] | None = None) -> None:
        """Run events up to ``when``; ``idle`` names the next timer of the actors."""
        while True:
            next_event = self._queue[0][0] if self._queue else None
            next_timer = idle() if idle is not None else None
            candidates = [t for t in (next_event, next_timer) if t is not None and t <= when]
            if not candidates:
                self.now = when
                return
            if next_event is not None and next_event == min(candidates):
                t, _, callback = heapq.heappop(self._queue)
                self.now = max(self.now, t)
                callback()
            else:
                self.now = max(self.now, min(candidates))
                return  # the caller services the timer


class Mapping(enum.Enum):
    INDEPENDENT = "endpoint-independent"
    DEPENDENT = "endpoint-dependent"  # symmetric: a new port per destination


class Filtering(enum.Enum):
    NONE = "full cone"
    ADDRESS = "address-restricted"
    PORT = "port-restricted"


@dataclass
class Stats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    too_big: int = 0
    blocked: int = 0
    filtered: int = 0
    unroutable: int = 0


class Realm:
    """An address space: hosts' sockets, and the NATs whose outside is here."""

    def __init__(self, net: Network, upstream: Nat | None = None) -> None:
        self.net = net
        self.upstream = upstream  # the NAT this realm sits behind (None: the internet)
        self.sockets: dict[Endpoint, Receive] = {}
        self.nats: dict[str, Nat] = {}  # by outside IP

    def bind(self, addr: Endpoint, receive: Receive) -> None:
        self.sockets[addr] = receive

    def unbind(self, addr: Endpoint) -> None:
        self.sockets.pop(addr, None)

    def send(self, src: Endpoint, dst: Endpoint, data: bytes) -> None:
        """A datagram leaves a socket of this realm."""
        self.net.stats.sent += 1
        self.route(src, dst, data, hops=0)

    def route(self, src: Endpoint, dst: Endpoint, data: bytes, hops: int) -> None:
        if dst in self.sockets:
            self.net.deliver(self, src, dst, data, hops)
        elif dst.host in self.nats:
            self.nats[dst.host].inbound(src, dst, data, hops)
        elif self.upstream is not None:
            self.upstream.outbound(src, dst, data, hops)
        else:
            self.net.stats.unroutable += 1


class Nat:
    def __init__(
        self,
        net: Network,
        outside: Realm,
        public_ip: str,
        *,
        mapping: Mapping = Mapping.INDEPENDENT,
        filtering: Filtering = Filtering.PORT,
        timeout: float = 120.0,
        hairpin: bool = False,
        udp_blocked: bool = False,
        tcp_blocked: bool = False,
        mtu: int = 1500,
        translate: bool = True,
    ) -> None:
        self.net = net
        self.outside = outside
        self.public_ip = public_ip
        self.mapping, self.filtering, self.timeout = mapping, filtering, timeout
        self.hairpin, self.udp_blocked, self.mtu = hairpin, udp_blocked, mtu
        self.tcp_blocked = tcp_blocked  # agents' TCP streams to the broker cannot pass
        # False: a stateful firewall, as IPv6 home routers are (the host behind it keeps
        # its address, public_ip; what comes in unsolicited is filtered all the same)
        self.translate = translate
        self.deny: set[str] = set()  # a firewall: nothing to or from these addresses
        self.paused = False  # the host behind it is stopped (SIGSTOP): nothing in or out
        self.inside = Realm(net, upstream=self)
        outside.nats[public_ip] = self
        self._out: dict[tuple[Endpoint, Endpoint | None], Endpoint] = {}  # (private, dst?) -> public
        self._in: dict[Endpoint, _Binding] = {}  # public -> binding
        self._ports = iter(net.rng.sample(range(20000, 60000), 40000))

    def rebind(self) -> None:
        """Forget every mapping (a router reboot, a flushed table): new ports from now on."""
        self._out.clear()
        self._in.clear()

    def outbound(self, src: Endpoint, dst: Endpoint, data: bytes, hops: int) -> None:
        if self.udp_blocked or dst.host in self.deny or self.paused:
            self.net.stats.blocked += 1
            return
        if len(data) + 28 > self.mtu:
            self.net.stats.too_big += 1
            return
        key = (src, None if self.mapping is Mapping.INDEPENDENT else dst)
        now = self.net.clock.now
        public = self._out.get(key)
        binding = self._in.get(public) if public is not None else None
        if binding is None or now - binding.last_used > self.timeout:
            public = Endpoint(self.public_ip, next(self._ports)) if self.translate else src
            binding = _Binding(src, now)
            self._out[key] = public
            self._in[public] = binding
        assert public is not None
        binding.last_used = now
        binding.allowed.add(dst)
        if dst.host == self.public_ip:  # hairpinning: to our own public side
            if self.hairpin:
                self.inbound(public, dst, data, hops + 1)
            else:
                self.net.stats.unroutable += 1
            return
        self.outside.route(public, dst, data, hops + 1)

    def inbound(self, src: Endpoint, dst: Endpoint, data: bytes, hops: int) -> None:
        binding = self._in.get(dst)
        now = self.net.clock.now
        if binding is None or now - binding.last_used > self.timeout or self.udp_blocked or self.paused:
            self.net.stats.filtered += 1
            return
        if src.host in self.deny:
            self.net.stats.filtered += 1
            return
        if self.filtering is Filtering.PORT and src not in binding.allowed:
            self.net.stats.filtered += 1
            return
        if self.filtering is Filtering.ADDRESS and src.host not in {a.host for a in binding.allowed}:
            self.net.stats.filtered += 1
            return
        if len(data) + 28 > self.mtu:
            self.net.stats.too_big += 1
            return
        self.inside.route(src, binding.private, data, hops + 1)


@dataclass
class _Binding:
    private: Endpoint
    last_used: float
    allowed: set[Endpoint] = field(default_factory=set)


class Network:
    def __init__(self, *, seed: int = 1, latency: float = 0.005, loss: float = 0.0) -> None:
        self.clock = Clock()
        self.rng = random.Random(seed)
        self.latency = latency  # per realm crossed
        self.loss = loss
        self.stats = Stats()
        self.internet = Realm(self)

    def nat(self, outside: Realm, public_ip: str, **options: object) -> Nat:
        return Nat(self, outside, public_ip, **options)  # type: ignore[arg-type]

    def deliver(self, realm: Realm, src: Endpoint, dst: Endpoint, data: bytes, hops: int) -> None:
        if self.loss and self.rng.random() < self.loss:
            self.stats.lost += 1
            return
        receive = realm.sockets[dst]

        def arrive() -> None:
            if realm.sockets.get(dst) is receive:
                self.stats.delivered += 1
                receive(data, src)

        self.clock.at(self.clock.now + self.latency * (hops + 1), arrive)
