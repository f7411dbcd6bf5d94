"""The broker's decisions, free of I/O: what to answer to each frame, given the registry.

The service looks records up (memory now, Redis in a fleet), calls these methods, stores
what they return and sends the datagrams. The broker is never on the data path.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass

from .cookies import CookieJar
from .endpoints import Endpoint
from .frames import (
    Challenge,
    ConnectOffer,
    ConnectRequest,
    Error,
    ErrorCode,
    Keepalive,
    Message,
    Punch,
    Register,
    Registered,
    encode,
)
from .identity import fingerprint, verify_register
from .ratelimit import RateLimiter
from .registry import PeerRecord
from .tokens import TokenList

Outgoing = tuple[Message, Endpoint]


@dataclass(frozen=True)
class Admission:
    """Whether a frame may touch any state; if not, maybe one small reply, and why."""

    ok: bool
    reply: Message | None = None
    reason: str = ""


ADMITTED = Admission(ok=True)


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

    def __init__(
        self,
        broker_id: str,
        keepalive_s: int,
        *,
        cookies: CookieJar | None = None,
        tokens: TokenList | None = None,
        per_ip: RateLimiter | None = None,
        per_identity: RateLimiter | None = None,
        punch_delay_ms: int = 0,
    ) -> None:
        self.broker_id = broker_id
        self.keepalive_s = keepalive_s
        self.cookies = cookies or CookieJar()
        self.tokens = tokens
        self.per_ip = per_ip if per_ip is not None else RateLimiter(rate=200, burst=400)
        self.per_identity = per_identity if per_identity is not None else RateLimiter(rate=20, burst=40)
        self.punch_delay_ms = punch_delay_ms
        self.probe_port: int | None = None  # set when the broker serves mapping queries
        self.relay = False  # set when the broker relays sessions it introduced

    def admit(self, message: Message, addr: Endpoint, size: int, now: float) -> Admission:
        """Rate-limit every source; demand a valid cookie before any state is touched.

        An unvalidated source gets at most one reply, a Challenge no larger than its request,
        so the broker cannot be used to amplify traffic towards a spoofed address.
        """
        if not self.per_ip.allow(addr.host, now):
            return Admission(ok=False, reason="rate_limited_ip")
        if not isinstance(message, Register | Keepalive | ConnectRequest):
            return Admission(ok=False, reason="unexpected_type")
        if self.cookies.valid(message.cookie, addr, now):
            return ADMITTED
        challenge = Challenge(self.cookies.issue(addr, now))
        if len(encode(challenge)) > size:
            return Admission(ok=False, reason="unvalidated_small")
        return Admission(ok=False, reply=challenge, reason="unvalidated")

    def on_register(self, msg: Register, addr: Endpoint, now: float) -> tuple[PeerRecord | None, Message]:
        """Check the key proof, the token list and the identity's rate; build the record.

        Whether the name is free for this key is the registry's to say (``name_taken``).
        """
        if msg.public_key is None or not verify_register(msg):
            return None, Error(ErrorCode.BAD_SIGNATURE, "register frame is not signed by its key")
        print_ = fingerprint(msg.public_key)
        if self.tokens is not None and not self.tokens.admits(msg.name, print_, msg.token):
            text = f"{msg.name} ({print_}) may not register here: no matching token"
            return None, Error(ErrorCode.NOT_AUTHORIZED, text)
        if not self.per_identity.allow(f"name:{msg.name}", now):
            return None, Error(ErrorCode.RATE_LIMITED, "too many registrations; slow down")
        record = PeerRecord(
            name=msg.name,
            public=addr,
            locals=msg.locals,
            listening=msg.listening,
            last_seen=now,
            broker_id=self.broker_id,
            public_key=msg.public_key,
            nat=msg.nat,
        )
        return record, self.registered(msg.name, addr, now, listening=msg.listening)

    def name_taken(self, msg: Register, owner: str) -> Error:
        text = f"name {msg.name!r} is bound to {owner}; this key is {fingerprint(msg.public_key or b'')}"
        return Error(ErrorCode.NAME_TAKEN, text)

    def on_keepalive(self, msg: Keepalive, addr: Endpoint, known: bool, now: float) -> Message:
        """``known``: the registry holds msg.name at exactly addr (and has refreshed it)."""
        if not known:
            return Error(ErrorCode.NOT_REGISTERED, f"{msg.name} is not registered here")
        return self.registered(msg.name, addr, now)

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
        if not self.per_identity.allow(f"connect:{msg.peer_from}", now):
            return ConnectDecision(
                refusal=(Error(ErrorCode.RATE_LIMITED, "too many connect requests", rid), addr)
            )

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
            peer_key=peer.public_key,
            peer_nat=peer.nat,
            relay=self.relay,
        )

    def registered(self, name: str, addr: Endpoint, now: float, listening: bool | None = None) -> Registered:
        cookie = self.cookies.issue(addr, now)
        return Registered(
            name,
            addr,
            self.keepalive_s,
            self.broker_id,
            listening=listening,
            cookie=cookie,
            probe_port=self.probe_port,
        )
