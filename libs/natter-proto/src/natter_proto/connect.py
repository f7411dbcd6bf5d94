"""Agent-side connect attempt: ask the broker for a peer until a punch instruction comes.

UDP may lose the request or the answer, so the request is resent with backoff under the
same request id (the broker answers a repeat with the same instruction) until the broker
answers or the deadline passes.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from .backoff import Backoff
from .frames import ConnectRequest, Error, Message, Punch


class ConnectState(enum.Enum):
    WAITING = "waiting"
    PUNCH = "punch"
    FAILED = "failed"


@dataclass(frozen=True)
class ConnectAnswered:
    punch: Punch


@dataclass(frozen=True)
class ConnectFailed:
    code: str
    message: str


ConnectEvent = ConnectAnswered | ConnectFailed


class ConnectAttempt:
    def __init__(
        self,
        request_id: str,
        me: str,
        peer: str,
        target: str,
        now: float,
        *,
        deadline: float = 10.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.request = ConnectRequest(request_id=request_id, peer_from=me, peer_to=peer, target=target)
        self.state = ConnectState.WAITING
        self._deadline = now + deadline
        self._backoff = backoff or Backoff(initial=0.5, maximum=2.0)
        self._outbox: list[Message] = [self.request]
        self._next_send = now + self._backoff.next_delay()
        self._events: deque[ConnectEvent] = deque()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def receive(self, message: Message) -> None:
        if self.state is not ConnectState.WAITING:
            return
        if isinstance(message, Punch) and message.request_id == self.request_id:
            self.state = ConnectState.PUNCH
            self._events.append(ConnectAnswered(message))
        elif isinstance(message, Error) and message.request_id == self.request_id:
            self._fail(message.code, message.message)

    def handle_timer(self, now: float) -> None:
        if self.state is not ConnectState.WAITING:
            return
        if now >= self._deadline:
            self._fail("timeout", "the broker did not answer the connect request")
        elif now >= self._next_send:
            self._outbox.append(self.request)
            self._next_send = now + self._backoff.next_delay()

    def get_timer(self) -> float | None:
        if self.state is not ConnectState.WAITING:
            return None
        return min(self._next_send, self._deadline)

    def frames_to_send(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> ConnectEvent | None:
        return self._events.popleft() if self._events else None

    def _fail(self, code: str, message: str) -> None:
        self.state = ConnectState.FAILED
        self._events.append(ConnectFailed(code, message))
