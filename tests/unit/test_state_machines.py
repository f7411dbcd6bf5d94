"""The sans-IO machines driven directly: time is a number, frames are values."""

from __future__ import annotations

import random
from dataclasses import replace

from natter_proto.backoff import Backoff
from natter_proto.broker import BrokerCore, RecentSessions
from natter_proto.connect import ConnectAnswered, ConnectAttempt, ConnectFailed, ConnectState
from natter_proto.endpoints import Endpoint
from natter_proto.frames import (
    Challenge,
    ConnectOffer,
    ConnectRequest,
    Error,
    ErrorCode,
    Goaway,
    Keepalive,
    Probe,
    ProbeAck,
    Punch,
    Register,
    Registered,
    encode,
)
from natter_proto.identity import Identity
from natter_proto.punch import PathFound, PunchSession, PunchState, PunchTimedOut
from natter_proto.ratelimit import RateLimiter
from natter_proto.registration import (
    BrokerChanged,
    PublicEndpointChanged,
    Registration,
    RegistrationLost,
    RegistrationRefused,
    RegistrationUp,
    RegState,
)
from natter_proto.registry import PeerRecord, PeerTable
from natter_proto.tokens import TokenList

PUB = Endpoint("203.0.113.1", 4000)
PUB_BOB = Endpoint("198.51.100.2", 5000)
LAN_BOB = Endpoint("192.168.2.2", 5000)


def no_jitter(initial: float, maximum: float) -> Backoff:
    return Backoff(initial=initial, maximum=maximum, jitter=0, rng=random.Random(1))


# -- registration -------------------------------------------------------------------
def test_registration_retries_with_backoff_until_answered() -> None:
    reg = Registration("alice", (), backoff=no_jitter(0.5, 4.0), keepalive_interval=20)
    reg.start(0.0)
    assert reg.frames_to_send() == [Register(name="alice", locals=(), listening=False)]
    sent_at = []
    now = 0.0
    while now < 12:
        now = reg.get_timer()  # type: ignore[assignment]
        reg.handle_timer(now)
        if reg.frames_to_send():
            sent_at.append(now)
    assert sent_at[:5] == [0.5, 1.5, 3.5, 7.5, 11.5]  # 0.5, 1, 2, 4, 4 (capped)
    assert reg.state is RegState.REGISTERING


def test_registration_keepalive_cycle_and_loss() -> None:
    reg = Registration("alice", (), backoff=no_jitter(0.5, 4.0), keepalive_interval=20)
    reg.start(0.0)
    reg.frames_to_send()
    assert reg.receive(Registered("alice", PUB, 20, "b1"), 0.1)
    event = reg.next_event()
    assert isinstance(event, RegistrationUp) and event.public == PUB
    assert reg.get_timer() == 20.1
    reg.handle_timer(20.1)
    assert reg.frames_to_send() == [Keepalive(name="alice")]
    reg.receive(Registered("alice", PUB, 20, "b1"), 20.2)
    assert reg.next_event() is None
    # the broker falls silent: the keepalive due at 40.1 goes unanswered, and so do its
    # two retries a quarter interval apart; three quarters of an interval after it the
    # registration is lost and restarts (1.75 intervals after the last answer, not two)
    now = 20.2
    sent = []
    while reg.state is RegState.REGISTERED:
        now = reg.get_timer()  # type: ignore[assignment]
        reg.handle_timer(now)
        if reg.state is RegState.REGISTERED:
            assert reg.frames_to_send() == [Keepalive(name="alice")]
            sent.append(now)
    assert sent == [40.1, 45.1, 50.1] and now == 55.1
    assert isinstance(reg.next_event(), RegistrationLost)
    assert Register(name="alice", locals=(), listening=False) in reg.frames_to_send()


def test_an_answer_to_a_retried_keepalive_keeps_the_regular_schedule() -> None:
    """One keepalive lost on the way costs a retry, not the registration."""
    reg = Registration("alice", (), keepalive_interval=20)
    reg.start(0.0)
    reg.frames_to_send()
    reg.receive(Registered("alice", PUB, 20, "b1"), 0.1)
    reg.next_event()
    reg.handle_timer(20.1)  # lost on the way
    reg.handle_timer(25.1)  # the retry, answered
    assert len(reg.frames_to_send()) == 2
    reg.receive(Registered("alice", PUB, 20, "b1"), 25.2)
    assert reg.state is RegState.REGISTERED and reg.next_event() is None
    assert reg.get_timer() == 40.1  # the next regular keepalive, as if none had been lost


