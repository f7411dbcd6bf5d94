from __future__ import annotations

import pytest

from natter.specs import ForwardSpec, SpecError, parse_dynamic, parse_spec
from natter_agent import ForwardKind
from natter_proto.endpoints import AddressError, Endpoint, endpoint, split_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8022:bob:22", ForwardSpec(":8022", "bob", ":22")),
        (":bob:22", ForwardSpec("", "bob", ":22")),
        ("8022:bob:10.0.1.1:22", ForwardSpec(":8022", "bob", "10.0.1.1:22")),
        ("127.0.0.1:8022:bob:22", ForwardSpec("127.0.0.1:8022", "bob", ":22")),
        ("0.0.0.0:8022:bob:db.lan:5432", ForwardSpec("0.0.0.0:8022", "bob", "db.lan:5432")),
        ("[::1]:8022:bob:[fe80::1]:22", ForwardSpec("[::1]:8022", "bob", "[fe80::1]:22")),
        (":bob:example.org:80", ForwardSpec("", "bob", "example.org:80")),
        ("5353:bob:53/udp", ForwardSpec(":5353", "bob", ":53", ForwardKind.UDP)),
        ("[::1]:5353:bob:[::1]:53/udp", ForwardSpec("[::1]:5353", "bob", "[::1]:53", ForwardKind.UDP)),
        ("8022:bob:22/tcp", ForwardSpec(":8022", "bob", ":22")),
    ],
)
def test_valid_specs(text: str, expected: ForwardSpec) -> None:
    assert parse_spec(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "8022",
        "8022:bob",
        "x:bob:22",
        "8022:bob:0",
        "8022:bob:70000",
        "8022:b b:22",
        "1:2:3:4:5:6",
        "8022:bob:",
        "host::bob:22",
        "a:b:c:d:e",
        "5353:bob:53/sctp",
        ":bob:53/udp",
        "5353:bob:53/",
    ],
)
def test_invalid_specs(text: str) -> None:
    with pytest.raises(SpecError):
        parse_spec(text)


def test_split_host_port() -> None:
    assert split_host_port(":10000", default_host="0.0.0.0") == ("0.0.0.0", 10000)
    assert split_host_port("[::1]:5") == ("::1", 5)
    assert split_host_port("localhost:10000") == ("localhost", 10000)
    for bad in ("", "10000", "host:", "host:x", "::1:5", "host:99999", "[::1]5"):
        with pytest.raises(AddressError):
            split_host_port(bad)


def test_endpoint_validation() -> None:
    assert endpoint("::ffff:10.0.0.1", 1) == Endpoint("10.0.0.1", 1)
    assert str(Endpoint("::1", 5)) == "[::1]:5"
    with pytest.raises(AddressError):
        endpoint("localhost", 1)
    with pytest.raises(AddressError):
        endpoint("1.2.3.4", 0)


def test_dynamic_specs() -> None:
    assert parse_dynamic("1080:bob") == ForwardSpec(":1080", "bob", "", ForwardKind.SOCKS)
    assert parse_dynamic("0.0.0.0:1080:bob") == ForwardSpec("0.0.0.0:1080", "bob", "", ForwardKind.SOCKS)
    assert parse_dynamic("[::1]:1080:bob").local == "[::1]:1080"
    for bad in ("1080", "1080:bob:22:x", "x:bob", "1080:b b", "0:bob"):
        with pytest.raises(SpecError):
            parse_dynamic(bad)
