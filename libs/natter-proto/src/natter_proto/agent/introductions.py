"""The introductions an agent asks the broker for: connect attempts under way, and the ones
waiting until it can ask (not registered yet, or its NAT type about to be known)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from ..connect import ConnectAttempt, ConnectEvent
from ..frames import Error, Message, Punch
from .actions import Level, Notice, NoticeKind
from .pathstate import Purpose
from .settings import AgentSettings


@dataclass
class Pending:
    target: str
    purpose: Purpose
    deadline: float  # registered by then, or the connect fails
    nat_deadline: float  # NAT type known by then, or we ask without it


@dataclass(frozen=True)
class Outcome:
    """The broker's answer to one attempt, read in the light of its purpose."""

    peer: str
    purpose: Purpose
    event: ConnectEvent


class Introductions:
    def __init__(self, name: str, settings: AgentSettings) -> None:
        self.name = name
        self.settings = settings
        self.attempts: dict[str, tuple[ConnectAttempt, Purpose]] = {}
        self.pending: dict[str, Pending] = {}

    def ask(self, peer: str, target: str, purpose: Purpose, now: float, *, can_ask: bool) -> Notice | None:
        """Ask now if we can, else as soon as we can (``flush``)."""
        if can_ask:
            return self._send(peer, target, purpose, now)
        if peer not in self.pending:
            s = self.settings
            self.pending[peer] = Pending(target, purpose, now + s.register_timeout, now + s.nat_probe_wait)
        return None

    def flush(self, now: float, *, registered: bool, nat_pending: bool) -> list[Notice]:
        """Registered: ask what waited (without the NAT type once waiting for it is over)."""
        if not registered:
            return []
        notes = []
        for peer, pending in list(self.pending.items()):
            if not nat_pending or now >= pending.nat_deadline:
                del self.pending[peer]
                notes.append(self._send(peer, pending.target, pending.purpose, now))
        return notes

    def expired(self, now: float, *, registered: bool) -> list[tuple[str, Pending]]:
        """Those that waited for a registration in vain."""
        if registered:
            return []
        gone = [(peer, p) for peer, p in self.pending.items() if now >= p.deadline]
        for peer, _ in gone:
            del self.pending[peer]
        return gone

    def building(self, peer: str) -> bool:
        """A new tunnel to peer asked for, or waiting to be."""
        pending = self.pending.get(peer)
        if pending is not None and pending.purpose is Purpose.NEW:
            return True
        return any(p is Purpose.NEW and a.request.peer_to == peer for a, p in self.attempts.values())

    def receive(self, message: Message) -> bool:
        if isinstance(message, Punch | Error) and message.request_id in self.attempts:
            self.attempts[message.request_id][0].receive(message)
            return True
        return False

    def frames_and_outcomes(self) -> Iterator[Message | Outcome]:
        for rid, (attempt, purpose) in list(self.attempts.items()):
            yield from attempt.frames_to_send()
            while (event := attempt.next_event()) is not None:
                del self.attempts[rid]
                yield Outcome(attempt.request.peer_to, purpose, event)

    def timers(self, *, registered: bool) -> list[float | None]:
        times = [attempt.get_timer() for attempt, _ in self.attempts.values()]
        return times + [p.nat_deadline if registered else p.deadline for p in self.pending.values()]

    def handle_timer(self, now: float) -> None:
        for attempt, _ in list(self.attempts.values()):
            attempt.handle_timer(now)

    def _send(self, peer: str, target: str, purpose: Purpose, now: float) -> Notice:
        request_id = secrets.token_hex(6)
        deadline = self.settings.connect_timeout
        self.attempts[request_id] = (
            ConnectAttempt(request_id, self.name, peer, target, now, deadline=deadline),
            purpose,
        )
        return Notice(
            NoticeKind.ASKING_BROKER,
            Level.INFO,
            "asking broker for peer",
            {"peer": peer, "request_id": request_id, "purpose": purpose.value},
        )
