"""The control stream's frames and the credit ledgers of engines without natter's flow control."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natter_proto import tunnelctl
from natter_proto.tunnelctl import (
    Accept,
    ControlError,
    ControlReader,
    Credit,
    Fin,
    Proof,
    ReceiveCredit,
    SendCredit,
)

WINDOW = 1000
CONNECTION = 4000


def test_frames_round_trip_split_at_any_byte() -> None:
    frames = [
        Proof(os.urandom(32), os.urandom(64), 1 << 20, 8 << 20),
        Accept(1 << 20, 8 << 20),
        Credit({0: 5000, 4: 7000}, 123456),
        Credit({8: 1}),
        Fin(4, 1234),
    ]
    wire = b"".join(tunnelctl.encode(f) for f in frames)
    for cut in range(len(wire) + 1):
        reader = ControlReader()
        assert reader.feed(wire[:cut]) + reader.feed(wire[cut:]) == frames


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff",  # length beyond the bound
        b"\x00\x01\xc1",  # msgpack's reserved byte
        b"\x00\x01\x90",  # an array, not a map
        b"\x00\x08\x81\xa1t\xa5hello",  # unknown type
    ],
)
def test_malformed_frames_raise_only_control_error(body: bytes) -> None:
    with pytest.raises(ControlError):
        ControlReader().feed(body)


def test_fields_are_checked() -> None:
    bad = [
        {"t": "proof", "key": b"k" * 31, "sig": b"s" * 64, "w": 1, "W": 1},
        {"t": "proof", "key": b"k" * 32, "sig": b"s" * 64, "w": 0, "W": 1},
        {"t": "accept", "w": True, "W": 1},
        {"t": "credit", "s": [[1, -1]]},
        {"t": "credit", "s": [[1, 2, 3]]},
        {"t": "credit", "s": [[0, 1]] * (tunnelctl.MAX_CREDIT_ENTRIES + 1)},
        {"t": "credit", "s": [], "c": "many"},
    ]
    for body in bad:
        with pytest.raises(ControlError):
            ControlReader().feed(tunnelctl._pack(body))


def test_a_peer_cannot_park_unbounded_undecoded_bytes() -> None:
    reader = ControlReader()
    with pytest.raises(ControlError):
        for _ in range(10):
            reader.feed(b"\x0f\xff" + b"\x00" * 3000)  # never completes a frame


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_reader_fuzz_raises_nothing_but_control_error(chunks: list[bytes]) -> None:
    reader = ControlReader()
    try:
        for chunk in chunks:
            reader.feed(chunk)
    except ControlError:
        pass


def test_binding_depends_on_both_secrets_and_their_roles() -> None:
    a, b = os.urandom(32), os.urandom(32)
    assert tunnelctl.session_binding(a, b) != tunnelctl.session_binding(b, a)
    assert tunnelctl.session_binding(a, b) != tunnelctl.session_binding(a, os.urandom(32))


def test_send_credit_bounds_each_stream_and_the_connection() -> None:
    credit = SendCredit(WINDOW, 1500)
    assert credit.available(0) == WINDOW
    credit.spend(0, WINDOW)
    assert credit.available(0) == 0
    assert credit.available(4) == 500  # the connection has 500 left
    credit.grant(Credit({0: 1800}, 5000))
    assert credit.available(0) == 800
    credit.grant(Credit({0: 1200}, 2000))  # stale: limits never shrink
    assert credit.available(0) == 800
    credit.grant(Credit({12: 99999}))  # a stream we never sent on: ignored
    assert credit.available(12) == WINDOW


def test_receive_credit_follows_consumption_not_arrival() -> None:
    ledger = ReceiveCredit(WINDOW, CONNECTION)
    ledger.received(0, WINDOW)
    assert ledger.pending() is None  # nothing consumed: no more credit
    with pytest.raises(ControlError):
        ledger.received(0, 1)  # beyond the window
    ledger.consumed(0, WINDOW // 4 - 1)
    assert ledger.pending() is None  # less than a quarter window: not worth a frame
    ledger.consumed(0, 1)
    frame = ledger.pending()
    assert frame is not None and frame.streams == {0: WINDOW // 4 + WINDOW}
    ledger.received(0, WINDOW // 4)  # now allowed
    assert ledger.pending() is None


def test_connection_credit_returns_when_streams_are_consumed_or_released() -> None:
    ledger = ReceiveCredit(WINDOW, CONNECTION)
    for stream in range(0, 16, 4):
        ledger.received(stream, WINDOW)
    with pytest.raises(ControlError):
        ledger.received(16, 1)  # connection window exhausted
    ledger.finished(0)
    ledger.release(0)  # dropped unread: its 1000 bytes return to the connection
    frame = ledger.pending()
    assert frame is not None and frame.connection == CONNECTION + WINDOW and frame.streams == {}
    ledger.received(16, WINDOW)


def test_late_data_on_a_released_stream_is_dropped_and_returns_its_credit() -> None:
    ledger = ReceiveCredit(WINDOW, CONNECTION)
    ledger.received(0, 10)
    ledger.release(0)
    ledger.received(0, 3 * WINDOW)  # in flight when we reset it: no stream check
    ledger.received(4, 900)
    frame = ledger.pending()
    assert (
        frame is not None and frame.connection is not None and frame.connection >= ledger.connection_received
    )


def test_a_finished_stream_gets_no_more_stream_credit() -> None:
    ledger = ReceiveCredit(WINDOW, CONNECTION)
    ledger.received(0, 500)
    ledger.finished(0)
    ledger.consumed(0, 500)
    frame = ledger.pending()
    assert frame is None or frame.streams == {}
