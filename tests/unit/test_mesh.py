"""The relay mesh between replicas: sealed datagrams open only with the fleet secret, and
no datagram opens twice."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natter_proto.mesh import WINDOW, MeshError, MeshOpener, MeshPacket, MeshSealer

SECRET = b"s" * 32
KEY = bytes(range(8))


def test_a_sealed_packet_opens_once() -> None:
    sealer, opener = MeshSealer(SECRET, "r1", 1000), MeshOpener(SECRET)
    datagram = sealer.seal("bob", KEY, b"quic")
    assert opener.open(datagram) == MeshPacket("r1", "bob", KEY, b"quic")
    with pytest.raises(MeshError, match="replayed"):
        opener.open(datagram)


def test_reordering_within_the_window_is_fine_and_old_ones_are_refused() -> None:
    sealer, opener = MeshSealer(SECRET, "r1", 0), MeshOpener(SECRET)
    datagrams = [sealer.seal("bob", KEY, bytes([i])) for i in range(WINDOW + 10)]
    for datagram in datagrams[5 : WINDOW + 10]:
        opener.open(datagram)
    with pytest.raises(MeshError, match="too old"):
        opener.open(datagrams[0])
    late = MeshSealer(SECRET, "r2", 0)
    first, second = late.seal("bob", KEY, b"1"), late.seal("bob", KEY, b"2")
    opener.open(second)
    opener.open(first)  # late, but within the window
    with pytest.raises(MeshError):
        opener.open(first)


def test_a_wrong_secret_or_a_changed_byte_is_refused() -> None:
    datagram = MeshSealer(SECRET, "r1", 0).seal("bob", KEY, b"quic")
    with pytest.raises(MeshError, match="bad tag"):
        MeshOpener(b"t" * 32).open(datagram)
    for i in range(len(datagram)):
        changed = datagram[:i] + bytes([datagram[i] ^ 1]) + datagram[i + 1 :]
        with pytest.raises(MeshError):
            MeshOpener(SECRET).open(changed)


def test_a_restarted_replica_numbers_above_its_old_datagrams() -> None:
    opener = MeshOpener(SECRET)
    opener.open(MeshSealer(SECRET, "r1", 5_000).seal("bob", KEY, b"a"))
    opener.open(MeshSealer(SECRET, "r1", 9_000).seal("bob", KEY, b"b"))  # started later


def test_short_secrets_and_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        MeshSealer(b"short", "r1", 0)
    with pytest.raises(ValueError):
        MeshSealer(SECRET, "bad id!", 0)
    with pytest.raises(MeshError):
        MeshSealer(SECRET, "r1", 0).seal("b b", KEY, b"x")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1700))
def test_any_datagram_opens_or_is_refused_with_mesh_error(data: bytes) -> None:
    with contextlib.suppress(MeshError):
        MeshOpener(SECRET).open(data)
