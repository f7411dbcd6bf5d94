"""The router's connection-ID bookkeeping for tunnels whose IDs live in native code."""

from __future__ import annotations

from natter_agent.router import Router, long_header_dcid, long_header_scid
from natter_proto.agent.kinds import direct_path
from natter_proto.endpoints import Endpoint

PEER = Endpoint("192.0.2.7", 4433)
BIRTHDAY_SOCKET = 7


def long_header(first: int, dcid: bytes, scid: bytes, size: int = 1200) -> bytes:
    head = bytes([first]) + b"\x00\x00\x00\x01" + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    return head + b"\x00" * (size - len(head))


def test_long_header_ids_are_read_and_bounded() -> None:
    packet = long_header(0xC3, b"D" * 8, b"S" * 8)
    assert long_header_dcid(packet) == b"D" * 8
    assert long_header_scid(packet) == b"S" * 8
    assert long_header_scid(packet[:20]) is None  # cut inside the source ID
    assert long_header_scid(long_header(0xC3, b"D" * 8, b"")) is None
    assert long_header_scid(b"\x40" + b"x" * 30) is None  # a short header has none


def test_a_native_tunnels_handshake_on_another_socket_finds_it_by_what_it_sent() -> None:
    """Both the client's Initial, split over two datagrams by a post-quantum ClientHello,
    and the peer's Handshake packets to the IDs the native engine chose reach the tunnel."""
    router = Router()
    path = direct_path(PEER, BIRTHDAY_SOCKET)
    first = long_header(0xC3, b"C" * 8, b"c" * 8)
    router.add_initial(1, first)
    router.route(1, path)
    assert router.place(BIRTHDAY_SOCKET, PEER, long_header(0xC3, b"C" * 8, b"c" * 8)) is not None
    handshake = long_header(0xE3, b"N" * 8, b"c" * 8, 300)
    assert router.place(BIRTHDAY_SOCKET, PEER, handshake) is None  # the engine's ID: not yet known
    router.sent(1, [long_header(0xC3, b"c" * 8, b"N" * 8), b"\x41short"])
    placed = router.place(BIRTHDAY_SOCKET, PEER, handshake)
    assert placed is not None and placed[0] == 1
    # a new connection from the same address (another Initial ID) is the machine's to decide
    assert router.place(BIRTHDAY_SOCKET, PEER, long_header(0xC3, b"Z" * 8, b"z" * 8)) is None
    router.forget(1)
    assert router.owner(handshake) is None
