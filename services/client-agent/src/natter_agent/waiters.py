"""Connections waiting for a tunnel to a peer: one future per peer, settled by the
machine's PeerReady or PeerUnreachable."""

from __future__ import annotations

import asyncio

from natter_proto.agent.actions import PeerReady, PeerUnreachable

from .errors import PeerUnavailable
from .links import AnyLink


class Waiters:
    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[AnyLink]] = {}

    def wait(self, peer: str) -> tuple[asyncio.Future[AnyLink], bool]:
        """The future to await for peer's tunnel, and whether it is new (ask the machine)."""
        future = self._futures.get(peer)
        if future is not None and not future.done():
            return future, False
        future = self._futures[peer] = asyncio.get_running_loop().create_future()
        return future, True

    def settle(self, action: PeerReady | PeerUnreachable, link: AnyLink | None) -> None:
        future = self._futures.pop(action.peer, None)
        if future is None or future.done():
            return
        if isinstance(action, PeerReady):
            if link is not None and link.is_alive:
                future.set_result(link)
                return
            action = PeerUnreachable(action.peer, "closed", "the tunnel closed")
        future.set_exception(PeerUnavailable(action.peer, action.code, action.message))
        future.exception()  # retrieved: the waiting connection may have gone
