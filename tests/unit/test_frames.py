"""Codec: every message round-trips; every class of malformed frame raises FrameError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natter_proto import frames
from natter_proto.endpoints import Endpoint
from natter_proto.frames import FrameError

E1 = Endpoint("203.0.113.7", 40000)
E2 = Endpoint("192.168.1.2", 40000)

SAMPLES: list[frames.Message] = [
    frames.Register(name="bob", locals=(E2,), listening=True, public_key=b"k" * 32),
    frames.Register(name="alice"),
    frames.Registered(name="bob", public=E1, keepalive_s=20, broker_id="b1"),
    frames.Keepalive(name="bob"),
    frames.ConnectRequest(request_id="r1", peer_from="alice", peer_to="bob", target="localhost:22"),
    frames.ConnectOffer(request_id="r1", session_id="s1", peer_from="alice", target="localhost:22"),
    frames.Punch("r1", "s1", "bob", E1, (E2,), "client", 0),
    frames.Error("unknown_peer", "peer 'carol' is unknown", "r1"),
    frames.Error("not_registered", "register first"),
    frames.Probe("s1", "alice", 7),
    frames.ProbeAck("s1", "bob", 7, E1),
    frames.Punch("r1", "s1", "bob", Endpoint("2001:db8::1", 5), (), "server", 25, b"k" * 32, "hard"),
    frames.MappingQuery(pad=b"\0" * 48),
    frames.MappingReply(E1),
    frames.Registered("bob", E1, 20, "b1", listening=True, cookie=b"c" * 20, probe_port=10001),
    frames.Register(name="bob", nat="easy"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(message: frames.Message) -> None:
    data = frames.encode(message)
    assert data[0] == frames.PREFIX
    assert data[0] < 0x40 and data[0] > 0x03  # never QUIC, never STUN
    assert frames.decode(data) == message


def raw(body: object) -> bytes:
    return bytes([frames.PREFIX]) + msgpack.packb(body, use_bin_type=True)


def base(**fields: object) -> dict[str, object]:
    return {"v": 1, "t": "keepalive", "name": "bob", **fields}


MALFORMED = {
    "empty": b"",
    "quic_first_byte": b"\xc0" + b"\x00" * 20,
    "stun_first_byte": b"\x00\x01\x00\x00",
    "too_large": bytes([frames.PREFIX]) + b"\x00" * 1300,
    "not_msgpack": bytes([frames.PREFIX]) + b"\xc1\xc1",
    "truncated": raw(base())[:-2],
    "trailing_garbage": raw(base()) + b"\x00",
    "not_a_map": raw([1, "keepalive"]),
    "no_version": raw({"t": "keepalive", "name": "bob"}),
    "wrong_version": raw(base(v=2)),
    "version_as_string": raw(base(v="1")),
    "unknown_type": raw(base(t="launch_missiles")),
    "type_not_string": raw(base(t=3)),
    "missing_field": raw({"v": 1, "t": "keepalive"}),
    "unknown_field": raw(base(extra=1)),
    "int_map_key": raw({1: 1, "v": 1, "t": "keepalive", "name": "bob"}),
    "name_wrong_type": raw(base(name=5)),
    "name_invalid": raw(base(name="bob smith")),
    "name_too_long": raw(base(name="b" * 65)),
    "name_with_nul": raw(base(name="bo\x00b")),
    "string_too_long": raw({"v": 1, "t": "error", "code": "x", "message": "m" * 600}),
    "bool_not_int": raw({"v": 1, "t": "probe", "session_id": "s", "sender": "a", "nonce": True}),
    "negative_int": raw({"v": 1, "t": "probe", "session_id": "s", "sender": "a", "nonce": -1}),
    "float_not_int": raw({"v": 1, "t": "probe", "session_id": "s", "sender": "a", "nonce": 1.5}),
    "endpoint_not_list": raw(
        {
            "v": 1,
            "t": "registered",
            "name": "b",
            "public": "1.2.3.4:5",
            "keepalive_s": 1,
            "broker_id": "x",
        }
    ),
    "endpoint_bad_ip": raw(
        {
            "v": 1,
            "t": "registered",
            "name": "b",
            "public": ["example.com", 5],
            "keepalive_s": 1,
            "broker_id": "x",
        }
    ),
    "endpoint_bad_port": raw(
        {
            "v": 1,
            "t": "registered",
            "name": "b",
            "public": ["1.2.3.4", 70000],
            "keepalive_s": 1,
            "broker_id": "x",
        }
    ),
    "endpoint_port_string": raw(
        {
            "v": 1,
            "t": "registered",
            "name": "b",
            "public": ["1.2.3.4", "5"],
            "keepalive_s": 1,
            "broker_id": "x",
        }
    ),
    "too_many_endpoints": raw({"v": 1, "t": "register", "name": "b", "locals": [["1.2.3.4", 5]] * 17}),
    "bytes_too_long": raw({"v": 1, "t": "register", "name": "b", "public_key": b"k" * 300}),
    "bool_wrong_type": raw({"v": 1, "t": "register", "name": "b", "listening": 1}),
    "bad_nat": raw({"v": 1, "t": "register", "name": "b", "nat": "medium"}),
    "bad_role": raw(
        {
            "v": 1,
            "t": "punch",
            "request_id": "r",
            "session_id": "s",
            "peer": "b",
            "peer_public": ["1.2.3.4", 5],
            "peer_locals": [],
            "role": "admin",
        }
    ),
    "empty_request_id": raw(
        {
            "v": 1,
            "t": "connect",
            "request_id": "",
            "peer_from": "a",
            "peer_to": "b",
            "target": "x:1",
        }
    ),
    "ext_type": bytes([frames.PREFIX])
    + msgpack.packb({"v": 1, "t": "keepalive", "name": msgpack.ExtType(1, b"x")}),
    "deep_nesting": bytes([frames.PREFIX]) + b"\x91" * 1000 + b"\x00",
    # found by the atheris harness: unknown keys of both kinds once made sorting them crash
    "unknown_keys_str_and_bytes": raw({"v": 1, "t": "keepalive", "name": "a", "x": 1, b"y": 2}),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_raise_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError) as info:
        frames.decode(data)
    assert info.value.code and info.value.reason


def test_version_mismatch_is_reported_with_reason_and_request_id() -> None:
    data = raw({"v": 9, "t": "connect", "request_id": "r42"})
    with pytest.raises(FrameError) as info:
        frames.decode(data)
    assert info.value.code == frames.ErrorCode.VERSION_MISMATCH
    assert "speaks 1" in info.value.reason
    assert info.value.request_id == "r42"


def test_unknown_type_is_reported() -> None:
    with pytest.raises(FrameError) as info:
        frames.decode(raw(base(t="teleport")))
    assert info.value.code == frames.ErrorCode.UNKNOWN_TYPE


def test_ipv4_mapped_endpoint_is_normalised() -> None:
    body = {
        "v": 1,
        "t": "registered",
        "name": "b",
        "public": ["::ffff:1.2.3.4", 5],
        "keepalive_s": 1,
        "broker_id": "x",
    }
    message = frames.decode(raw(body))
    assert isinstance(message, frames.Registered)
    assert message.public == Endpoint("1.2.3.4", 5)


def test_encode_refuses_oversized_frames() -> None:
    with pytest.raises(FrameError):
        frames.encode(frames.Error("x", "m" * 2000))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1400))
def test_decode_never_raises_anything_but_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        frames.decode(bytes([frames.PREFIX]) + data)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(frames.MESSAGE_TYPES)),
    st.dictionaries(st.text(max_size=12), json_like, max_size=6),
)
def test_structured_garbage_never_escapes(kind: str, fields: dict[str, object]) -> None:
    body = {"v": 1, "t": kind, **fields}
    with contextlib.suppress(FrameError):
        frames.decode(raw(body))
