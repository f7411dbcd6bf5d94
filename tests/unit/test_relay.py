"""Relay frames and the broker's relay table."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natter_proto.relay import (
    RELAY_PREFIX,
    RelayFrameError,
    RelaySession,
    RelayTable,
    decode_relay,
    encode_relay,
    session_key,
)


def test_relay_frame_round_trip_and_rejects() -> None:
    key = session_key("0011223344556677")
    frame = encode_relay(key, b"\xc0quic packet")
    assert frame[0] == RELAY_PREFIX < 0x40 and decode_relay(frame) == (key, b"\xc0quic packet")
    for bad in (b"", bytes([RELAY_PREFIX]) + key, b"\x1e" + key + b"x", frame + b"x" * 2000):
        with pytest.raises(RelayFrameError):
            decode_relay(bad)
    for bad_id in ("zz", "00", "0011223344556677aa"):
        with pytest.raises(RelayFrameError):
            session_key(bad_id)


@given(st.binary(max_size=1600))
def test_relay_decoder_only_raises_its_own_error(data: bytes) -> None:
    with contextlib.suppress(RelayFrameError):
        decode_relay(data)


def test_relay_table_limits_and_parties() -> None:
    table = RelayTable(max_bytes=100, max_seconds=10, capacity=2)
    key = session_key("00" * 8)
    table.allow(key, RelaySession("alice", "bob", created=0.0))
    assert table.charge(key, "alice", 60, 1.0) == ("bob", "")
    assert table.charge(key, "bob", 30, 1.0) == ("alice", "")
    assert table.charge(key, "bob", 30, 1.0) == (None, "relay_byte_limit")
    assert table.charge(key, "mallory", 1, 1.0) == (None, "relay_not_a_party")
    assert table.charge(session_key("11" * 8), "alice", 1, 1.0) == (None, "relay_unknown_session")
    assert table.charge(key, "alice", 1, 11.0) == (None, "relay_expired")
    for i in range(3):
        table.allow(session_key(f"{i:016x}"), RelaySession("a", "b", created=float(i)))
    assert len(table) == 2  # bounded: the oldest made room


def test_punch_instructions_offer_the_relay_only_when_the_broker_relays() -> None:
    from natter_proto.broker import BrokerCore
    from natter_proto.endpoints import Endpoint
    from natter_proto.frames import ConnectRequest
    from natter_proto.registry import PeerRecord

    a = PeerRecord("alice", Endpoint("203.0.113.1", 1), (), True, 0.0, "b1")
    b = PeerRecord("bob", Endpoint("203.0.113.2", 2), (), True, 0.0, "b1")
    core = BrokerCore("b1", keepalive_s=20)
    request = ConnectRequest("r1", "alice", "bob", "x:1")
    off = core.on_connect(request, a.public, a, b, 1.0, 60, "00" * 8).introduction
    assert off is not None and off.to_requester.relay is False
    core.relay = True
    on = core.on_connect(request, a.public, a, b, 1.0, 60, "00" * 8).introduction
    assert on is not None and on.to_requester.relay is True
