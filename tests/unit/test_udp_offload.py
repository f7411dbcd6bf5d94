"""The agent's socket on loopback with segmentation offload both ways: a run of equal-size
datagrams leaves in one GSO send and may arrive as one GRO buffer; either way every
datagram reaches its handler on its own, whole and in order, demultiplexed by first byte."""

from __future__ import annotations

import asyncio
import socket

import pytest

from natter_agent.udp import AgentSocket
from natter_proto.endpoints import Endpoint


async def _exchange(datagrams: list[bytes], *, offload: bool) -> tuple[list[bytes], list[bytes]]:
    control: list[bytes] = []
    quic: list[bytes] = []
    done = asyncio.Event()
    expected = len(datagrams)

    def counted(into: list[bytes]):  # type: ignore[no-untyped-def]
        def handle(data: bytes, _source: Endpoint) -> None:
            into.append(data)
            if len(control) + len(quic) == expected:
                done.set()

        return handle

    receiver = AgentSocket(counted(control), counted(quic), lambda: None)
    receiver.gro = offload
    sender = AgentSocket(lambda *_: None, lambda *_: None, lambda: None)
    sender.gso = offload
    port = receiver.bind("127.0.0.1", 0).port
    sender.bind("127.0.0.1", 0)
    try:
        sender.send_batch([(data, ("127.0.0.1", port)) for data in datagrams])
        await asyncio.wait_for(done.wait(), 5)
    finally:
        sender.close()
        receiver.close()
    return control, quic


@pytest.mark.parametrize("offload", [True, False])
async def test_a_run_of_datagrams_arrives_one_by_one(offload: bool) -> None:
    if offload and not hasattr(socket, "CMSG_SPACE"):
        pytest.skip("no ancillary data on this platform")
    run = [bytes([0x40 | i]) + bytes([i]) * 1349 for i in range(20)]  # QUIC-like, equal size
    tail = [b"\x41" + b"t" * 99]  # a shorter one may end a GSO run
    control_frame = [b"\x1e" + b"c" * 40]  # natter's frames start below 0x40
    control, quic = await _exchange(run + tail + control_frame, offload=offload)
    assert quic == run + tail
    assert control == control_frame