def test_registration_notices_public_endpoint_change_and_broker_amnesia() -> None:
    reg = Registration("alice", (), keepalive_interval=20)
    reg.start(0.0)
    reg.receive(Registered("alice", PUB, 20, "b1"), 0.1)
    reg.next_event()
    reg.receive(Registered("alice", Endpoint("203.0.113.1", 4001), 20, "b1"), 20.1)
    assert isinstance(reg.next_event(), PublicEndpointChanged)
    reg.frames_to_send()
    reg.handle_timer(40.0)  # our keepalive: the broker's answer says it forgot us
    assert isinstance(reg.frames_to_send()[0], Keepalive)
    reg.receive(Error(ErrorCode.NOT_REGISTERED, "who?"), 40.1)
    assert isinstance(reg.next_event(), RegistrationLost)
    assert reg.state is RegState.REGISTERING
    assert isinstance(reg.frames_to_send()[0], Register)


def test_registration_refused_and_listening_update() -> None:
    reg = Registration("alice", ())
    reg.start(0.0)
    reg.frames_to_send()
    reg.receive(Error(ErrorCode.VERSION_MISMATCH, "v2 only"), 0.1)
    assert reg.next_event() == RegistrationRefused(ErrorCode.VERSION_MISMATCH, "v2 only")
    reg.update(listening=True, now=0.2)
    assert reg.frames_to_send() == [Register(name="alice", locals=(), listening=True)]
    reg.receive(Registered("alice", PUB, 20, "b"), 0.3)
    assert isinstance(reg.next_event(), RegistrationUp)
    reg.update(listening=False, now=1.0)
    assert reg.state is RegState.REGISTERING  # until the broker acknowledges the change
    assert not reg.receive(Registered("mallory", PUB, 20, "b"), 0.3)


# -- connect attempt --------------------------------------------------------------------
def punch_for(request_id: str, role: str = "client") -> Punch:
    return Punch(request_id, "s1", "bob", PUB_BOB, (LAN_BOB,), role)


def test_connect_attempt_retries_then_gets_punch() -> None:
    attempt = ConnectAttempt("r1", "alice", "bob", "localhost:22", 0.0, backoff=no_jitter(0.5, 2))
    first = attempt.frames_to_send()
    assert first == [ConnectRequest("r1", "alice", "bob", "localhost:22")]
    attempt.handle_timer(attempt.get_timer())  # type: ignore[arg-type]
    assert attempt.frames_to_send() == first  # same request id: the broker dedups
    attempt.receive(punch_for("other"))
    assert attempt.state is ConnectState.WAITING
    attempt.receive(punch_for("r1"))
    assert attempt.next_event() == ConnectAnswered(punch_for("r1"))
    assert attempt.get_timer() is None


def test_connect_attempt_error_and_timeout() -> None:
    attempt = ConnectAttempt("r1", "alice", "carol", "x:1", 0.0)
    attempt.receive(Error(ErrorCode.UNKNOWN_PEER, "who is carol", "r1"))
    assert attempt.next_event() == ConnectFailed(ErrorCode.UNKNOWN_PEER, "who is carol")
    slow = ConnectAttempt("r2", "alice", "bob", "x:1", 0.0, deadline=3.0)
    while slow.get_timer() is not None:
        slow.handle_timer(slow.get_timer())  # type: ignore[arg-type]
    event = slow.next_event()
    assert isinstance(event, ConnectFailed) and event.code == "timeout"


