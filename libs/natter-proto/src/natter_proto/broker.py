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
class ConnectPlan:
    """The datagrams that introduce two peers, and the session id they share."""

    session_id: str
    outgoing: list[Outgoing]


class RecentSessions:
    """Remembers recent connect request ids so that a retried request gets the same session."""

    def __init__(self, ttl: float = 30.0, capacity: int = 10_000) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._sessions: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def session_for(self, peer: str, request_id: str, now: float) -> str:
        key = (peer, request_id)
        self._evict(now)
        found = self._sessions.get(key)
        if found is not None:
            return found[0]
        session_id = secrets.token_hex(8)
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


class BrokerCore:
    """Answers registrations and keepalives, and turns connect requests into punch instructions."""

    def __init__(self, broker_id: str, keepalive_s: int, punch_delay_ms: int = 0) -> None:
        self.broker_id = broker_id
        self.keepalive_s = keepalive_s
        self.punch_delay_ms = punch_delay_ms
        self.sessions = RecentSessions()

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
        return record, self._registered(record)

    def on_keepalive(
        self, msg: Keepalive, addr: Endpoint, record: PeerRecord | None, now: float
    ) -> tuple[PeerRecord | None, Message]:
        """A keepalive refreshes a record only from the endpoint that registered it."""
        if record is None or record.public != addr:
            return None, Error(ErrorCode.NOT_REGISTERED, f"{msg.name} is not registered here")
        record = record.seen(now)
        return record, self._registered(record)

    def on_connect(
        self,
        msg: ConnectRequest,
        addr: Endpoint,
        requester: PeerRecord | None,
        target: PeerRecord | None,
        now: float,
        ttl: float,
    ) -> list[Outgoing]:
        rid = msg.request_id
        if requester is None or requester.public != addr or requester.name != msg.peer_from:
            text = f"{msg.peer_from} is not registered here; register first"
            return [(Error(ErrorCode.NOT_REGISTERED, text, rid), addr)]
        if msg.peer_to == msg.peer_from:
            return [(Error(ErrorCode.SELF_CONNECT, "cannot connect to yourself", rid), addr)]
        if target is None:
            text = f"peer {msg.peer_to!r} is unknown to this broker"
            return [(Error(ErrorCode.UNKNOWN_PEER, text, rid), addr)]
        if target.expired(now, ttl):
            silent = int(now - target.last_seen)
            text = f"peer {msg.peer_to!r} is offline (silent for {silent} s)"
            return [(Error(ErrorCode.PEER_OFFLINE, text, rid), addr)]
        if not target.listening:
            text = f"peer {msg.peer_to!r} is online but not accepting forwards (-listen)"
            return [(Error(ErrorCode.NOT_LISTENING, text, rid), addr)]
        return self.plan_connect(msg, requester, target, now).outgoing

    def plan_connect(
        self, msg: ConnectRequest, requester: PeerRecord, target: PeerRecord, now: float
    ) -> ConnectPlan:
        """Offer to the target, and a punch instruction to both sides at the same moment.

        The target becomes the QUIC server: it listens, so its mapping is the one that has
        been kept open longest; the initiator opens the QUIC connection.
        """
        session_id = self.sessions.session_for(requester.name, msg.request_id, now)
        offer = ConnectOffer(msg.request_id, session_id, requester.name, msg.target)
        to_requester = self._punch(msg.request_id, session_id, target, "client")
        to_target = self._punch(msg.request_id, session_id, requester, "server")
        return ConnectPlan(
            session_id,
            [(offer, target.public), (to_target, target.public), (to_requester, requester.public)],
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

    def _registered(self, record: PeerRecord) -> Registered:
        return Registered(record.name, record.public, self.keepalive_s, self.broker_id)
