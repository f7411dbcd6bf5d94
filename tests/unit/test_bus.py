"""The replicas' bus messages: typed, round-tripped, bounded, and never a crash."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natter_proto import bus
from natter_proto.endpoints import Endpoint

INTRO = bus.Introduce(
    "r1", "alice", "req-1", Endpoint("203.0.113.7", 4000), (b"\x1e" + b"f" * 40,), "0123456789abcdef", "bob"
)
MESSAGES: list[bus.BusMessage] = [
    INTRO,
    bus.Ack("alice", "req-1"),
    bus.RelayBatch(tuple(bus.RelayItem("bob", bytes(8), b"p" * n) for n in (1, 700, 1500))),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.KIND)
def test_round_trip(message: bus.BusMessage) -> None:
    assert bus.decode(bus.encode(message)) == message


def test_the_wire_form_is_the_map_replicas_spoke_before() -> None:
    """Replicas of the previous version publish and read these maps: a fleet upgrades one
    replica at a time."""
    old = {
        "kind": "introduce",
        "origin": "r1",
        "requester": "alice",
        "request_id": "req-1",
        "to": ["203.0.113.7", 4000],
        "frames": [b"\x1e" + b"f" * 40],
        "session": "0123456789abcdef",
        "target": "bob",
    }
    assert bus.decode(msgpack.packb(old, use_bin_type=True)) == INTRO
    assert msgpack.unpackb(bus.encode(INTRO), raw=False) == old


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "nope"},
        {"kind": "ack", "requester": "bad name!", "request_id": "r"},
        {"kind": "ack", "requester": "alice"},
        {
            "kind": "introduce",
            "origin": "r1",
            "requester": "alice",
            "request_id": "r",
            "to": ["bob", 1],
            "frames": [],
            "session": "s",
            "target": "bob",
        },
        {
            "kind": "introduce",
            "origin": "r1",
            "requester": "alice",
            "request_id": "r",
            "to": ["1.2.3.4", 1],
            "frames": [b"x" * 5000],
            "session": "s",
            "target": "bob",
        },
        {"kind": "relay", "items": [["bob", b"short", b"p"]]},
        {"kind": "relay", "items": [["bob", bytes(8), b"p" * 1501]]},
        {"kind": "relay", "items": [["bob", bytes(8), b"p"]] * 41},
        [1, 2, 3],
    ],
)
def test_bad_messages_are_refused(body: object) -> None:
    with pytest.raises(bus.BusError):
        bus.decode(msgpack.packb(body, use_bin_type=True))


def test_oversized_and_non_msgpack_input_is_refused() -> None:
    for data in (b"\xc1", b"", b"x" * (bus.MAX_BUS_MESSAGE + 1)):
        with pytest.raises(bus.BusError):
            bus.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_give_a_message_or_a_bus_error(data: bytes) -> None:
    with contextlib.suppress(bus.BusError):
        bus.decode(data)
