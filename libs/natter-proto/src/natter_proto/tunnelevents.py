"""What a tunnel's QUIC connection reports, whatever the engine: natter's links see only these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StreamData:
    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class StreamReset:
    stream_id: int


@dataclass(slots=True)
class StopSending:
    stream_id: int


@dataclass(slots=True)
class PeerAuthenticated:
    """The peer proved a key (``peer_public_key``); the link now checks it is the right one."""


@dataclass(slots=True)
class PingAcked:
    """The peer acknowledged our PING ``uid``: the path works both ways."""

    uid: int


@dataclass(slots=True)
class CidIssued:
    """We gave the peer a connection ID to send to: datagrams carrying it are this tunnel's."""

    cid: bytes


@dataclass(slots=True)
class CidRetired:
    cid: bytes


@dataclass(slots=True)
class DatagramReceived:
    """A DATAGRAM frame from the peer (a UDP forward's, natter_proto.udpframes)."""

    data: bytes


@dataclass(slots=True)
class Terminated:
    error_code: int
    reason: str


TunnelEvent = (
    StreamData
    | StreamReset
    | StopSending
    | PeerAuthenticated
    | PingAcked
    | CidIssued
    | CidRetired
    | DatagramReceived
    | Terminated
)
