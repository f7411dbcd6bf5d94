"""The broker's decisions, free of I/O: what to answer to each frame, given the registry.

The service looks records up (memory now, Redis in a fleet), calls these methods, stores
what they return and sends the datagrams. The broker is never on the data path.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass

from .endpoints import Endpoint
from .frames import (
    ConnectOffer,
    ConnectRequest,
    Error,
    ErrorCode,
    Keepalive,
    Message,
    Punch,
    Register,
    Registered,
)
from .registry import PeerRecord

Outgoing = tuple[Message, Endpoint]


@dataclass(frozen=True)
class Introduction:
    """What introduces two peers: frames for the target (from the replica that owns it) and
    the punch instruction for the requester (from the replica it talks to)."""

    session_id: str
    target: PeerRecord
    to_target: tuple[Message, ...]
    requester: PeerRecord
    to_requester: Punch


@dataclass(frozen=True)
class ConnectDecision:
    """Either a refusal for the requester or an introduction."""

    refusal: Outgoing | None = None
    introduction: Introduction | None = None


class RecentSessions:
    """Remembers recent connect request ids so that a retried request gets the same session.

    The in-memory form of what a fleet keeps in Redis (``SET ... NX``).
    """

    def __init__(self, ttl: float = 30.0, capacity: int = 10_000) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._sessions: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def session_for(self, peer: str, request_id: str, now: float, candidate: str = "") -> str:
        key = (peer, request_id)
        self._evict(now)
        found = self._sessions.get(key)
        if found is not None:
            return found[0]
        session_id = candidate or new_session_id()
        self._sessions[key] = (session_id, now)
        while len(self._sessions) > self.capacity:
            self._sessions.popitem(last=False)
        return session_id

    def _evict(self, now: float) -> None:
        while self._sessions:
            _, (_, created) = next(iter(self._sessions.items()))
            if now - created <= self.ttl:
                break
            self._sessions.popitem(last=False)


def new_session_id() -> str:
    return secrets.token_hex(8)


class BrokerCore:
    """Answers registrations and keepalives, and turns connect requests into punch instructions."""

    def __init__(self, broker_id: str, keepalive_s: int, punch_delay_ms: int = 0) -> None:
        self.broker_id = broker_id
        self.keepalive_s = keepalive_s
        self.punch_delay_ms = punch_delay_ms

    def on_register(self, msg: Register, addr: Endpoint, now: float) -> tuple[PeerRecord, Message]:
        record = PeerRecord(
            name=msg.name,
            public=addr,
            locals=msg.locals,
            listening=msg.listening,
            last_seen=now,
            broker_id=self.broker_id,
            public_key=msg.public_key,
        )
        reply = Registered(msg.name, addr, self.keepalive_s, self.broker_id, listening=msg.listening)
        return record, reply

    def on_keepalive(self, msg: Keepalive, addr: Endpoint, known: bool) -> Message:
        """``known``: the registry holds msg.name at exactly addr (and has refreshed it)."""
        if not known:
            return Error(ErrorCode.NOT_REGISTERED, f"{msg.name} is not registered here")
        return self.registered(msg.name, addr)

    def on_connect(
        self,
        msg: ConnectRequest,
        addr: Endpoint,
        requester: PeerRecord | None,
        target: PeerRecord | None,
        now: float,
        ttl: float,
        session_id: str,
    ) -> ConnectDecision:
        rid = msg.request_id

        def refuse(code: str, text: str) -> ConnectDecision:
            return ConnectDecision(refusal=(Error(code, text, rid), addr))

        if requester is None or requester.public != addr or requester.name != msg.peer_from:
            return refuse(ErrorCode.NOT_REGISTERED, f"{msg.peer_from} is not registered here")
        if msg.peer_to == msg.peer_from:
            return refuse(ErrorCode.SELF_CONNECT, "cannot connect to yourself")
        if target is None:
            return refuse(ErrorCode.UNKNOWN_PEER, f"peer {msg.peer_to!r} is unknown to this broker")
        if target.expired(now, ttl):
            silent = int(now - target.last_seen)
            return refuse(ErrorCode.PEER_OFFLINE, f"peer {msg.peer_to!r} is offline (silent {silent} s)")
        if not target.listening:
            text = f"peer {msg.peer_to!r} is online but not accepting forwards (-listen)"
            return refuse(ErrorCode.NOT_LISTENING, text)
        return ConnectDecision(introduction=self.introduce(msg, requester, target, session_id))

    def introduce(
        self, msg: ConnectRequest, requester: PeerRecord, target: PeerRecord, session_id: str
    ) -> Introduction:
        """An offer and a punch instruction for the target, a punch instruction for the requester.

        The target becomes the QUIC server: it listens, so its mapping is the one that has
        been kept open longest; the initiator opens the QUIC connection.
        """
        offer = ConnectOffer(msg.request_id, session_id, requester.name, msg.target)
        return Introduction(
            session_id=session_id,
            target=target,
            to_target=(offer, self._punch(msg.request_id, session_id, requester, "server")),
            requester=requester,
            to_requester=self._punch(msg.request_id, session_id, target, "client"),
        )

    def _punch(self, request_id: str, session_id: str, peer: PeerRecord, role: str) -> Punch:
        return Punch(
            request_id=request_id,
            session_id=session_id,
            peer=peer.name,
            peer_public=peer.public,
            peer_locals=peer.locals,
            role=role,
            delay_ms=self.punch_delay_ms,
        )

    def registered(self, name: str, addr: Endpoint) -> Registered:
        return Registered(name, addr, self.keepalive_s, self.broker_id)
