"""Our standing with the broker: registration, the NAT-type probe that follows it, how
frames to the broker are stamped and which way they go (UDP, or the TCP stream: see
``brokerpath``), and the "where do you see us" check a quiet tunnel asks for. Pure: it
returns frames and notices, and says when our public endpoint moved."""

from __future__ import annotations

from dataclasses import replace

from .. import frames
from ..endpoints import Endpoint
from ..frames import ConnectRequest, Keepalive, MappingReply, Message, Register
from ..identity import Identity
from ..registration import (
    BrokerChanged,
    PublicEndpointChanged,
    Registration,
    RegistrationLost,
    RegistrationUp,
    RegState,
)
from .actions import Action, SendFrame
from .brokerpath import BrokerPath
from .kinds import BROKER_STREAM, MAIN_SOCKET
from .registration_notes import NatNotes, registration_notice
from .settings import AgentSettings


class BrokerLink:
    def __init__(
        self,
        name: str,
        identity: Identity,
        brokers: list[Endpoint],
        local_endpoints: tuple[Endpoint, ...],
        settings: AgentSettings,
        token: str,
    ) -> None:
        self.name = name
        self.identity = identity
        self.brokers = brokers
        self.settings = settings
        self.token = token
        self.registration = Registration(
            name, local_endpoints, keepalive_interval=settings.keepalive_interval, brokers=len(brokers)
        )
        self.nat = NatNotes()
        self.path = BrokerPath(settings)
        self._endpoint_checked: float | None = None
        self._heard_on = MAIN_SOCKET  # the socket the broker's latest frame came on
        self._raced: float | None = None  # the race (its start) whose other family was asked

    @property
    def broker(self) -> Endpoint:
        return self.brokers[self.registration.broker_index]

    @property
    def registered(self) -> bool:
        return self.registration.state is RegState.REGISTERED

    def race_partner(self) -> int | None:
        """The next broker address of the other family (IPv4 / IPv6), if any."""
        here = ":" in self.broker.host
        count = len(self.brokers)
        for step in range(1, count):
            index = (self.registration.broker_index + step) % count
            if (":" in self.brokers[index].host) != here:
                return index
        return None

    def _unanswered_race(self) -> tuple[float, int] | None:
        """(when it began, the other family's broker) of a registration under way that has
        heard nothing from the broker yet, where there is another family to race."""
        since = self.path.race_since
        if self.registration.state is not RegState.REGISTERING or since is None or self.path.udp_heard:
            return None
        partner = self.race_partner()
        return (since, partner) if partner is not None else None

    def racing_families(self, now: float) -> int | None:
        """The partner a registration goes to as well, once family_race_after has gone by."""
        race = self._unanswered_race()
        if race is None or now - race[0] < self.settings.family_race_after:
            return None
        return race[1]

    def adopt(self, addr: Endpoint) -> bool:
        """A frame from the other family's broker address we raced: it answered first, so
        it is our broker from now on. False if addr is not that address."""
        partner = self.race_partner()
        if self.registration.state is not RegState.REGISTERING or partner is None:
            return False
        if self.brokers[partner] != addr:
            return False
        self.registration.use_broker(partner, f"{addr} answered first (IPv4 and IPv6 raced)")
        return True

    @property
    def socket(self) -> int:
        """The way to the broker that carries our registration (and relayed tunnels)."""
        return self.path.socket

    def receive_mapping(self, message: MappingReply, addr: Endpoint, socket: int, now: float) -> bool:
        """The probe port's answer (NAT type), or the main port's to our UDP question while
        the TCP stream carries us: UDP works again, so register over it (the stream closes
        once UDP is answered)."""
        if addr == self.broker and socket == MAIN_SOCKET:
            if self.path.udp_answered(now):
                self.registration.reannounce(now)
            return True
        return self.nat.receive(message, addr)

    def heard(self, socket: int) -> None:
        """A frame from the broker came on this socket (before the registration reads it)."""
        self._heard_on = socket
        self.path.heard(socket)

    def stream_opened(self, now: float) -> None:
        self.path.stream_opened()
        self.registration.retry_now(now)  # register over it at once
        self.registration.handle_timer(now)

    def stream_closed(self, reason: str, now: float) -> None:
        if self.path.stream_closed(reason, now):
            self.registration.transport_lost(f"TCP stream to the broker closed: {reason}", now)

    def check_endpoint(self, now: float) -> list[SendFrame]:
        """Ask the broker where it sees us (a tunnel went quiet), at most this often: the
        keepalive to send now."""
        last = self._endpoint_checked
        if not self.registered or (last is not None and now - last < self.settings.endpoint_check_interval):
            return []
        self._endpoint_checked = now
        self.registration.check_endpoint(now)
        self.registration.handle_timer(now)
        return [f for m in self.registration.frames_to_send() for f in self.frames(m)]

    def service(self, now: float, *, listening: bool) -> tuple[list[Action], bool]:
        """Frames to send and notices to tell; True if our public endpoint moved."""
        out: list[Action] = []
        reg, nat = self.registration, self.nat
        out += [SendFrame(MAIN_SOCKET, nat.target, frames.encode(m)) for m in nat.frames_to_send()]
        learned = nat.learned()
        if learned is not None:
            out.append(learned)
            if reg.nat != nat.kind.value:
                reg.update(nat=nat.kind.value, now=now)
        if reg.state is RegState.REGISTERING:
            self.path.racing(now)
        partner = self.racing_families(now)
        for message in reg.frames_to_send():
            sent = self.frames(message)  # stamped (and a register signed) once
            out += sent
            if partner is not None and isinstance(message, Register):  # RFC 8305: race it
                out.append(replace(sent[0], addr=self.brokers[partner], socket=MAIN_SOCKET))
        moved = False
        while (event := reg.next_event()) is not None:
            if isinstance(event, RegistrationUp):
                self.path.registered_on(self._heard_on, self.broker, now)
            elif isinstance(event, BrokerChanged):
                self.path.changed_broker(now)
            elif isinstance(event, RegistrationLost):
                self.path.racing(now)
            out.append(registration_notice(event, self.name, self.broker, self.brokers, listening))
            if self.path.socket != BROKER_STREAM:  # the probe port measures a UDP mapping
                nat.on_registration(event, reg, self.broker, now)
            moved = moved or isinstance(event, PublicEndpointChanged)
        out += self.path.actions()
        return out, moved

    def frames(self, message: Message) -> list[SendFrame]:
        """A frame for the broker, stamped, on each way it goes now (both while racing):
        frames carry its latest cookie; a register also carries our key, the token and a
        signature over all of it."""
        cookie = self.registration.cookie
        if isinstance(message, Register):
            message = replace(
                message, public_key=self.identity.public_key, cookie=cookie, token=self.token or None
            )
            message = replace(message, signature=self.identity.sign_register(message))
        elif isinstance(message, ConnectRequest) or (
            isinstance(message, Keepalive) and message.cookie is None
        ):
            message = replace(message, cookie=cookie)  # a keepalive answering a challenge has its own
        data = frames.encode(message)
        return [SendFrame(socket, self.broker, data) for socket in self.path.sockets()]

    def _family_race_at(self) -> float | None:
        """When the registration under way goes to the other family's address as well."""
        race = self._unanswered_race()
        if race is None or race[0] == self._raced:
            return None
        return race[0] + self.settings.family_race_after

    def get_timer(self) -> list[float | None]:
        timers = [self.registration.get_timer(), self.nat.get_timer(), self.path.get_timer()]
        return [*timers, self._family_race_at()]

    def handle_timer(self, now: float) -> None:
        race = self._family_race_at()
        if race is not None and now >= race:
            self._raced = self.path.race_since  # once per race: now, not at the next backoff
            self.registration.retry_now(now)
        self.registration.handle_timer(now)
        self.nat.handle_timer(now)
        self.path.handle_timer(now, self.broker)
