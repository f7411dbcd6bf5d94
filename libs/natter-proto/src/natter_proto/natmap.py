"""How the agent's NAT maps: ask a second broker address where it sees us.

If the broker's probe port sees the same public endpoint as its main port, the NAT maps
endpoint-independently ("easy": a peer can punch to the endpoint the broker saw). If not,
the mapping depends on the destination ("hard", symmetric): the peer must guess ports or
use a relay. Pure: the agent sends what ``frames_to_send`` returns to ``target``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .endpoints import Endpoint
from .frames import MappingQuery, MappingReply, Message

QUERY_PAD = 48  # makes the query at least as large as the reply
ATTEMPTS = 4
INTERVAL = 0.5


def mapping_query() -> MappingQuery:
    """Where do you see me? Padded to QUERY_PAD, so that no answer is larger."""
    return MappingQuery(pad=b"\0" * QUERY_PAD)


@dataclass(frozen=True)
class NatLearned:
    kind: str  # "easy", "hard" or "unknown"
    seen_by_probe: Endpoint | None


def classify(public: Endpoint, seen_by_probe: Endpoint) -> str:
    return "easy" if public == seen_by_probe else "hard"


class NatProbe:
    def __init__(self, public: Endpoint, target: Endpoint, now: float) -> None:
        self.public = public
        self.target = target
        self.result: NatLearned | None = None
        self._sent = 0
        self._next = now
        self._outbox: list[Message] = []

    def handle_timer(self, now: float) -> None:
        if self.result is not None or now < self._next:
            return
        if self._sent >= ATTEMPTS:
            self.result = NatLearned("unknown", None)
            return
        self._outbox.append(mapping_query())
        self._sent += 1
        self._next = now + INTERVAL

    def receive(self, message: MappingReply) -> None:
        if self.result is None:
            self.result = NatLearned(classify(self.public, message.observed), message.observed)

    def get_timer(self) -> float | None:
        return None if self.result is not None else self._next

    def frames_to_send(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out