# -- punch session ------------------------------------------------------------------------
def test_punch_probes_every_candidate_until_answered() -> None:
    session = PunchSession("alice", punch_for("r1"), 10.0, interval=0.075, timeout=5.0)
    assert session.candidates == [PUB_BOB, LAN_BOB]
    session.handle_timer(10.0)
    out = session.frames_to_send()
    assert [addr for _, addr, _ in out] == [PUB_BOB, LAN_BOB]
    assert all(isinstance(m, Probe) and m.session_id == "s1" and src == 0 for m, _, src in out)
    assert session.get_timer() == 10.075
    session.handle_timer(10.075)
    assert len(session.frames_to_send()) == 2
    # bob's probe reaches us: we answer it at the exact source
    source = Endpoint("198.51.100.2", 5001)
    session.receive(Probe("s1", "bob", 3), source, 10.08)
    ((ack, to, _),) = session.frames_to_send()
    assert ack == ProbeAck("s1", "alice", 3, source) and to == source
    assert session.knows(source)
    # the answer to our second probe wins the path
    session.receive(ProbeAck("s1", "bob", 2, PUB), PUB_BOB, 10.1)
    event = session.next_event()
    assert isinstance(event, PathFound) and event.path == PUB_BOB
    assert abs(event.rtt - 0.025) < 1e-9
    assert session.state is PunchState.SUCCEEDED and session.get_timer() is None


def test_punch_ignores_strangers_and_unknown_nonces() -> None:
    session = PunchSession("alice", punch_for("r1"), 0.0)
    session.handle_timer(0.0)
    session.frames_to_send()
    session.receive(ProbeAck("s1", "mallory", 1, PUB), PUB_BOB, 0.01)
    session.receive(ProbeAck("s1", "bob", 99, PUB), PUB_BOB, 0.01)
    session.receive(Probe("s1", "mallory", 1), PUB_BOB, 0.01)
    assert session.next_event() is None and session.frames_to_send() == []
    assert session.state is PunchState.PROBING


def test_punch_times_out_after_deadline_and_honours_delay() -> None:
    punch = Punch("r1", "s1", "bob", PUB_BOB, (), "client", delay_ms=200)
    session = PunchSession("alice", punch, 0.0, interval=0.1, timeout=1.0)
    assert session.get_timer() == 0.2
    probes = 0
    while session.get_timer() is not None:
        session.handle_timer(session.get_timer())  # type: ignore[arg-type]
        probes += len(session.frames_to_send())
    assert probes == 10
    assert isinstance(session.next_event(), PunchTimedOut)


def test_punch_succeed_by_quic() -> None:
    session = PunchSession("bob", punch_for("r1", "server"), 0.0)
    session.succeed(PUB)
    assert session.state is PunchState.SUCCEEDED and session.path == PUB


# -- broker -------------------------------------------------------------------------------
def record(name: str, public: Endpoint, now: float = 0.0, listening: bool = True) -> PeerRecord:
    return PeerRecord(name, public, (), listening, now, "b1")


def signed_register(identity: Identity, core: BrokerCore, addr: Endpoint, **kw: object) -> Register:
    unsigned = Register(
        name=str(kw.get("name", "bob")),
        locals=(LAN_BOB,),
        listening=True,
        public_key=identity.public_key,
        cookie=core.cookies.issue(addr, 1.0),
        token=kw.get("token"),  # type: ignore[arg-type]
    )
    return replace(unsigned, signature=identity.sign_register(unsigned))


def test_broker_register_and_keepalive() -> None:
    core = BrokerCore("b1", keepalive_s=20)
    bob = Identity.generate()
    msg = signed_register(bob, core, PUB_BOB)
    assert core.admit(msg, PUB_BOB, 200, 1.0).ok
    rec, reply = core.on_register(msg, PUB_BOB, 1.0)
    assert isinstance(reply, Registered) and reply.public == PUB_BOB and reply.listening is True
    assert reply.cookie is not None and core.cookies.valid(reply.cookie, PUB_BOB, 1.0)
    assert rec is not None and rec.locals == (LAN_BOB,) and rec.listening and rec.broker_id == "b1"
    assert rec.public_key == bob.public_key
    ok = core.on_keepalive(Keepalive("bob"), PUB_BOB, known=True, now=5.0)
    assert isinstance(ok, Registered) and ok.cookie is not None
    err = core.on_keepalive(Keepalive("bob"), PUB, known=False, now=5.0)
    assert isinstance(err, Error) and err.code == ErrorCode.NOT_REGISTERED


