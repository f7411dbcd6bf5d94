"""The WebSocket codec of the broker's TCP way: upgrade, frames, and hostile input."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natter_proto import websocket as ws


def test_the_upgrade_round_trip() -> None:
    key = os.urandom(16)
    request = ws.client_request("broker.example", key)
    end = ws.head_end(request)
    assert end == len(request)
    accepted = ws.parse_request(request[:end])
    assert accepted == base64.b64encode(key).decode()
    ws.parse_response(ws.server_response(accepted), key)  # no exception: accepted


def test_rfc_6455_accept_example() -> None:
    assert ws.accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"POST /natter/v1 HTTP/1.1\r\n\r\n", "not an HTTP GET"),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", "no WebSocket at"),
        (b"GET /natter/v1 HTTP/1.1\r\nHost: x\r\n\r\n", "not a WebSocket upgrade"),
        (
            b"GET /natter/v1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 8\r\n\r\n",
            "unsupported WebSocket version",
        ),
        (
            b"GET /natter/v1 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
            "bad Sec-WebSocket-Key",
        ),
        (b"GET /natter/v1 HTTP/1.1\r\n\xff\xfe\r\n\r\n", "not ASCII"),
    ],
)
def test_bad_upgrades_are_refused_with_a_reason(head: bytes, why: str) -> None:
    with pytest.raises(ws.WebSocketError, match=why):
        ws.parse_request(head)


def test_a_head_without_end_is_bounded() -> None:
    assert ws.head_end(b"GET / HTTP/1.1\r\n" + b"x" * 100) == -1
    with pytest.raises(ws.WebSocketError, match="too long"):
        ws.head_end(b"G" * (ws.MAX_HEAD + 1))


def test_a_refused_upgrade_is_reported() -> None:
    with pytest.raises(ws.WebSocketError, match=r"upgrade refused: HTTP/1\.1 404"):
        ws.parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n", os.urandom(16))


@pytest.mark.parametrize("size", [0, 1, 125, 126, 1350, 65535, 65536])
def test_frames_round_trip_masked_and_not(size: int) -> None:
    payload = os.urandom(size)
    for mask, masked in ((os.urandom(4), True), (None, False)):
        decoder = ws.Decoder(max_message=1 << 17, masked=masked)
        assert decoder.feed(ws.encode(payload, mask)) == [ws.Message(payload)]


def test_fragments_pings_and_close() -> None:
    mask = b"\x01\x02\x03\x04"
    first = bytearray(ws.encode(b"hel", mask))
    first[0] &= 0x7F  # not final
    rest = bytearray(ws.encode(b"lo", mask))
    rest[0] = 0x80 | ws.Opcode.CONTINUATION
    ping = ws.encode(b"p", mask, ws.Opcode.PING)
    close = ws.close_frame(ws.CloseCode.GOING_AWAY, "bye", mask)
    decoder = ws.Decoder(max_message=100, masked=True)
    events = decoder.feed(bytes(first) + ping + bytes(rest) + close + ws.encode(b"after", mask))
    assert events == [ws.Ping(b"p"), ws.Message(b"hello"), ws.Closed(1001, "bye")]


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (ws.encode(b"x", None), "masking is wrong"),  # a client must mask
        (bytes([0xC2, 0x81]) + b"\0\0\0\0x", "reserved bits"),
        (ws.encode(b"hi", b"abcd", ws.Opcode.TEXT), "text messages"),
        (bytes([0x83, 0x81]) + b"\0\0\0\0x", "unknown opcode"),
        (ws.encode(b"x" * 200, b"abcd", ws.Opcode.PING), "bad control frame"),
        (bytes([0x80, 0x81]) + b"\0\0\0\0x", "continuation out of place"),
        (bytes([0x82, 0xFF]) + (1 << 40).to_bytes(8, "big"), "larger than"),
    ],
)
def test_hostile_frames_raise_one_error(frame: bytes, why: str) -> None:
    decoder = ws.Decoder(max_message=4096, masked=True)
    with pytest.raises(ws.WebSocketError, match=why):
        decoder.feed(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises_anything_but_a_websocket_error(data: bytes) -> None:
    decoder = ws.Decoder(max_message=256, masked=True)
    try:
        for cut in range(0, len(data), 37):
            decoder.feed(data[cut : cut + 37])
    except ws.WebSocketError:
        pass
    assert len(decoder._buffer) <= len(data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=64))
def test_any_split_of_a_stream_gives_the_same_messages(payloads: list[bytes], step: int) -> None:
    stream = b"".join(ws.encode(p, os.urandom(4)) for p in payloads)
    decoder = ws.Decoder(max_message=300, masked=True)
    events: list[ws.Event] = []
    for cut in range(0, len(stream), step):
        events += decoder.feed(stream[cut : cut + step])
    assert events == [ws.Message(p) for p in payloads]
