"""Our standing with the broker: registration, the NAT-type probe that follows it, how
frames to the broker are stamped, and the "where do you see us" check a quiet tunnel asks
for. Pure: it returns frames and notices, and says when our public endpoint moved."""

from __future__ import annotations

from dataclasses import replace

from .. import frames
from ..endpoints import Endpoint
from ..frames import ConnectRequest, Keepalive, MappingReply, Message, Register
from ..identity import Identity
from ..registration import PublicEndpointChanged, Registration, RegState
from .actions import Action, SendFrame
from .kinds import MAIN_SOCKET
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
        self._endpoint_checked: float | None = None

    @property
    def broker(self) -> Endpoint:
        return self.brokers[self.registration.broker_index]

    @property
    def registered(self) -> bool:
        return self.registration.state is RegState.REGISTERED

    def receive_mapping(self, message: MappingReply, addr: Endpoint) -> bool:
        return self.nat.receive(message, addr)

    def check_endpoint(self, now: float) -> list[SendFrame]:
        """Ask the broker where it sees us (a tunnel went quiet), at most this often: the
        keepalive to send now."""
        last = self._endpoint_checked
        if not self.registered or (last is not None and now - last < self.settings.endpoint_check_interval):
            return []
        self._endpoint_checked = now
        self.registration.check_endpoint(now)
        self.registration.handle_timer(now)
        return [self.frame(m) for m in self.registration.frames_to_send()]

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
        out += [self.frame(m) for m in reg.frames_to_send()]
        moved = False
        while (event := reg.next_event()) is not None:
            out.append(registration_notice(event, self.name, self.broker, self.brokers, listening))
            nat.on_registration(event, reg, self.broker, now)
            moved = moved or isinstance(event, PublicEndpointChanged)
        return out, moved

    def frame(self, message: Message) -> SendFrame:
        """A frame for the broker, stamped: frames carry its latest cookie; a register also
        carries our key, the token and a signature over all of it."""
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
        return SendFrame(MAIN_SOCKET, self.broker, frames.encode(message))

    def get_timer(self) -> list[float | None]:
        return [self.registration.get_timer(), self.nat.get_timer()]

    def handle_timer(self, now: float) -> None:
        self.registration.handle_timer(now)
        self.nat.handle_timer(now)
