"""Which way frames go to the broker (UDP, or the TCP stream), and how the broker's TLS key
is trusted: pure decisions, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from natter_agent.brokertrust import BrokerTrust, BrokerTrustError
from natter_broker.tlscert import self_signed_pair
from natter_proto.agent.actions import CloseSocket, Notice, OpenStream
from natter_proto.agent.brokerpath import BrokerPath, StreamState
from natter_proto.agent.kinds import BROKER_STREAM, MAIN_SOCKET
from natter_proto.agent.settings import AgentSettings
from natter_proto.endpoints import Endpoint

BROKER = Endpoint("198.51.100.1", 10000)


def test_udp_that_answers_never_opens_a_stream() -> None:
    path = BrokerPath(AgentSettings())
    path.racing(0.0)
    path.heard(MAIN_SOCKET)
    path.registered_on(MAIN_SOCKET, BROKER, 0.0)
    path.handle_timer(5.0, BROKER)
    assert path.actions() == [] and path.sockets() == (MAIN_SOCKET,) and path.via == "udp"


def test_silent_udp_opens_the_stream_and_the_first_answer_wins() -> None:
    path = BrokerPath(AgentSettings(stream_after=0.5))
    path.racing(0.0)
    assert path.get_timer() == 0.5
    path.handle_timer(0.5, BROKER)
    assert path.actions() == [OpenStream(BROKER_STREAM, BROKER)]
    path.stream_opened()
    assert path.sockets() == (MAIN_SOCKET, BROKER_STREAM)  # racing: both ways
    path.registered_on(BROKER_STREAM, BROKER, 0.0)
    assert path.sockets() == (BROKER_STREAM,) and path.via == "tcp"
    (notice,) = path.actions()
    assert isinstance(notice, Notice) and notice.text == f"no UDP answer from the broker {BROKER}: using TCP"
    # UDP answers later (a registration raced both ways): UDP wins, the stream closes
    path.registered_on(MAIN_SOCKET, BROKER, 0.0)
    assert path.sockets() == (MAIN_SOCKET,) and path.actions() == [CloseSocket(BROKER_STREAM)]


def test_a_failed_stream_is_retried_with_backoff_and_said_in_one_line() -> None:
    path = BrokerPath(AgentSettings(stream_after=0.5))
    path.racing(0.0)
    path.handle_timer(0.5, BROKER)
    path.actions()
    assert not path.stream_closed("connection refused", 0.6)
    assert path.unanswered(BROKER) == f"broker {BROKER}: no UDP answer; TCP: connection refused"
    retry = path.get_timer()
    assert retry is not None and 1.4 < retry < 1.8
    path.handle_timer(retry, BROKER)
    assert path.actions() == [OpenStream(BROKER_STREAM, BROKER)] and path.stream is StreamState.OPENING


def test_losing_the_stream_that_carried_us_starts_the_race_again() -> None:
    path = BrokerPath(AgentSettings(stream_after=0.5))
    path.racing(0.0)
    path.handle_timer(0.5, BROKER)
    path.stream_opened()
    path.registered_on(BROKER_STREAM, BROKER, 0.0)
    assert path.stream_closed("the broker closed the connection", 10.0)  # it carried us
    assert path.sockets() == (MAIN_SOCKET,) and not path.won
    assert path.get_timer() is not None  # opened again after a backoff


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def test_broker_keys_are_remembered_and_a_change_is_warned(tmp_path: Path) -> None:
    first, second = der(self_signed_pair()[0]), der(self_signed_pair()[0])
    trust = BrokerTrust(state_dir=tmp_path)
    assert trust.check("198.51.100.1:10000", first) == ""  # first use
    assert trust.check("198.51.100.1:10000", first) == ""
    again = BrokerTrust(state_dir=tmp_path)  # a later run reads known_brokers
    warning = again.check("198.51.100.1:10000", second)
    assert "presents another key than before" in warning and "--broker-key" in warning


def test_a_pinned_key_refuses_any_other(tmp_path: Path) -> None:
    from natter_proto.tlskey import key_fingerprint

    good, bad = der(self_signed_pair()[0]), der(self_signed_pair()[0])
    trust = BrokerTrust(pinned_key=key_fingerprint(good), state_dir=tmp_path)
    assert trust.strict and trust.check("b:1", good) == ""
    with pytest.raises(BrokerTrustError, match="is not the pinned"):
        trust.check("b:1", bad)
