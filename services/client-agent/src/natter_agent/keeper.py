"""What every kind of forward shares: a tunnel kept up in the background, and a cap on
the connections it serves at once (``--max-connections``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from natter_proto.backoff import Backoff

from .errors import NatterError
from .links import AnyLink

if TYPE_CHECKING:
    from .agent import Agent


class TunnelKeeper:
    """Brings the tunnel to ``peer`` up now and again whenever it drops, backing off on
    failure; ``problem`` says why it is down, as last seen (for status and logs)."""

    def __init__(
        self,
        agent: Agent,
        peer: str,
        target: str,
        log: Any,
        on_up: Callable[[AnyLink], None] | None = None,
    ) -> None:
        self.agent, self.peer, self.target, self.log = agent, peer, target, log
        self.on_up = on_up
        self.problem = ""
        self.link: AnyLink | None = None  # the tunnel while it is up
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _keep(self) -> None:
        backoff = Backoff(initial=1.0, maximum=30.0)
        while True:
            try:
                link = await self.agent.connect(self.peer, self.target)
            except NatterError as exc:
                delay = backoff.next_delay()
                self.problem = str(exc)
                self.log.warning(f"cannot reach {self.peer}, retrying in {delay:.0f} s", reason=str(exc))
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self.problem = ""
            self.link = link
            if self.on_up is not None:
                self.on_up(link)
            await link.closed.wait()
            self.link = None


class ConnectionCap:
    """Connections a forward accepted, serves now, and refused for being over the cap."""

    def __init__(self, limit: int, log: Any) -> None:
        self.limit = limit
        self.log = log
        self.connections = 0  # accepted over the forward's life
        self.open_now = 0  # being served now
        self.refused = 0  # accepted and closed at once: over the cap

    def admit(self) -> bool:
        """Count a new connection; False (said in the log) if it is over the cap. An
        admitted connection calls ``done`` when it ends."""
        self.connections += 1
        if self.open_now < self.limit:
            self.open_now += 1
            return True
        self.refused += 1
        self.log.warning(
            "connection refused",
            reason=f"{self.open_now} connections open on this forward (--max-connections {self.limit})",
            refused=self.refused,
        )
        return False

    def done(self) -> None:
        self.open_now -= 1