def test_broker_refuses_forged_and_unauthorized_registrations() -> None:
    tokens = TokenList.parse("bob s3cret\n")
    core = BrokerCore("b1", keepalive_s=20, tokens=tokens)
    bob, mallory = Identity.generate(), Identity.generate()
    good = signed_register(bob, core, PUB_BOB, token="s3cret")
    assert core.on_register(good, PUB_BOB, 1.0)[0] is not None
    forged = replace(good, public_key=mallory.public_key)  # signature no longer matches
    record, reply = core.on_register(forged, PUB_BOB, 1.0)
    assert record is None and isinstance(reply, Error) and reply.code == ErrorCode.BAD_SIGNATURE
    tampered = replace(good, listening=False)
    assert core.on_register(tampered, PUB_BOB, 1.0)[0] is None
    no_token = signed_register(bob, core, PUB_BOB)
    record, reply = core.on_register(no_token, PUB_BOB, 1.0)
    assert record is None and isinstance(reply, Error) and reply.code == ErrorCode.NOT_AUTHORIZED
    by_key = BrokerCore("b1", keepalive_s=20, tokens=TokenList.parse(f"{bob.fingerprint} t0k\n"))
    assert by_key.on_register(signed_register(bob, by_key, PUB_BOB, name="anyname", token="t0k"), PUB_BOB, 1)[
        0
    ]
    taken = core.name_taken(good, mallory.fingerprint)
    assert taken.code == ErrorCode.NAME_TAKEN and mallory.fingerprint in taken.message


def test_admission_demands_a_cookie_and_never_amplifies() -> None:
    core = BrokerCore("b1", keepalive_s=20)
    bob = Identity.generate()
    unsigned = Register(name="bob", public_key=bob.public_key)
    request = replace(unsigned, signature=bob.sign_register(unsigned))
    size = len(encode(request))
    verdict = core.admit(request, PUB_BOB, size, 1.0)
    assert not verdict.ok and isinstance(verdict.reply, Challenge)
    assert len(encode(verdict.reply)) <= size
    assert core.cookies.valid(verdict.reply.cookie, PUB_BOB, 1.0)
    tiny = Keepalive("b")  # smaller than a challenge: no reply at all
    verdict = core.admit(tiny, PUB_BOB, len(encode(tiny)), 1.0)
    assert not verdict.ok and verdict.reply is None
    # a cookie is bound to its address and expires
    cookie = core.cookies.issue(PUB_BOB, 1.0)
    assert core.admit(Keepalive("bob", cookie=cookie), PUB_BOB, 50, 2.0).ok
    assert not core.admit(Keepalive("bob", cookie=cookie), PUB, 50, 2.0).ok
    assert not core.admit(Keepalive("bob", cookie=cookie), PUB_BOB, 50, 1.0 + 121).ok
    # replies to other frame types never go to unvalidated sources
    assert core.admit(Probe("s", "x", 1), PUB_BOB, 500, 3.0).reply is None


def test_admission_rate_limits_per_source_ip() -> None:
    core = BrokerCore("b1", keepalive_s=20, per_ip=RateLimiter(rate=10, burst=5))
    cookie = core.cookies.issue(PUB_BOB, 1.0)
    verdicts = [core.admit(Keepalive("bob", cookie=cookie), PUB_BOB, 50, 1.0) for _ in range(8)]
    assert [v.ok for v in verdicts] == [True] * 5 + [False] * 3
    assert verdicts[-1].reason == "rate_limited_ip"
    assert core.admit(Keepalive("bob", cookie=cookie), PUB_BOB, 50, 1.5).ok  # refilled


def test_broker_introduces_both_sides_at_once() -> None:
    core = BrokerCore("b1", keepalive_s=20)
    alice, bob = record("alice", PUB), record("bob", PUB_BOB)
    req = ConnectRequest("r1", "alice", "bob", "localhost:22")
    decision = core.on_connect(req, PUB, alice, bob, 1.0, ttl=60, session_id="s9")
    intro = decision.introduction
    assert decision.refusal is None and intro is not None
    offer, to_bob = intro.to_target
    assert isinstance(offer, ConnectOffer) and offer.session_id == "s9"
    assert isinstance(to_bob, Punch) and intro.target.public == PUB_BOB
    assert to_bob.role == "server" and to_bob.peer == "alice" and to_bob.peer_public == PUB
    to_alice = intro.to_requester
    assert intro.requester.public == PUB
    assert to_alice.role == "client" and to_alice.peer_public == PUB_BOB
    assert to_alice.session_id == to_bob.session_id == "s9"


