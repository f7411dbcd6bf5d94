"""The seed's ``Client`` API on top of the agent: listen, forward, close."""

from __future__ import annotations

from types import TracebackType

import structlog

from natter_proto.acl import TargetAllowList, parse_target_rule
from natter_proto.config import Config

from .agent import Agent
from .forward import Forward, Listener, forward_stdio
from .links import AnyLink

log = structlog.get_logger("natter.client")


class Client:
    """A natter client: ``listen()``, ``forward(":8022", "bob", ":22")``, ``close()``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.agent = Agent(config)
        self.forwards: list[Forward] = []
        self.listener: Listener | None = None

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
        self.agent.set_listening(self.listener.serve)
        await self.start()
        plane = self.agent.plane
        if plane is not None:  # the native engine: its streams come as events
            self.agent.serve_native(self.listener)
        if wait:
            await self.agent.wait_registered(self.config.register_timeout)

    async def forward(self, local: str, peer: str, remote: str) -> Forward:
        """Forward TCP connections on ``local`` to ``remote`` as seen from ``peer``.

        Returns once the local port is bound; the tunnel comes up (and comes back after a
        loss) in the background. Close the returned handle to stop the forward.
        """
        (forward,) = await self.forward_all([(local, peer, remote)])
        return forward

    async def forward_all(self, specs: list[tuple[str, str, str]]) -> list[Forward]:
        """Several forwards, ``(local, peer, remote)`` each: every port is bound before the
        agent starts, so a port in use fails here with nothing started."""
        if not specs:
            return []
        bound: list[Forward] = []
        try:
            for local, peer, remote in specs:
                forward = Forward(self.agent, local, peer, remote)
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
