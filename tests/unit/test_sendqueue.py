"""The send queue hands every byte on once, in order, a quantum per stream per turn, with
idle streams first (DRR++), and never more than the peer's credit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from natter_proto.sendqueue import SendQueue

Q = 100


def unlimited(_stream_id: int) -> int:
    return 1 << 30


def drain(queue: SendQueue, credit=unlimited) -> list[tuple[int, bytes, bool]]:  # type: ignore[no-untyped-def]
    out = []
    while (item := queue.next_chunk(credit)) is not None:
        out.append(item)
    return out


def test_busy_streams_take_turns_a_quantum_each() -> None:
    queue = SendQueue(quantum=Q)
    for stream in (0, 4, 8):
        for _ in range(3):
            queue.push(stream, b"x" * Q)
    assert [s for s, _, _ in drain(queue)] == [0, 4, 8] * 3
    assert not queue


def test_a_turn_is_whole_chunks_up_to_the_quantum() -> None:
    queue = SendQueue(quantum=Q)
    for _ in range(4):
        queue.push(0, b"a" * 40)  # 40 + 40 + 40 >= 100: three chunks per turn
        queue.push(4, b"b" * 40)
    order = [s for s, _, _ in drain(queue)]
    assert order == [0, 0, 0, 4, 4, 4, 0, 4]


def test_an_idle_stream_goes_ahead_of_bulk_streams() -> None:
    queue = SendQueue(quantum=Q)
    for _ in range(5):
        queue.push(0, b"x" * Q)
        queue.push(4, b"y" * Q)
    assert queue.next_chunk(unlimited)[0] == 0  # type: ignore[index]
    assert queue.next_chunk(unlimited)[0] == 4  # type: ignore[index]
    queue.push(8, b"request", fin=True)
    assert queue.next_chunk(unlimited) == (8, b"request", True)


def test_a_bulk_stream_emptied_on_its_first_turn_does_not_stay_new() -> None:
    queue = SendQueue(quantum=Q)
    queue.push(0, b"a" * 10)
    queue.push(4, b"b" * Q)
    queue.push(4, b"b" * Q)
    assert queue.next_chunk(unlimited) == (0, b"a" * 10, False)  # emptied: now behind 4
    queue.push(0, b"a" * 10)
    assert [s for s, _, _ in drain(queue)] == [4, 0, 4]


def test_credit_limits_and_splits_but_never_reorders() -> None:
    queue = SendQueue(quantum=Q)
    queue.push(0, b"0123456789")
    queue.push(4, b"abc")
    credit = {0: 4, 4: 0}
    assert queue.next_chunk(credit.__getitem__) == (0, b"0123", False)
    credit[0] = 0
    assert queue.next_chunk(credit.__getitem__) is None  # nobody may send: no busy loop
    credit.update({0: 100, 4: 100})
    assert drain(queue, credit.__getitem__) == [(4, b"abc", False), (0, b"456789", False)]


def test_an_end_with_no_bytes_needs_no_credit() -> None:
    queue = SendQueue(quantum=Q)
    queue.push(0, b"", fin=True)
    assert 0 in queue
    assert queue.next_chunk(lambda _s: 0) == (0, b"", True)
    assert 0 not in queue and not queue


def test_dropping_a_stream_forgets_its_bytes() -> None:
    queue = SendQueue(quantum=Q)
    queue.push(0, b"x" * 50, fin=True)
    queue.push(4, b"y" * 20)
    queue.drop(0)
    assert queue.total == 20 and 0 not in queue
    assert drain(queue) == [(4, b"y" * 20, False)]
    assert not queue


@settings(max_examples=300, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.sampled_from([0, 4, 8, 12]), st.binary(max_size=300)), min_size=1, max_size=60
    ),
    credits=st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=20),
    quantum=st.integers(min_value=1, max_value=500),
)
def test_every_byte_once_in_order_within_credit(
    writes: list[tuple[int, bytes]], credits: list[int], quantum: int
) -> None:
    queue = SendQueue(quantum=quantum)
    expected: dict[int, bytes] = {}
    got: dict[int, bytes] = {}
    ended: set[int] = set()
    left = {s: 0 for s in (0, 4, 8, 12)}
    for step, (stream, data) in enumerate(writes):
        queue.push(stream, data)
        expected[stream] = expected.get(stream, b"") + data
        left[stream] += credits[step % len(credits)]
        while (item := queue.next_chunk(left.__getitem__)) is not None:
            sid, chunk, _fin = item
            assert len(chunk) <= left[sid]
            left[sid] -= len(chunk)
            got[sid] = got.get(sid, b"") + chunk
    for stream in expected:
        queue.push(stream, b"", fin=True)
    while (item := queue.next_chunk(unlimited)) is not None:
        sid, chunk, fin = item
        got[sid] = got.get(sid, b"") + chunk
        if fin:
            assert sid not in ended
            ended.add(sid)
    assert {s: d for s, d in got.items() if d} == {s: d for s, d in expected.items() if d}
    assert ended == set(expected)
    assert not queue and queue.total == 0
