"""Agent-side registration: register, retry with backoff, keep alive, fail over.

Pure state machine: the agent feeds it received messages and the time, and sends what
``frames_to_send`` returns to broker number ``broker_index`` from its one UDP socket.
With several brokers it moves to the next one when its broker stops answering for two
keepalive intervals, when a few registrations in a row go unanswered, or at a goaway.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass

from .backoff import Backoff
from .endpoints import Endpoint
from .frames import Challenge, Error, ErrorCode, Goaway, Keepalive, Message, Register, Registered

CHALLENGE_ANSWER_INTERVAL = 1.0  # seconds: a registered agent answers challenges no faster
ANSWER_WINDOW = 3.0  # seconds: a challenge this soon after our keepalive may be its answer
# an unanswered keepalive is sent again a quarter interval later, twice; when the third
# goes unanswered too (three quarters of an interval after the first), the broker is gone:
# a dead replica is noticed within 1.75 intervals of its last answer, and two keepalives
# lost on the way cost nothing
KEEPALIVE_RETRIES = 2


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


@dataclass(frozen=True)
class BrokerChanged:
    """From now on frames go to broker number ``index``."""

    index: int
    reason: str


RegEvent = RegistrationUp | PublicEndpointChanged | RegistrationLost | RegistrationRefused | BrokerChanged


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
        brokers: int = 1,
        attempts_per_broker: int = 3,
    ) -> None:
        self.name = name
        self.local_endpoints = local_endpoints
        self.listening = listening
        self.keepalive_interval = keepalive_interval
        self.lost_after = keepalive_interval * lost_after_intervals
        self.backoff = backoff or Backoff(initial=0.5, maximum=10.0)
        self.state = RegState.IDLE
        self.brokers = max(1, brokers)
        self.broker_index = 0
        self.attempts_per_broker = attempts_per_broker
        self._unanswered = 0
        self.public: Endpoint | None = None
        self.broker_id: str | None = None
        self.cookie: bytes | None = None  # the broker's latest address-validation cookie
        self.probe_port: int | None = None  # the broker's second port, for NAT-type discovery
        self.nat: str | None = None
        self._next_send: float | None = None
        self._last_heard: float | None = None
        self._outbox: list[Message] = []
        self._challenge_answered: float | None = None
        self._offered_cookie: bytes | None = None  # a challenge's, sent back in a keepalive
        self._keepalive_sent: float | None = None  # our keepalive the broker has not answered
        self._keepalive_first: float | None = None  # when the unanswered one was first sent
        self._keepalive_tries = 0
        self._keepalive_due: float | None = None  # when the next regular keepalive is due
        # frames from the broker's address that cannot be answers to ours, while registered:
        # challenge_answered, challenge_ignored (too frequent), not_registered_ignored
        self.unbound = Counter[str]()
        self._events: deque[RegEvent] = deque()

    # -- inputs ---------------------------------------------------------------
    def start(self, now: float) -> None:
        self.state = RegState.REGISTERING
        self.backoff.reset()
        self._send_register(now)

    def update(self, *, now: float, listening: bool | None = None, nat: str | None = None) -> None:
        """Re-announce ourselves at once when what the broker knows of us changed; we count
        as registered again only once the broker has acknowledged the change."""
        changed = False
        if listening is not None and listening != self.listening:
            self.listening, changed = listening, True
        if nat is not None and nat != self.nat:
            self.nat, changed = nat, True
        if changed and self.state is not RegState.IDLE:
            self._register_again(now)

    def receive(self, message: Message, now: float) -> bool:
        """Handle a frame from the current broker; returns False if it is not ours."""
        if isinstance(message, Registered) and message.name == self.name:
            self._on_registered(message, now)
            return True
        if isinstance(message, Challenge):
            if self.state is RegState.REGISTERED:
                self._challenged_while_registered(message, now)
            elif self.state is RegState.REGISTERING:
                # the broker wants proof that we receive at our address: answer at once
                self.cookie = message.cookie
                self._unanswered = 0
                self._send_register(now)
            return True
        if isinstance(message, Goaway):
            if self.state is not RegState.IDLE:
                self._rotate(f"broker going away: {message.reason}")
                self._lose(f"broker going away: {message.reason}", now)
            return True
        if isinstance(message, Error) and message.request_id is None:
            if message.code == ErrorCode.NOT_REGISTERED and self.state is RegState.REGISTERED:
                self._not_registered(now)
            elif self.state is RegState.REGISTERING:
                self._events.append(RegistrationRefused(message.code, message.message))
            return True
        return False

    def _not_registered(self, now: float) -> None:
        """The broker says it does not know us: register again, if this can be its answer to
        our keepalive (one waits, or the one that carried a challenge's cookie). Anyone can
        send this from the broker's address; at any other moment it is counted and ignored,
        and the next keepalive asks again (its answer is then bound to it)."""
        sent = self._keepalive_sent
        if self._offered_cookie is not None:  # it passed: the broker's cookie, after a restart
            self.cookie, self._offered_cookie = self._offered_cookie, None
        elif sent is None or now - sent > ANSWER_WINDOW:
            self.unbound["not_registered_ignored"] += 1
            return
        self._keepalive_sent = None
        self._lose("broker no longer knows us", now)

    def _challenged_while_registered(self, message: Challenge, now: float) -> None:
        """A challenge while registered never re-registers by itself: anyone who spoofs our
        address towards the broker makes it challenge us (with a genuine cookie), also
        while our own keepalive waits for its answer. We answer with one keepalive that
        carries the challenge's cookie (at most one per CHALLENGE_ANSWER_INTERVAL) and
        keep our registration; the broker's answer decides: a Registered with a fresh
        cookie, or "not registered" (it restarted, or our address moved), which registers
        again with that cookie. A challenge that cannot be the answer to a keepalive of
        ours is counted as unbound."""
        sent = self._keepalive_sent
        last = self._challenge_answered
        if last is not None and now - last < CHALLENGE_ANSWER_INTERVAL:
            self.unbound["challenge_ignored"] += 1
            return
        if sent is None or now - sent > ANSWER_WINDOW:
            self.unbound["challenge_answered"] += 1
        self._challenge_answered = now
        self._offered_cookie = message.cookie
        self._outbox.append(Keepalive(name=self.name, cookie=message.cookie))

    def handle_timer(self, now: float) -> None:
        deadline = self._loss_deadline()
        if deadline is not None and now >= deadline:
            self._rotate("broker stopped answering")
            self._lose("broker stopped answering", now)
            return
        if self._next_send is not None and now >= self._next_send:
            if self.state is RegState.REGISTERING:
                if self._unanswered >= self.attempts_per_broker:
                    self._rotate(f"no answer to {self._unanswered} registrations")
                self._send_register(now)
            elif self.state is RegState.REGISTERED:
                self._send_keepalive(now)

    def _send_keepalive(self, now: float) -> None:
        """The regular keepalive, or a retry of an unanswered one (a quarter interval on)."""
        if self._keepalive_first is None:
            self._keepalive_first = now
            self._keepalive_due = now + self.keepalive_interval
        self._outbox.append(Keepalive(name=self.name, cookie=self.cookie))
        self._keepalive_sent = now
        self._keepalive_tries += 1
        retry = self.keepalive_interval / 4
        self._next_send = now + retry if self._keepalive_tries <= KEEPALIVE_RETRIES else None

    def check_endpoint(self, now: float) -> None:
        """Send a keepalive now: its answer says whether our public endpoint moved (the agent
        asks when a tunnel suddenly hears nothing back)."""
        if self.state is RegState.REGISTERED:
            self._next_send = now

    def retry_now(self, now: float) -> None:
        """Send the next registration now (a new way to the broker just opened)."""
        if self.state is RegState.REGISTERING:
            self._next_send = now

    def reannounce(self, now: float) -> None:
        """Register again now, while still registered (another way to the broker works):
        the answer keeps us registered, on whichever way it came."""
        if self.state is RegState.REGISTERED:
            self._register_again(now)

    def transport_lost(self, reason: str, now: float) -> None:
        """The way our registration went is gone (the TCP stream closed): register again."""
        if self.state is RegState.REGISTERED:
            self._lose(reason, now)

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
        """Unsigned: the agent signs it (with the cookie inside) as it leaves."""
        return Register(
            name=self.name,
            locals=self.local_endpoints,
            listening=self.listening,
            cookie=self.cookie,
            nat=self.nat,
        )

    def _register_again(self, now: float) -> None:
        """Announce ourselves afresh; registered again only once the broker answers."""
        self.state = RegState.REGISTERING
        self.backoff.reset()
        self._send_register(now)

    def _send_register(self, now: float) -> None:
        self._outbox.append(self._register_frame())
        self._unanswered += 1
        self._next_send = now + self.backoff.next_delay()

    def use_broker(self, index: int, reason: str) -> None:
        """Frames go to broker ``index`` from now on (the next, or one that answered first)."""
        if index != self.broker_index and 0 <= index < self.brokers:
            self._unanswered = 0
            self.cookie = None  # cookies are per broker
            self.broker_index = index
            self._outbox.clear()  # nothing queued for the old broker goes to the new one
            self._events.append(BrokerChanged(index, reason))

    def _rotate(self, reason: str) -> None:
        self._unanswered = 0
        self.use_broker((self.broker_index + 1) % self.brokers, reason)

    def _loss_deadline(self) -> float | None:
        """Silence for ``lost_after``, or every try of a keepalive unanswered."""
        if self.state is not RegState.REGISTERED or self._last_heard is None:
            return None
        deadline = self._last_heard + self.lost_after
        if self._keepalive_first is not None:
            tries_over = self._keepalive_first + (KEEPALIVE_RETRIES + 1) * self.keepalive_interval / 4
            deadline = min(deadline, tries_over)
        return deadline

    def _on_registered(self, message: Registered, now: float) -> None:
        if self.state is RegState.REGISTERING and message.listening not in (None, self.listening):
            return  # the answer to an older Register; wait for the current one's
        self._last_heard = now
        self._unanswered = 0
        self._keepalive_sent = self._offered_cookie = None
        if self._keepalive_first is not None and self.state is RegState.REGISTERED:
            self._next_send = self._keepalive_due  # answered: the regular schedule again
        self._keepalive_first = self._keepalive_due = None
        self._keepalive_tries = 0
        self.broker_id = message.broker_id
        if message.cookie is not None:
            self.cookie = message.cookie
        if message.listening is not None:  # a register answer says where to probe
            self.probe_port = message.probe_port
        if self.state is not RegState.REGISTERED:
            self.state = RegState.REGISTERED
            self._events.append(RegistrationUp(message.public, message.broker_id, self.backoff.attempts))
            self.backoff.reset()
            self._next_send = now + self.keepalive_interval
        if self.public is not None and message.public != self.public:
            # seen on a keepalive, or on the registration a moved address had to repeat
            # (the broker's cookie is bound to the old one)
            self._events.append(PublicEndpointChanged(self.public, message.public))
        self.public = message.public

    def _lose(self, reason: str, now: float) -> None:
        self.state = RegState.REGISTERING
        self._keepalive_first = self._keepalive_due = self._keepalive_sent = None
        self._keepalive_tries = 0
        self._events.append(RegistrationLost(reason))
        self.backoff.reset()
        self._send_register(now)
