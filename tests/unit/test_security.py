"""Identity, cookies, tokens, ACLs and the registration's challenge handling; and every
decoder fuzzed: nothing but the decoder's own error may escape."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natter.specs import SpecError, parse_spec
from natter_agent.keystore import parse_known_peers
from natter_proto import streamhdr
from natter_proto.acl import (
    AclError,
    PeerAllowList,
    TargetAllowList,
    parse_peer_rule,
    parse_target_rule,
)
from natter_proto.cookies import CookieJar
from natter_proto.endpoints import Endpoint
from natter_proto.frames import Challenge, Error, ErrorCode, Keepalive, Register, Registered
from natter_proto.identity import (
    Identity,
    fingerprint,
    register_signing_bytes,
    valid_fingerprint,
    verify_register,
)
from natter_proto.ratelimit import RateLimiter
from natter_proto.registration import Registration, RegistrationLost, RegistrationUp, RegState
from natter_proto.tokens import TokenList, TokenListError

ADDR = Endpoint("198.51.100.7", 40000)


def test_fingerprints_are_short_stable_and_validated() -> None:
    identity = Identity.generate()
    print_ = identity.fingerprint
    assert print_ == fingerprint(identity.public_key) and valid_fingerprint(print_)
    assert len(print_) == 30 and print_.startswith("nt1-")
    assert not valid_fingerprint("nt1-short") and not valid_fingerprint(print_.upper())
    assert Identity.generate().fingerprint != print_


def test_register_signature_covers_every_field() -> None:
    identity = Identity.generate()
    unsigned = Register(name="bob", listening=True, public_key=identity.public_key, cookie=b"c" * 20)
    signed = replace(unsigned, signature=identity.sign_register(unsigned))
    assert verify_register(signed)
    for changed in (
        replace(signed, name="bobby"),
        replace(signed, listening=False),
        replace(signed, cookie=b"d" * 20),
        replace(signed, token="t"),
        replace(signed, locals=(ADDR,)),
        replace(signed, public_key=Identity.generate().public_key),
        replace(signed, signature=b"\0" * 64),
        replace(signed, signature=None),
    ):
        assert not verify_register(changed)
    assert register_signing_bytes(signed) == register_signing_bytes(replace(signed, signature=b"x" * 64))


def test_cookie_jar() -> None:
    jar = CookieJar(window=60)
    cookie = jar.issue(ADDR, 1000.0)
    assert len(cookie) == 20 and jar.valid(cookie, ADDR, 1030.0)
    assert not jar.valid(cookie, Endpoint("198.51.100.7", 40001), 1030.0)
    assert not jar.valid(cookie, ADDR, 1061.0) and not jar.valid(cookie, ADDR, 990.0)
    assert not CookieJar(window=60).valid(cookie, ADDR, 1030.0)  # another broker's secret
    assert not jar.valid(None, ADDR, 1000.0) and not jar.valid(b"x" * 19, ADDR, 1000.0)


def test_rate_limiter_refills_and_bounds_memory() -> None:
    limiter = RateLimiter(rate=2, burst=2, max_keys=3)
    assert [limiter.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("a", 0.5)
    for key in "bcde":
        limiter.allow(key, 1.0)
    assert len(limiter) == 3


def test_token_list_parsing_and_matching() -> None:
    identity = Identity.generate()
    tokens = TokenList.parse(f"# comment\nbob  s3cret\n{identity.fingerprint} k3y # trailing\n\n")
    assert tokens.admits("bob", "nt1-x", "s3cret") and not tokens.admits("bob", "nt1-x", "wrong")
    assert tokens.admits("carol", identity.fingerprint, "k3y") and not tokens.admits("carol", "x", None)
    for bad in ("bob", "bob a b", "b!b tok", "bob " + "t" * 200):
        with pytest.raises(TokenListError):
            TokenList.parse(bad)


def test_acl_rules() -> None:
    assert parse_peer_rule("carol").fingerprint is None
    print_ = Identity.generate().fingerprint
    rule = parse_peer_rule(f"carol={print_}")
    allow = PeerAllowList([rule])
    assert allow.allows("carol", print_) and not allow.allows("carol", "nt1-" + "a" * 26)
    assert not allow.allows("alice", print_) and PeerAllowList(None).allows("anyone", "x")
    for bad in ("bad name", "carol=abc"):
        with pytest.raises(AclError):
            parse_peer_rule(bad)
    default = TargetAllowList(None)
    assert default.allows("localhost", 22, ["127.0.0.1", "::1"])
    assert not default.allows("db", 22, ["10.0.0.5"]) and not default.allows("x", 22, [])
    rules = TargetAllowList([parse_target_rule(r) for r in ("127.0.0.1:2222", "10.0.0.5:*", "8080")])
    assert rules.allows("127.0.0.1", 2222, ["127.0.0.1"]) and not rules.allows(
        "127.0.0.1", 2223, ["127.0.0.1"]
    )
    assert rules.allows("db.lan", 5432, ["10.0.0.5"]) and rules.allows("localhost", 8080, ["127.0.0.1"])
    assert not rules.allows("evil", 8080, ["203.0.113.9"])
    assert TargetAllowList([parse_target_rule("*")]).allows("anything", 1, ["203.0.113.9"])
    for bad in ("", "host:", "99999", "x:70000", ":*"):
        with pytest.raises(AclError):
            parse_target_rule(bad)


def test_registration_answers_a_challenge_and_keeps_the_cookie() -> None:
    reg = Registration("bob", ())
    reg.start(0.0)
    assert reg.frames_to_send()[0].cookie is None  # type: ignore[attr-defined]
    reg.receive(Challenge(b"c" * 20), 0.1)
    (again,) = reg.frames_to_send()
    assert isinstance(again, Register) and again.cookie == b"c" * 20
    reg.receive(Registered("bob", ADDR, 20, "b", listening=False, cookie=b"d" * 20), 0.2)
    assert isinstance(reg.next_event(), RegistrationUp) and reg.cookie == b"d" * 20
    reg.handle_timer(20.2)
    (keepalive,) = reg.frames_to_send()
    assert keepalive.cookie == b"d" * 20  # type: ignore[attr-defined]
    reg.receive(Challenge(b"e" * 20), 20.3)  # the broker restarted with a new secret
    # a challenge proves nothing by itself (anyone can provoke one while our keepalive
    # waits): asked again with its cookie, the broker's answer decides
    assert reg.state is RegState.REGISTERED and reg.next_event() is None
    (probe,) = reg.frames_to_send()
    assert isinstance(probe, Keepalive) and probe.cookie == b"e" * 20
    reg.receive(Error(ErrorCode.NOT_REGISTERED, "bob is not registered here"), 20.35)
    assert reg.state is RegState.REGISTERING and isinstance(reg.next_event(), RegistrationLost)
    assert reg.frames_to_send()[0].cookie == b"e" * 20  # type: ignore[attr-defined]


def test_a_not_registered_error_counts_only_as_the_answer_to_our_keepalive() -> None:
    """Spoofed from the broker's address at a random moment it is ignored (counted); as
    the answer to the keepalive we just sent (the broker restarted) it registers again."""
    reg = Registration("bob", (), keepalive_interval=20)
    reg.start(0.0)
    reg.frames_to_send()
    reg.receive(Registered("bob", ADDR, 20, "b", listening=False, cookie=b"d" * 20), 0.2)
    reg.next_event()
    forged = Error(ErrorCode.NOT_REGISTERED, "bob is not registered here")
    reg.receive(forged, 10.0)
    assert reg.state is RegState.REGISTERED and reg.unbound == {"not_registered_ignored": 1}
    reg.handle_timer(20.2)
    assert isinstance(reg.frames_to_send()[0], Keepalive)
    reg.receive(forged, 20.25)
    assert reg.state is RegState.REGISTERING and isinstance(reg.next_event(), RegistrationLost)


def test_an_unbound_challenge_is_answered_with_a_keepalive_and_then_decided_by_the_broker() -> None:
    reg = Registration("bob", ())
    reg.start(0.0)
    reg.frames_to_send()
    reg.receive(Registered("bob", ADDR, 20, "b", listening=False, cookie=b"d" * 20), 0.2)
    reg.next_event()
    reg.receive(Challenge(b"e" * 20), 10.0)  # no keepalive of ours is waiting for an answer
    assert reg.state is RegState.REGISTERED  # a challenge alone proves nothing (it can be provoked)
    (probe,) = reg.frames_to_send()
    assert isinstance(probe, Keepalive) and probe.cookie == b"e" * 20 and reg.cookie == b"d" * 20
    reg.receive(Error(ErrorCode.NOT_REGISTERED, "bob is not registered here"), 10.1)  # it restarted
    assert reg.state is RegState.REGISTERING and isinstance(reg.next_event(), RegistrationLost)
    assert reg.frames_to_send()[0].cookie == b"e" * 20  # type: ignore[attr-defined]


def test_forged_and_replayed_challenges_do_not_make_a_registered_agent_re_register() -> None:
    """Seen: keepalives spoofed from an agent's public endpoint, with random or replayed
    cookies, made the broker challenge the agent, and each challenge re-registered it. Now a
    challenge is answered with one keepalive (at most one a second) and the registration
    stands; the broker's answer to that keepalive is what counts."""
    reg = Registration("bob", ())
    reg.start(0.0)
    reg.frames_to_send()
    reg.receive(Registered("bob", ADDR, 20, "b", listening=False, cookie=b"d" * 20), 0.2)
    assert isinstance(reg.next_event(), RegistrationUp)
    now = 1.0
    for i in range(20):  # 20 challenges, 50 ms apart
        reg.receive(Challenge(bytes([i]) * 20), now)
        now += 0.05
    assert reg.state is RegState.REGISTERED and reg.next_event() is None
    answers = reg.frames_to_send()
    assert len(answers) == 1 and isinstance(answers[0], Keepalive)
    assert reg.unbound == {"challenge_answered": 1, "challenge_ignored": 19}
    reg.receive(Registered("bob", ADDR, 20, "b", cookie=b"f" * 20), now)  # the broker knows us
    assert reg.state is RegState.REGISTERED and reg.next_event() is None and reg.cookie == b"f" * 20