def test_broker_connect_errors() -> None:
    core = BrokerCore("b1", keepalive_s=20)
    alice = record("alice", PUB)
    req = ConnectRequest("r1", "alice", "bob", "x:1")

    def code(requester: PeerRecord | None, target: PeerRecord | None, addr: Endpoint = PUB) -> str:
        decision = core.on_connect(req, addr, requester, target, 100.0, ttl=60, session_id="s")
        assert decision.introduction is None and decision.refusal is not None
        msg, to = decision.refusal
        assert isinstance(msg, Error) and to == addr and msg.request_id == "r1"
        return msg.code

    assert code(None, record("bob", PUB_BOB)) == ErrorCode.NOT_REGISTERED
    assert code(alice, record("bob", PUB_BOB), Endpoint("6.6.6.6", 1)) == ErrorCode.NOT_REGISTERED
    assert code(alice, None) == ErrorCode.UNKNOWN_PEER
    assert code(alice, record("bob", PUB_BOB, now=10.0)) == ErrorCode.PEER_OFFLINE
    assert code(alice, record("bob", PUB_BOB, now=99.0, listening=False)) == ErrorCode.NOT_LISTENING
    self_req = ConnectRequest("r2", "alice", "alice", "x:1")
    decision = core.on_connect(self_req, PUB, alice, alice, 100.0, ttl=60, session_id="s")
    assert decision.refusal is not None and decision.refusal[0].code == ErrorCode.SELF_CONNECT  # type: ignore[attr-defined]


def test_registration_fails_over_between_brokers() -> None:
    reg = Registration("alice", (), backoff=no_jitter(0.5, 4.0), keepalive_interval=10, brokers=3)
    reg.start(0.0)
    assert reg.broker_index == 0
    reg.frames_to_send()
    now = 0.0
    while reg.broker_index == 0:  # three unanswered registrations move us on
        now = reg.get_timer()  # type: ignore[assignment]
        reg.handle_timer(now)
    assert reg.frames_to_send() == [Register(name="alice", locals=(), listening=False)]
    assert reg.next_event() == BrokerChanged(1, "no answer to 3 registrations")
    reg.receive(Registered("alice", PUB, 10, "b2"), now)
    assert isinstance(reg.next_event(), RegistrationUp)
    # broker 1 falls silent for two keepalive intervals: move to broker 2
    while reg.broker_index == 1:
        now = reg.get_timer()  # type: ignore[assignment]
        reg.handle_timer(now)
        reg.frames_to_send()
    assert reg.broker_index == 2 and reg.state is RegState.REGISTERING
    events = [reg.next_event(), reg.next_event()]
    assert isinstance(events[0], BrokerChanged) and isinstance(events[1], RegistrationLost)


def test_goaway_moves_to_the_next_broker_at_once() -> None:
    reg = Registration("alice", (), keepalive_interval=10, brokers=2)
    reg.start(0.0)
    reg.frames_to_send()
    reg.receive(Registered("alice", PUB, 10, "b1"), 0.1)
    reg.next_event()
    reg.receive(Goaway("broker shutting down"), 3.0)
    assert reg.broker_index == 1 and reg.state is RegState.REGISTERING
    assert reg.frames_to_send() == [Register(name="alice", locals=(), listening=False)]
    assert isinstance(reg.next_event(), BrokerChanged)
    single = Registration("bob", (), keepalive_interval=10)
    single.start(0.0)
    single.frames_to_send()
    single.receive(Registered("bob", PUB, 10, "b1"), 0.1)
    single.receive(Goaway("bye"), 1.0)
    assert single.broker_index == 0 and isinstance(single.frames_to_send()[0], Register)


def test_peer_table_marks_offline_then_forgets() -> None:
    table = PeerTable(ttl=60, forget_after=600)
    table.put(record("bob", PUB_BOB, now=0.0))
    assert table.expire(100.0) == []
    assert table.get("bob") is not None and table.get("bob").expired(100.0, 60)  # type: ignore[union-attr]
    assert table.expire(601.0) == ["bob"]
    assert len(table) == 0


