"""Registration's events as notices, and the NAT-type probe that follows a registration."""

from __future__ import annotations

from ..endpoints import Endpoint
from ..frames import MappingReply, Message
from ..natmap import NatProbe
from ..registration import (
    BrokerChanged,
    PublicEndpointChanged,
    RegEvent,
    Registration,
    RegistrationLost,
    RegistrationRefused,
    RegistrationUp,
)
from .actions import Level, Notice, NoticeKind
from .kinds import NatKind

NAT_WORDS = {
    NatKind.EASY: "NAT maps endpoint-independently (easy to punch)",
    NatKind.HARD: "NAT maps per destination (symmetric: hard to punch)",
    NatKind.UNKNOWN: "NAT type unknown (the broker's probe port did not answer)",
}


def registration_notice(
    event: RegEvent, name: str, broker: Endpoint, brokers: list[Endpoint], listening: bool
) -> Notice:
    if isinstance(event, RegistrationUp):
        return Notice(
            NoticeKind.REGISTERED,
            Level.INFO,
            f"registered as {name} at {broker}",
            {
                "public_endpoint": str(event.public),
                "broker": str(broker),
                "broker_id": event.broker_id,
                "listening": listening,
            },
        )
    if isinstance(event, PublicEndpointChanged):
        return Notice(
            NoticeKind.ENDPOINT_CHANGED,
            Level.WARNING,
            "public endpoint changed",
            {"old": str(event.old), "new": str(event.new)},
        )
    if isinstance(event, RegistrationLost):
        return Notice(
            NoticeKind.REGISTRATION_LOST,
            Level.WARNING,
            "lost the broker, registering again",
            {"reason": event.reason},
        )
    if isinstance(event, BrokerChanged):
        return Notice(
            NoticeKind.BROKER_CHANGED,
            Level.WARNING,
            f"moving to broker {brokers[event.index]}",
            {"reason": event.reason},
        )
    assert isinstance(event, RegistrationRefused)
    return Notice(
        NoticeKind.REGISTRATION_REFUSED,
        Level.ERROR,
        "broker refused registration",
        {"code": event.code, "reason": event.message},
    )


class NatNotes:
    """Asks the broker's probe port where it sees us (same endpoint: an easy NAT), after
    each registration and each move of our public endpoint."""

    def __init__(self) -> None:
        self.probe: NatProbe | None = None
        self.kind = NatKind.UNKNOWN
        self._reported = False

    @property
    def pending(self) -> bool:
        """Asking, and the answer not reported: a first connect waits a little for it."""
        return self.probe is not None and not self._reported

    @property
    def target(self) -> Endpoint:
        assert self.probe is not None
        return self.probe.target

    def on_registration(self, event: RegEvent, reg: Registration, broker: Endpoint, now: float) -> None:
        if isinstance(event, PublicEndpointChanged):
            self._reported = False
        if not isinstance(event, RegistrationUp | PublicEndpointChanged):
            return
        if reg.public is None or reg.probe_port is None:
            return
        target = Endpoint(broker.host, reg.probe_port)
        probe = self.probe
        if probe is not None and probe.public == reg.public and probe.target == target:
            return  # already asked (or asking) for this mapping
        self.probe = NatProbe(reg.public, target, now)
        self._reported = False

    def receive(self, message: MappingReply, addr: Endpoint) -> bool:
        if self.probe is None or addr != self.probe.target:
            return False
        self.probe.receive(message)
        return True

    def frames_to_send(self) -> list[Message]:
        return self.probe.frames_to_send() if self.probe is not None else []

    def learned(self) -> Notice | None:
        """The answer, once: a notice to log (and ``kind`` is set)."""
        probe = self.probe
        if probe is None or probe.result is None or self._reported:
            return None
        self._reported = True
        self.kind = NatKind.parse(probe.result.kind)
        seen = probe.result.seen_by_probe
        return Notice(
            NoticeKind.NAT_LEARNED,
            Level.INFO,
            NAT_WORDS[self.kind],
            {
                "nat": self.kind.value,
                "seen_by_broker": str(probe.public),
                "seen_by_probe": str(seen) if seen else None,
            },
        )

    def get_timer(self) -> float | None:
        return self.probe.get_timer() if self.probe is not None else None

    def handle_timer(self, now: float) -> None:
        if self.probe is not None:
            self.probe.handle_timer(now)
