"""The pure pieces of UDP and SOCKS forwards: DATAGRAM frames, the flow table, the SOCKS5
handshake, the ``/udp`` ACL form and the refusal kinds in stream replies."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natter_proto import socks, streamhdr, udpframes
from natter_proto.acl import AclError, Proto, TargetAllowList, TargetRule, parse_target_rule
from natter_proto.udpflows import Drop, FlowState, FlowTable

# -- DATAGRAM frames ---------------------------------------------------------------------


def test_udp_frames_round_trip() -> None:
    cases = [
        (
            udpframes.encode_open(7, "localhost:53", b"query"),
            udpframes.UdpFrame(udpframes.Kind.OPEN, 7, b"query", "localhost:53"),
        ),
        (udpframes.encode_data(0xFFFFFFFF, b""), udpframes.UdpFrame(udpframes.Kind.DATA, 0xFFFFFFFF)),
        (udpframes.encode_reply(3, b"answer"), udpframes.UdpFrame(udpframes.Kind.REPLY, 3, b"answer")),
        (udpframes.encode_accepted(3), udpframes.UdpFrame(udpframes.Kind.ACCEPTED, 3)),
        (udpframes.encode_reset(3), udpframes.UdpFrame(udpframes.Kind.RESET, 3)),
        (
            udpframes.encode_refused(3, "target not allowed"),
            udpframes.UdpFrame(udpframes.Kind.REFUSED, 3, reason="target not allowed"),
        ),
    ]
    for raw, frame in cases:
        assert udpframes.decode(raw) == frame
    assert len(udpframes.encode_open(1, "h:1", b"xy")) == udpframes.overhead("h:1") + 2


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x22\x00\x00",
        b"\x00\x00\x00\x00\x01",
        b"\x21\x00\x00\x00\x01",
        b"\x21\x00\x00\x00\x01\x09ab",
        b"\x23\x00\x00\x00\x01x",
        b"\x21\x00\x00\x00\x01\x02\xff\xfe",
        b"\x24\x00\x00\x00\x01" + b"r" * 300,
    ],
    ids=[
        "empty",
        "short",
        "ping-byte",
        "open-no-target",
        "open-cut",
        "accepted-body",
        "not-ascii",
        "long-reason",
    ],
)
def test_malformed_udp_frames_are_rejected(raw: bytes) -> None:
    with pytest.raises(udpframes.UdpFrameError):
        udpframes.decode(raw)


def test_a_target_too_long_for_an_open_frame() -> None:
    with pytest.raises(udpframes.UdpFrameError):
        udpframes.encode_open(1, "h" * 300 + ":1", b"")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_udp_frame_decoder_rejects_only_with_its_error(data: bytes) -> None:
    try:
        frame = udpframes.decode(data)
    except udpframes.UdpFrameError:
        return
    assert frame.kind in udpframes.Kind


# -- the flow table ------------------------------------------------------------------


def test_flows_are_created_once_and_expire_when_idle() -> None:
    table: FlowTable[str] = FlowTable(idle_timeout=60, max_flows=2, queue_limit=2)
    first = table.open("a", 0.0)
    assert first is not None and first.state is FlowState.OPENING
    assert table.open("a", 1.0) is first and first.last_seen == 1.0
    second = table.open("b", 2.0)
    assert second is not None and second.number != first.number
    assert table.by_number(second.number) is second
    assert table.full and table.open("c", 3.0) is None
    assert table.dropped[Drop.TOO_MANY_FLOWS] == 1
    assert table.next_expiry() == 61.0
    assert table.expire(60.5) == [] and table.expire(61.0) == [first]
    assert table.get("a") is None and table.by_number(first.number) is None and len(table) == 1
    assert table.expire(61.9) == [] and table.expire(62.0) == [second]
    assert table.next_expiry() is None


def test_a_flow_queue_is_bounded_and_overflow_counted() -> None:
    table: FlowTable[str] = FlowTable(queue_limit=2)
    flow = table.open("a", 0.0, number=41)
    assert flow is not None and flow.number == 41
    assert table.enqueue(flow, b"1") and table.enqueue(flow, b"2")
    assert not table.enqueue(flow, b"3")
    assert list(flow.queue) == [b"1", b"2"] and table.dropped[Drop.QUEUE_FULL] == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 200)), max_size=80))
def test_the_flow_table_never_outgrows_its_bound(events: list[tuple[int, float]]) -> None:
    table: FlowTable[int] = FlowTable(idle_timeout=30, max_flows=8)
    now = 0.0
    for key, step in events:
        now += step / 10
        table.open(key, now)
        table.expire(now)
        assert len(table) <= 8
        assert all(now - flow.last_seen < 30 for flow in table)


# -- SOCKS5 ----------------------------------------------------------------------------

GREETING = b"\x05\x01\x00"
CONNECT_DOMAIN = b"\x05\x01\x00\x03\x09localhost\x00\x50"


def test_a_socks_connect_in_one_piece() -> None:
    handshake = socks.SocksHandshake()
    step = handshake.receive(GREETING + CONNECT_DOMAIN + b"early")
    assert step.send == b"\x05\x00" and step.target == socks.Target("localhost", 80) and not step.failure
    assert handshake.stage is socks.Stage.CONNECTING and handshake.rest == b"early"
    assert handshake.reply(socks.Reply.SUCCEEDED) == b"\x05\x00\x00\x01" + bytes(6)


def test_a_socks_connect_byte_by_byte_with_a_password() -> None:
    handshake = socks.SocksHandshake(socks.Credentials("ann", "pw"))
    data = b"\x05\x02\x00\x02" + b"\x01\x03ann\x02pw" + b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x16"
    sent, target = b"", None
    for i in range(len(data)):
        step = handshake.receive(data[i : i + 1])
        assert not step.failure
        sent += step.send
        target = step.target or target
    assert sent == b"\x05\x02\x01\x00"
    assert target == socks.Target("::1", 22) and target.spec == "[::1]:22"


@pytest.mark.parametrize(
    ("data", "answer", "why"),
    [
        (b"\x04\x01\x00\x50", b"\x00\x5b" + bytes(6), "not a SOCKS5 greeting"),
        (b"GET / HTTP/1.1\r\n", b"\x00\x5b" + bytes(6), "first byte 0x47"),
        (b"\x05\x00", b"\x05\xff", "offers no methods"),
        (b"\x05\x01\x02", b"\x05\xff", "does not offer no authentication"),
        (
            GREETING + b"\x05\x02\x00\x01" + bytes(6),
            b"\x05\x00" + socks.encode_reply(socks.Reply(0x07)),
            "BIND",
        ),
        (
            GREETING + b"\x05\x03\x00\x01" + bytes(6),
            b"\x05\x00" + socks.encode_reply(socks.Reply(0x07)),
            "UDP_ASSOCIATE",
        ),
        (
            GREETING + b"\x05\x09\x00\x01" + bytes(6),
            b"\x05\x00" + socks.encode_reply(socks.Reply(0x07)),
            "0x09",
        ),
        (
            GREETING + b"\x05\x01\x00\x07\x00",
            b"\x05\x00" + socks.encode_reply(socks.Reply(0x08)),
            "address type",
        ),
        (
            GREETING + b"\x04\x01\x00\x01" + bytes(6),
            b"\x05\x00" + socks.encode_reply(socks.Reply(0x01)),
            "request version",
        ),
        (
            GREETING + b"\x05\x01\x00\x03\x03a b\x00\x50",
            b"\x05\x00" + socks.encode_reply(socks.Reply(0x04)),
            "not a domain name",
        ),
        (
            GREETING + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00",
            b"\x05\x00" + socks.encode_reply(socks.Reply(0x01)),
            "port 0",
        ),
    ],
    ids=[
        "socks4",
        "http",
        "no-methods",
        "auth-only",
        "bind",
        "udp-associate",
        "unknown-command",
        "bad-atyp",
        "bad-version",
        "bad-domain",
        "port-0",
    ],
)
def test_bad_socks_input_gets_its_answer_and_ends(data: bytes, answer: bytes, why: str) -> None:
    handshake = socks.SocksHandshake()
    step = handshake.receive(data)
    assert step.send == answer
    assert why in step.failure and step.target is None
    assert handshake.stage is socks.Stage.CLOSED
    assert handshake.receive(b"more") == socks.Step()  # nothing more is read


def test_a_wrong_password_is_refused() -> None:
    handshake = socks.SocksHandshake(socks.Credentials("ann", "pw"))
    step = handshake.receive(b"\x05\x01\x02\x01\x03ann\x02no")
    assert step.send == b"\x05\x02\x01\x01" and "wrong username or password" in step.failure


def test_a_reply_needs_a_request() -> None:
    with pytest.raises(RuntimeError):
        socks.SocksHandshake().reply(socks.Reply.SUCCEEDED)


def test_refusals_map_to_socks_codes() -> None:
    assert socks.reply_for(streamhdr.Refusal.DENIED) is socks.Reply.NOT_ALLOWED
    assert socks.reply_for(streamhdr.Refusal.REFUSED) is socks.Reply.CONNECTION_REFUSED
    assert socks.reply_for(streamhdr.Refusal.UNREACHABLE) is socks.Reply.HOST_UNREACHABLE
    assert socks.reply_for(streamhdr.Refusal.NO_HOST) is socks.Reply.HOST_UNREACHABLE
    assert socks.reply_for(streamhdr.Refusal.NO_NETWORK) is socks.Reply.NETWORK_UNREACHABLE
    assert all(isinstance(socks.reply_for(r), socks.Reply) for r in streamhdr.Refusal)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 600), st.booleans())
def test_any_socks_input_is_answered_within_bounds(data: bytes, cut: int, password: bool) -> None:
    handshake = socks.SocksHandshake(socks.Credentials("ann", "pw") if password else None)
    sent = 0
    for part in (data[:cut], data[cut:]):
        step = handshake.receive(part)
        sent += len(step.send)
        if step.target is not None:
            assert 0 < step.target.port <= 65535
            handshake.reply(socks.Reply.GENERAL_FAILURE)
    assert sent <= 16
    assert handshake.stage in socks.Stage


# -- the /udp ACL form and refusal kinds --------------------------------------------


def test_allow_target_rules_name_their_protocol() -> None:
    assert parse_target_rule("53/udp") == TargetRule("", 53, Proto.UDP)
    assert parse_target_rule("dns.lan:53/udp") == TargetRule("dns.lan", 53, Proto.UDP)
    assert parse_target_rule("[::1]:*/udp") == TargetRule("::1", None, Proto.UDP)
    assert parse_target_rule("*/tcp") == TargetRule(None, None, Proto.TCP)
    assert parse_target_rule("10.0.0.1:22") == TargetRule("10.0.0.1", 22, Proto.TCP)
    with pytest.raises(AclError, match="53/sctp"):
        parse_target_rule("53/sctp")
    allow = TargetAllowList([parse_target_rule("10.0.0.1:53/udp")])
    assert allow.allows("10.0.0.1", 53, ["10.0.0.1"], Proto.UDP)
    assert not allow.allows("10.0.0.1", 53, ["10.0.0.1"], Proto.TCP)
    default = TargetAllowList(None)
    assert default.allows("localhost", 53, ["127.0.0.1"], Proto.UDP)
    assert default.allows("localhost", 22, ["::1"], Proto.TCP)
    assert not default.allows("10.0.0.1", 53, ["10.0.0.1"], Proto.UDP)


def test_a_stream_refusal_says_why() -> None:
    body, _ = streamhdr.split_header(streamhdr.encode_reply(False, "nope", streamhdr.Refusal.DENIED))
    assert body is not None
    assert streamhdr.parse_reply(body) == streamhdr.ReplyHeader(False, "nope", streamhdr.Refusal.DENIED)
    old, _ = streamhdr.split_header(streamhdr._pack({"v": 1, "ok": False, "error": "x"}))
    assert old is not None and streamhdr.parse_reply(old).why is streamhdr.Refusal.FAILED  # an older peer
    odd, _ = streamhdr.split_header(streamhdr._pack({"v": 1, "ok": False, "why": "martian"}))
    assert odd is not None and streamhdr.parse_reply(odd).why is streamhdr.Refusal.FAILED
    assert streamhdr.refusal_of_errno(errno.ECONNREFUSED) is streamhdr.Refusal.REFUSED
    assert streamhdr.refusal_of_errno(errno.ENETUNREACH) is streamhdr.Refusal.NO_NETWORK
    assert streamhdr.refusal_of_errno(None) is streamhdr.Refusal.UNREACHABLE
    assert streamhdr.refusal_of_errno(errno.EPERM) is streamhdr.Refusal.FAILED
