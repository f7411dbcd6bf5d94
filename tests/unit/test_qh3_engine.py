"""The qh3 engine driven in memory (sans-IO, no sockets): the client's key proof is bound to
the TLS session, nothing reaches the server's streams before the proof checks out, and
credit follows consumption with a peer that breaks the rules cut off."""

from __future__ import annotations

from typing import Any

from natter_agent.engines.base import PeerAuthenticated, StreamData, Terminated, TunnelEvent
from natter_agent.engines.qh3 import Qh3Engine, Qh3TunnelConnection
from natter_agent.tls import credentials_for
from natter_proto import tunnelctl
from natter_proto.identity import Identity
from natter_proto.tunnelctl import Proof

CLIENT_ADDR = ("127.0.0.1", 1001)
SERVER_ADDR = ("127.0.0.1", 1002)
WINDOW = 64 * 1024
CONNECTION = 256 * 1024


class Pair:
    def __init__(self, client_engine: Qh3Engine | None = None) -> None:
        self.alice = Identity.generate()
        self.bob = Identity.generate()
        self.client_engine = client_engine or engine(self.alice, "alice")
        self.server_engine = engine(self.bob, "bob")
        self.now = 1000.0
        self.client = self.client_engine.client_connection()
        self.client.connect(SERVER_ADDR, self.now)
        self.server: Qh3TunnelConnection | None = None
        self.client_events: list[TunnelEvent] = []
        self.server_events: list[TunnelEvent] = []

    def pump(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            moved = 0
            for data, _ in self.client.datagrams_to_send(self.now):
                if self.server is None:
                    self.server = self.server_engine.server_connection(data)
                    assert self.server is not None
                self.server.receive_datagram(data, CLIENT_ADDR, self.now)
                moved += 1
            self._collect()
            if self.server is not None:
                for data, _ in self.server.datagrams_to_send(self.now):
                    self.client.receive_datagram(data, SERVER_ADDR, self.now)
                    moved += 1
            self._collect()
            self.now += 0.002
            if not moved:
                fired = False
                for conn in (self.client, self.server):
                    if (
                        conn is not None
                        and (timer := conn.get_timer()) is not None
                        and timer <= self.now + 0.05
                    ):
                        conn.handle_timer(max(self.now, timer))
                        fired = True
                if not fired:
                    return

    def _collect(self) -> None:
        for conn, sink in ((self.client, self.client_events), (self.server, self.server_events)):
            while conn is not None and (event := conn.poll_event()) is not None:
                sink.append(event)
                if isinstance(event, PeerAuthenticated):
                    conn.accept_peer()  # what the link does once the key is the expected one

    def received(self, stream_id: int) -> int:
        return sum(
            len(e.data) for e in self.server_events if isinstance(e, StreamData) and e.stream_id == stream_id
        )


def engine(who: Identity, name: str) -> Qh3Engine:
    return Qh3Engine(credentials_for(who, name), stream_window=WINDOW, connection_window=CONNECTION)


def test_both_sides_learn_the_other_key_and_the_client_waits_for_accept() -> None:
    pair = Pair()
    pair.pump()
    assert pair.server is not None
    assert pair.client.peer_public_key() == pair.bob.public_key
    assert pair.server.peer_public_key() == pair.alice.public_key
    assert any(isinstance(e, PeerAuthenticated) for e in pair.server_events)
    assert pair.client.handshake_confirmed()


def test_a_proof_for_another_key_is_refused_and_nothing_reaches_a_stream() -> None:
    mallory = Identity.generate()
    pair = Pair()
    pair.client._credentials = credentials_for(mallory, "alice")  # signs with mallory's key ...

    real_key = pair.alice.public_key

    def forged(frame: tunnelctl.ControlFrame) -> bytes:  # ... but claims alice's
        if isinstance(frame, Proof):
            frame = Proof(real_key, frame.signature, frame.stream_window, frame.connection_window)
        return original_encode(frame)

    original_encode = tunnelctl.encode
    tunnelctl.encode = forged  # type: ignore[assignment]
    try:
        QuicSend(pair.client, 0, b"x" * 1000)  # data that races the proof
        pair.pump()
    finally:
        tunnelctl.encode = original_encode  # type: ignore[assignment]
    assert pair.server is not None and pair.server.peer_public_key() is None
    assert not any(isinstance(e, (StreamData, PeerAuthenticated)) for e in pair.server_events)
    assert any(isinstance(e, Terminated) and "proof" in e.reason for e in pair.server_events)


def test_data_that_races_the_proof_is_held_until_the_proof_checks_out() -> None:
    pair = Pair()
    QuicSend(pair.client, 0, b"early" * 100)  # goes out with the handshake, beside the proof
    pair.pump()
    kinds = [type(e).__name__ for e in pair.server_events]
    assert kinds.index("PeerAuthenticated") < kinds.index("StreamData")
    assert pair.received(0) == 500


def test_a_proof_from_another_session_does_not_verify() -> None:
    first = Pair()
    first.pump()
    stolen = first.client._binding()
    second = Pair()
    second.pump(rounds=3)
    assert second.client._binding() != stolen
    signature = first.alice.sign(tunnelctl.proof_message(stolen))
    assert second.server is not None
    assert not second.server._verifies(first.alice.public_key, signature)


def test_credit_follows_consumption() -> None:
    pair = Pair()
    pair.pump()
    assert pair.server is not None
    stream = pair.client.new_stream_id()
    pair.client.send_stream_data(stream, b"y" * (10 * WINDOW), False)
    pair.pump()
    assert pair.received(stream) == WINDOW  # one window, and no more, without a reader
    assert pair.client.send_buffer_size(stream) == 9 * WINDOW  # the rest waits at the sender
    pair.server.consume(stream, WINDOW)
    pair.pump()
    assert pair.received(stream) == 2 * WINDOW
    for _ in range(8):
        pair.server.consume(stream, WINDOW)
        pair.pump()
    assert pair.received(stream) == 10 * WINDOW
    assert pair.client.send_buffer_size(stream) == 0


def test_a_peer_that_ignores_credit_is_cut_off() -> None:
    pair = Pair()
    pair.pump()
    stream = pair.client.new_stream_id()
    QuicSend(pair.client, stream, b"z" * (2 * WINDOW))  # bypasses natter's credit
    pair.pump()
    assert any(isinstance(e, Terminated) and "exceeded its credit" in e.reason for e in pair.server_events)
    assert pair.received(stream) < 2 * WINDOW


def test_a_second_unidirectional_stream_is_a_protocol_violation() -> None:
    pair = Pair()
    pair.pump()
    extra = pair.client._open_stream(True)
    QuicSend(pair.client, extra, b"\x00\x01\x80")
    pair.pump()
    assert any(isinstance(e, Terminated) and "unidirectional" in e.reason for e in pair.server_events)


def QuicSend(conn: Qh3TunnelConnection, stream_id: int, data: bytes) -> Any:
    """Send below natter's layer, as a peer running other code could."""
    from qh3.quic.connection import QuicConnection

    return QuicConnection.send_stream_data(conn, stream_id, data, False)


def ends(events: list[TunnelEvent], stream_id: int) -> int:
    return sum(1 for e in events if isinstance(e, StreamData) and e.stream_id == stream_id and e.end_stream)


def test_the_control_stream_fin_ends_a_stream_whose_quic_fin_never_came() -> None:
    pair = Pair()
    pair.pump()
    assert pair.server is not None
    stream = pair.client.new_stream_id()
    pair.client.send_stream_data(stream, b"q" * 100, False)
    pair.pump()
    QuicSend(pair.server, stream, b"r" * 1000)  # the reply, without QUIC's FIN ...
    pair.server._write_control(tunnelctl.encode(tunnelctl.Fin(stream, 1000)))  # ... but with natter's
    pair.pump()
    assert ends(pair.client_events, stream) == 1
    assert sum(len(e.data) for e in pair.client_events if isinstance(e, StreamData)) == 1000


def test_both_end_signals_end_a_stream_once() -> None:
    pair = Pair()
    pair.pump()
    assert pair.server is not None
    stream = pair.client.new_stream_id()
    pair.client.send_stream_data(stream, b"q" * 100, False)
    pair.pump()
    pair.server.send_stream_data(stream, b"r" * 1000, True)  # QUIC FIN and natter's fin frame
    pair.pump()
    assert ends(pair.client_events, stream) == 1


def test_echo_streams_over_a_lossy_path_all_end() -> None:
    """Twenty streams echoed over 3% loss each way: every byte and every end arrives."""
    import random

    rng = random.Random(5)
    pair = Pair()
    pair.pump()
    assert pair.server is not None
    streams = [pair.client.new_stream_id() for _ in range(20)]
    for stream in streams:
        pair.client.send_stream_data(stream, b"a" * 50_000, True)
    original_receive = Qh3TunnelConnection.receive_datagram

    def lossy(self: Qh3TunnelConnection, data: bytes, addr: Any, now: float) -> None:
        if rng.random() >= 0.03:
            original_receive(self, data, addr, now)

    Qh3TunnelConnection.receive_datagram = lossy  # type: ignore[method-assign]
    echoed = {stream: 0 for stream in streams}
    ended: set[int] = set()
    try:
        for _ in range(3000):
            pair.pump(rounds=5)
            for event in pair.server_events:
                if isinstance(event, StreamData):
                    pair.server.consume(event.stream_id, len(event.data))
                    pair.server.send_stream_data(event.stream_id, event.data, event.end_stream)
            pair.server_events.clear()
            for event in pair.client_events:
                if isinstance(event, StreamData):
                    pair.client.consume(event.stream_id, len(event.data))
                    echoed[event.stream_id] += len(event.data)
                    if event.end_stream:
                        ended.add(event.stream_id)
            pair.client_events.clear()
            if len(ended) == len(streams):
                break
            pair.now += 0.05  # let loss-recovery timers fire
            for conn in (pair.client, pair.server):
                if (timer := conn.get_timer()) is not None and timer <= pair.now:
                    conn.handle_timer(pair.now)
    finally:
        Qh3TunnelConnection.receive_datagram = original_receive  # type: ignore[method-assign]
    assert ended == set(streams)
    assert all(size == 50_000 for size in echoed.values())


async def test_a_ping_or_close_on_a_connection_the_engine_closed_ends_the_tunnel_quietly() -> None:
    """Seen in CI: an agent closing (its machine pings tunnels) raised out of qh3 for a tunnel
    the engine had already closed. The link ends the tunnel instead; nothing raises."""
    from natter_agent.link import PeerLink
    from natter_proto.agent.kinds import PathKind, Role, direct_path
    from natter_proto.endpoints import Endpoint

    pair = Pair()
    pair.pump()
    pair.client.close(error_code=0, reason_phrase="gone")
    pair.client.datagrams_to_send(pair.now)
    pair.client.handle_timer(pair.now + 100)  # draining over: the core refuses every call
    closed: list[str] = []
    link = PeerLink(
        tunnel=1,
        send=lambda datagrams: None,
        conn=pair.client,
        peer="bob",
        route=direct_path(Endpoint("127.0.0.1", 1)),
        kind=PathKind.DIRECT,
        role=Role.CLIENT,
        on_incoming=lambda channel: None,
        on_ready=lambda link: None,
        on_pong=lambda *args: None,
        on_cid=lambda *args: None,
        on_closed=lambda link: closed.append(link.close_reason),
        on_datagram=lambda link, data: None,
        verify=lambda link: None,
        expected_key=None,
        send_buffer_limit=1 << 20,
    )
    link.ping(5)
    link.close("again")
    assert not link.is_alive and len(closed) == 1 and "closed" in closed[0]
