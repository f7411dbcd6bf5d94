"""Agent-side registration with one broker: register, retry with backoff, keep alive.

Pure state machine: the agent feeds it received messages and the time, and sends what
``frames_to_send`` returns to the broker from its one UDP socket.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from .backoff import Backoff
from .endpoints import Endpoint
from .frames import Error, ErrorCode, Keepalive, Message, Register, Registered


class RegState(enum.Enum):
    IDLE = "idle"
    REGISTERING = "registering"
    REGISTERED = "registered"


@dataclass(frozen=True)
class RegistrationUp:
    """The broker accepted us (first time, or again after a loss)."""

    public: Endpoint
    broker_id: str
    attempts: int


@dataclass(frozen=True)
class PublicEndpointChanged:
    old: Endpoint
    new: Endpoint


@dataclass(frozen=True)
class RegistrationLost:
    """The broker stopped answering or forgot us; we are registering again."""

    reason: str


@dataclass(frozen=True)
class RegistrationRefused:
    """The broker answered a register with an error (bad name, version mismatch, ...)."""

    code: str
    message: str


RegEvent = RegistrationUp | PublicEndpointChanged | RegistrationLost | RegistrationRefused


class Registration:
    """Keeps one agent registered with one broker."""

    def __init__(
        self,
        name: str,
        local_endpoints: tuple[Endpoint, ...] = (),
        *,
        listening: bool = False,
        keepalive_interval: float = 20.0,
        lost_after_intervals: float = 2.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.local_endpoints = local_endpoints
        self.listening = listening
        self.keepalive_interval = keepalive_interval
        self.lost_after = keepalive_interval * lost_after_intervals
        self.backoff = backoff or Backoff(initial=0.5, maximum=10.0)
        self.state = RegState.IDLE
        self.public: Endpoint | None = None
        self.broker_id: str | None = None
        self._next_send: float | None = None
        self._last_heard: float | None = None
        self._outbox: list[Message] = []
        self._events: deque[RegEvent] = deque()

    # -- inputs ---------------------------------------------------------------
    def start(self, now: float) -> None:
        self.state = RegState.REGISTERING
        self.backoff.reset()
        self._send_register(now)

    def update(self, *, listening: bool, now: float) -> None:
        """Re-announce ourselves at once when what the broker knows of us changed."""
        if listening != self.listening:
            self.listening = listening
            if self.state is not RegState.IDLE:
                self._outbox.append(self._register_frame())

    def receive(self, message: Message, now: float) -> bool:
        """Handle a frame from the broker; returns False if it is not ours to handle."""
        if isinstance(message, Registered) and message.name == self.name:
            self._on_registered(message, now)
            return True
        if isinstance(message, Error) and message.request_id is None:
            if message.code == ErrorCode.NOT_REGISTERED and self.state is RegState.REGISTERED:
                self._lose("broker no longer knows us", now)
            elif self.state is RegState.REGISTERING:
                self._events.append(RegistrationRefused(message.code, message.message))
            return True
        return False

    def handle_timer(self, now: float) -> None:
        deadline = self._loss_deadline()
        if deadline is not None and now >= deadline:
            self._lose("broker stopped answering", now)
            return
        if self._next_send is not None and now >= self._next_send:
            if self.state is RegState.REGISTERING:
                self._send_register(now)
            elif self.state is RegState.REGISTERED:
                self._outbox.append(Keepalive(name=self.name))
                self._next_send = now + self.keepalive_interval

    def stop(self) -> None:
        self.state = RegState.IDLE
        self._next_send = None

    # -- outputs --------------------------------------------------------------
    def get_timer(self) -> float | None:
        if self.state is RegState.IDLE:
            return None
        deadlines = [t for t in (self._next_send, self._loss_deadline()) if t is not None]
        return min(deadlines) if deadlines else None

    def frames_to_send(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> RegEvent | None:
        return self._events.popleft() if self._events else None

    # -- internals ------------------------------------------------------------
    def _register_frame(self) -> Register:
        return Register(name=self.name, locals=self.local_endpoints, listening=self.listening)

    def _send_register(self, now: float) -> None:
        self._outbox.append(self._register_frame())
        self._next_send = now + self.backoff.next_delay()

    def _loss_deadline(self) -> float | None:
        if self.state is RegState.REGISTERED and self._last_heard is not None:
            return self._last_heard + self.lost_after
        return None

    def _on_registered(self, message: Registered, now: float) -> None:
        self._last_heard = now
        self.broker_id = message.broker_id
        if self.state is not RegState.REGISTERED:
            self.state = RegState.REGISTERED
            self._events.append(
                RegistrationUp(message.public, message.broker_id, self.backoff.attempts)
            )
            self.backoff.reset()
            self._next_send = now + self.keepalive_interval
        elif self.public is not None and message.public != self.public:
            self._events.append(PublicEndpointChanged(self.public, message.public))
        self.public = message.public

    def _lose(self, reason: str, now: float) -> None:
        self.state = RegState.REGISTERING
        self._events.append(RegistrationLost(reason))
        self.backoff.reset()
        self._send_register(now)
