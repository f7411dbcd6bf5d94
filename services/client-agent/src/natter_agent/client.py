"""The seed's ``Client`` API on top of the agent: listen, forward, close."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Literal, overload

import structlog

from natter_proto.acl import TargetAllowList, parse_target_rule
from natter_proto.config import Config

from .agent import Agent
from .forward import Forward, Listener, forward_stdio
from .forwards import AnyForward, ForwardKind, ForwardRequest, new_forward
from .links import AnyLink
from .socksforward import SocksForward
from .udpforward import UdpForward
from .udplisten import UdpListener

log = structlog.get_logger("natter.client")


class Client:
    """A natter client: ``listen()``, ``forward(":8022", "bob", ":22")``, ``close()``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.agent = Agent(config)
        self.forwards: list[AnyForward] = []
        self.listener: Listener | None = None
        self.udp_listener: UdpListener | None = None

    async def start(self) -> None:
        """Bind the UDP socket and begin registering (retried in the background)."""
        await self.agent.start()

    async def listen(self, *, wait: bool = True) -> None:
        """Accept tunnels from peers; by default wait until the broker has registered us."""
        rules = self.config.allow_targets
        allow = TargetAllowList([parse_target_rule(r) for r in rules] if rules is not None else None)
        if self.config.allow_peers is None:
            log.warning(
                "accepting tunnels from any authenticated peer; restrict with --allow NAME[=FINGERPRINT]"
            )
        self.listener = Listener(
            allow, header_timeout=self.config.header_timeout, max_pending=self.config.max_pending_streams
        )
        self.udp_listener = UdpListener(
            self.listener,
            idle_timeout=self.config.udp_idle_timeout,
            queue_limit=self.config.udp_flow_queue,
            max_flows=self.config.udp_max_flows,
        )
        self.agent.udp.listener = self.udp_listener
        self.agent.set_listening(self.listener.serve)
        await self.start()
        self.udp_listener.start()
        plane = self.agent.plane
        if plane is not None:  # the native engine: its streams come as events
            self.agent.serve_native(self.listener)
        if wait:
            await self.agent.wait_registered(self.config.register_timeout)

    @overload
    async def forward(self, local: str, peer: str, remote: str, proto: Literal["tcp"] = "tcp") -> Forward: ...
    @overload
    async def forward(self, local: str, peer: str, remote: str, proto: Literal["udp"]) -> UdpForward: ...

    async def forward(
        self, local: str, peer: str, remote: str, proto: Literal["tcp", "udp"] = "tcp"
    ) -> Forward | UdpForward:
        """Forward TCP connections (or, with ``proto="udp"``, UDP datagrams) on ``local`` to
        ``remote`` as seen from ``peer``.

        Returns once the local port is bound; the tunnel comes up (and comes back after a
        loss) in the background. Close the returned handle to stop the forward.
        """
        kind = ForwardKind(proto)
        (forward,) = await self.forward_all([ForwardRequest(local, peer, remote, kind)])
        assert isinstance(forward, Forward | UdpForward)
        return forward

    async def socks(self, local: str, peer: str) -> SocksForward:
        """A SOCKS5 server on ``local`` (loopback unless a host is given) whose every
        CONNECT is resolved and connected on ``peer``'s side, as ``ssh -D`` does."""
        (forward,) = await self.forward_all([ForwardRequest(local, peer, kind=ForwardKind.SOCKS)])
        assert isinstance(forward, SocksForward)
        return forward

    async def forward_all(self, specs: Sequence[ForwardRequest | tuple[str, str, str]]) -> list[AnyForward]:
        """Several forwards (``ForwardRequest``s, or ``(local, peer, remote)`` for TCP):
        every port is bound before the agent starts, so a port in use fails here with
        nothing started."""
        if not specs:
            return []
        requests = [spec if isinstance(spec, ForwardRequest) else ForwardRequest(*spec) for spec in specs]
        bound: list[AnyForward] = []
        try:
            for request in requests:
                forward = new_forward(self.agent, request)
                await forward.bind()
                bound.append(forward)
        except BaseException:
            for forward in bound:
                await forward.close()
            raise
        await self.start()
        for forward in bound:
            forward.run()
        self.forwards.extend(bound)
        return bound

    async def forward_stdio(self, peer: str, remote: str) -> tuple[int, int]:
        """Pipe stdin/stdout through one stream to ``remote`` on ``peer``."""
        await self.start()
        return await forward_stdio(self.agent, peer, remote, self.config.connect_timeout * 3)

    async def connect(self, peer: str) -> AnyLink:
        """The live tunnel to ``peer``, set up if needed (for status and tests)."""
        await self.start()
        return await self.agent.connect(peer)

    async def close(self) -> None:
        for forward in self.forwards:
            await forward.close()
        self.forwards.clear()
        if self.udp_listener is not None:
            await self.udp_listener.close()
        await self.agent.close()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
