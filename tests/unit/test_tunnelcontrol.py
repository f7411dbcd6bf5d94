"""The tunnel-control machine alone, without a QUIC engine: what any engine gets from it."""

from __future__ import annotations

import pytest

from natter_proto import tunnelctl
from natter_proto.tunnelcontrol import TunnelControl
from natter_proto.tunnelctl import ControlError
from natter_proto.tunnelevents import PeerAuthenticated, StreamData, TunnelEvent


class Side:
    def __init__(self, is_client: bool) -> None:
        self.sent: list[tuple[int, bytes, bool]] = []
        self.control: list[bytes] = []
        self.events: list[TunnelEvent] = []
        self.ctl = TunnelControl(
            is_client=is_client,
            stream_window=1000,
            connection_window=1500,
            send_stream=lambda sid, data, fin: self.sent.append((sid, data, fin)),
            write_control=self.control.append,
            emit=self.events.append,
            ready=self.events.append,
        )


def proof(valid: bool = True) -> bytes:
    return tunnelctl.encode(tunnelctl.Proof(b"k" * 32, b"s" * 64, 1000, 1500))


def test_the_server_holds_the_clients_data_until_the_proof_verifies() -> None:
    server = Side(is_client=False)
    server.ctl.stream_data(0, b"early", False)
    assert server.events == []
    server.ctl.control_data(2, proof(), local=False, verify=lambda key, sig: True)
    assert server.events == [PeerAuthenticated(), StreamData(0, b"early", False)]
    assert server.ctl.peer_key == b"k" * 32


def test_a_proof_that_does_not_verify_breaks_the_tunnel() -> None:
    server = Side(is_client=False)
    with pytest.raises(ControlError):
        server.ctl.control_data(2, proof(), local=False, verify=lambda key, sig: False)


def test_sends_wait_for_credit_and_go_out_when_it_comes() -> None:
    client = Side(is_client=True)
    client.ctl.send(0, b"x" * 300, True)  # no windows known yet: all held
    assert client.sent == [] and client.ctl.pending_size(0) == 300
    accept = tunnelctl.encode(tunnelctl.Accept(100, 1500))
    client.ctl.control_data(3, accept, local=False, verify=lambda key, sig: True)
    assert client.sent == [(0, b"x" * 100, False)] and client.ctl.pending_size(0) == 200
    client.ctl.control_data(
        3, tunnelctl.encode(tunnelctl.Credit({0: 300}, 300)), local=False, verify=lambda key, sig: True
    )
    assert b"".join(data for _, data, _ in client.sent) == b"x" * 300 and client.sent[-1][2]
    assert client.control and tunnelctl.ControlReader().feed(client.control[-1])[0] == tunnelctl.Fin(0, 300)


def test_only_the_peers_one_control_stream_may_speak() -> None:
    client = Side(is_client=True)
    with pytest.raises(ControlError):
        client.ctl.control_data(2, b"", local=True, verify=lambda key, sig: True)
    client.ctl.control_data(3, b"", local=False, verify=lambda key, sig: True)
    with pytest.raises(ControlError):
        client.ctl.control_data(7, b"", local=False, verify=lambda key, sig: True)