def test_recent_sessions_dedup_and_eviction() -> None:
    recent = RecentSessions(ttl=30, capacity=3)
    first = recent.session_for("alice", "r1", 0.0)
    assert recent.session_for("alice", "r1", 10.0) == first
    assert recent.session_for("bob", "r1", 10.0) != first
    assert recent.session_for("alice", "r1", 31.0) != first  # expired
    for i in range(10):
        recent.session_for("x", f"r{i}", 40.0)
    assert len(recent._sessions) == 3


def test_stale_register_answer_does_not_acknowledge_a_listening_change() -> None:
    reg = Registration("bob", ())
    reg.start(0.0)
    reg.frames_to_send()
    reg.update(listening=True, now=0.01)
    reg.receive(Registered("bob", PUB, 20, "b1", listening=False), 0.02)  # answers the first
    assert reg.state is RegState.REGISTERING and reg.next_event() is None
    reg.receive(Registered("bob", PUB, 20, "b1", listening=True), 0.03)
    assert isinstance(reg.next_event(), RegistrationUp)


def test_nat_probe_classifies_and_gives_up() -> None:
    from natter_proto.frames import MappingQuery, MappingReply
    from natter_proto.natmap import ATTEMPTS, NatProbe, classify

    target = Endpoint("203.0.113.9", 10001)
    probe = NatProbe(PUB, target, 0.0)
    probe.handle_timer(0.0)
    (query,) = probe.frames_to_send()
    assert isinstance(query, MappingQuery)
    # the query is never smaller than the answer: the probe port cannot amplify
    assert len(frames_encode(query)) >= len(frames_encode(MappingReply(Endpoint("255.255.255.255", 65535))))
    probe.receive(MappingReply(Endpoint("203.0.113.1", 4999)))
    assert probe.result is not None and probe.result.kind == "hard" and probe.get_timer() is None
    assert classify(PUB, PUB) == "easy"
    silent = NatProbe(PUB, target, 0.0)
    sent = 0
    while silent.get_timer() is not None:
        silent.handle_timer(silent.get_timer())  # type: ignore[arg-type]
        sent += len(silent.frames_to_send())
    assert sent == ATTEMPTS and silent.result is not None and silent.result.kind == "unknown"


def test_registration_reports_its_nat_type() -> None:
    reg = Registration("bob", ())
    reg.start(0.0)
    reg.frames_to_send()
    reg.receive(Registered("bob", PUB, 20, "b1", listening=False, probe_port=10001), 0.1)
    reg.next_event()
    assert reg.probe_port == 10001
    reg.update(nat="hard", now=0.5)
    (again,) = reg.frames_to_send()
    assert isinstance(again, Register) and again.nat == "hard" and reg.state is RegState.REGISTERING


def frames_encode(message: object) -> bytes:
    from natter_proto import frames as f

    return f.encode(message)  # type: ignore[arg-type]


def test_birthday_method_hard_side_opens_many_mappings() -> None:
    punch = Punch("r1", "s1", "bob", PUB_BOB, (), "server", peer_nat="easy")
    session = PunchSession("alice", punch, 0.0, interval=0.1, sources=4)
    session.handle_timer(0.0)
    out = session.frames_to_send()
    assert sorted(src for _, addr, src in out if addr == PUB_BOB) == [0, 1, 2, 3]
    session.handle_timer(0.1)  # extra sockets re-probe only every few ticks
    assert [src for _, _, src in session.frames_to_send()] == [0]
    # the easy side's spray reaches extra socket 2: it is answered from that socket
    source = Endpoint("198.51.100.2", 40404)
    session.receive(Probe("s1", "bob", 1), source, 0.15, source=2)
    ((ack, to, src),) = session.frames_to_send()
    assert isinstance(ack, ProbeAck) and to == source and src == 2
    assert session.knows(source, 2) and not session.knows(source, 0)