def test_known_peers_parser_skips_junk() -> None:
    print_ = Identity.generate().fingerprint
    text = f"# header\nbob {print_}\nnot a line\ncarol nt1-short\n{'x' * 5000}\n\x00\nal ice {print_}\n"
    assert parse_known_peers(text) == {"bob": print_}


# -- every decoder, fuzzed ---------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_stream_header_decoder_only_raises_its_own_error(data: bytes) -> None:
    with contextlib.suppress(streamhdr.StreamHeaderError):
        header, _ = streamhdr.split_header(data)
        if header is not None:
            with contextlib.suppress(streamhdr.StreamHeaderError):
                streamhdr.parse_open(header)
            streamhdr.parse_reply(header)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_text_decoders_only_raise_their_own_errors(text: str) -> None:
    with contextlib.suppress(TokenListError):
        TokenList.parse(text)
    parse_known_peers(text)
    with contextlib.suppress(SpecError):
        parse_spec(text)
    with contextlib.suppress(AclError):
        parse_peer_rule(text)
    with contextlib.suppress(AclError):
        parse_target_rule(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.booleans(), st.binary(min_size=20, max_size=20))
def test_register_round_trip_and_signature(name: str, listening: bool, cookie: bytes) -> None:
    from natter_proto import frames

    if not frames.valid_name(name):
        return
    identity = Identity.generate()
    unsigned = Register(name=name, listening=listening, public_key=identity.public_key, cookie=cookie)
    signed = replace(unsigned, signature=identity.sign_register(unsigned))
    decoded = frames.decode(frames.encode(signed))
    assert decoded == signed and verify_register(decoded)  # type: ignore[arg-type]