def test_birthday_method_easy_side_sprays_within_budget() -> None:
    punch = Punch("r1", "s1", "bob", PUB_BOB, (), "client", peer_nat="hard")
    session = PunchSession(
        "alice", punch, 0.0, interval=0.1, spray=100, spray_per_tick=48, rng=random.Random(5)
    )
    ports: list[int] = []
    now = 0.0
    for _ in range(4):
        session.handle_timer(now)
        ports += [addr.port for _, addr, _ in session.frames_to_send() if addr != PUB_BOB]
        now += 0.1
    assert len(ports) == 100 == len(set(ports))  # the budget, each port once
    assert all(1024 <= p < 65536 for p in ports)
    hit = Endpoint(PUB_BOB.host, ports[7])
    session.receive(ProbeAck("s1", "bob", 1, PUB), hit, 0.35)
    event = session.next_event()
    assert isinstance(event, PathFound) and event.path == hit and event.source == 0


def test_peer_reflexive_candidates_are_probed() -> None:
    session = PunchSession("alice", punch_for("r1"), 0.0, interval=0.1)
    session.handle_timer(0.0)
    session.frames_to_send()
    elsewhere = Endpoint(PUB_BOB.host, 61000)  # the peer's NAT used another port towards us
    session.receive(Probe("s1", "bob", 1), elsewhere, 0.05)
    session.frames_to_send()
    session.handle_timer(0.1)
    assert elsewhere in [addr for _, addr, _ in session.frames_to_send()]


def test_a_moved_address_is_reported_after_the_cookie_challenge_too() -> None:
    """From a new address the old cookie no longer passes: the broker challenges, the agent
    asks again with the challenge's cookie, the broker does not know it there, the agent
    registers again, and the new endpoint is still reported as a change."""
    reg = Registration("alice", (), keepalive_interval=20)
    reg.start(0.0)
    reg.frames_to_send()
    reg.receive(Registered("alice", PUB, 20, "b1"), 0.1)
    reg.next_event()
    reg.check_endpoint(5.0)  # a tunnel went silent: ask now, not at 20.1
    assert reg.get_timer() == 5.0
    reg.handle_timer(5.0)
    assert reg.frames_to_send() == [Keepalive(name="alice")]
    reg.receive(Challenge(cookie=b"c" * 16), 5.1)
    assert reg.frames_to_send() == [Keepalive(name="alice", cookie=b"c" * 16)]
    reg.receive(Error(ErrorCode.NOT_REGISTERED, "alice is not registered here"), 5.15)
    assert isinstance(reg.next_event(), RegistrationLost)
    reg.frames_to_send()
    moved = Endpoint("203.0.113.1", 50001)
    reg.receive(Registered("alice", moved, 20, "b1"), 5.2)
    assert isinstance(reg.next_event(), RegistrationUp)
    event = reg.next_event()
    assert isinstance(event, PublicEndpointChanged) and event.old == PUB and event.new == moved


def test_a_listener_without_a_tunnel_says_so_once_and_the_client_hears_it() -> None:
    """NoTunnel: a restarted listener answers a re-punch's first probe with it (once per
    session); the client's session reports it, only from a path it knows."""
    from natter_proto.frames import NoTunnel, decode
    from natter_proto.punch import PeerLostTunnel

    a, b = Endpoint("203.0.113.1", 4000), Endpoint("203.0.113.2", 5000)
    server = PunchSession(
        "bob", Punch("r", "0123456789abcdef", "alice", a, (), "server"), 0.0, no_tunnel=True
    )
    client = PunchSession("alice", Punch("r", "0123456789abcdef", "bob", b, (), "client"), 0.0)
    for nonce in (1, 2):
        server.receive(Probe("0123456789abcdef", "alice", nonce), a, 0.1)
    sent = [m for m, _, _ in server.frames_to_send()]
    assert [type(m).__name__ for m in sent] == ["ProbeAck", "NoTunnel", "ProbeAck"]
    told = decode(encode(sent[1]))
    assert told == NoTunnel("0123456789abcdef", "bob")
    client.receive(told, Endpoint("198.51.100.9", 1), 0.2)  # from nowhere it probed: ignored
    assert client.next_event() is None
    client.receive(told, b, 0.2)
    client.receive(told, b, 0.3)
    assert client.next_event() == PeerLostTunnel() and client.next_event() is None
