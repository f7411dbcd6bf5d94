from __future__ import annotations

import pytest

from natter.cli import main, parse
from natter_proto import streamhdr


def test_stream_header_round_trip_and_split() -> None:
    data = streamhdr.encode_open("localhost:22") + b"payload"
    header, rest = streamhdr.split_header(data[:3])
    assert header is None
    header, rest = streamhdr.split_header(data)
    assert header is not None and streamhdr.parse_open(header).target == "localhost:22"
    assert rest == b"payload"
    reply, _ = streamhdr.split_header(streamhdr.encode_reply(False, "nope"))
    assert reply is not None and streamhdr.parse_reply(reply) == streamhdr.ReplyHeader(False, "nope")


@pytest.mark.parametrize(
    "data",
    [b"\xff\xff" + b"x" * 10, b"\x00\x02\xc1\xc1", b"\x00\x01\x05", b"\x00\x03\x81\xa1v"],
)
def test_stream_header_errors(data: bytes) -> None:
    with pytest.raises(streamhdr.StreamHeaderError):
        header, _ = streamhdr.split_header(data)
        if header is not None:
            streamhdr.parse_open(header)


def test_seed_command_lines_parse() -> None:
    a = parse(["-server", "1.2.3.4:10000"])
    assert a.command == "broker" and a.server == "1.2.3.4:10000"
    b = parse(["-name", "bob", "-broker", "1.2.3.4:10000", "-listen"])
    assert b.command == "client" and b.name == "bob" and b.listen and b.forwards == []
    c = parse(["-name", "alice", "-broker", "1.2.3.4:10000", "8022:bob:22"])
    assert c.forwards[0].local == ":8022" and c.forwards[0].remote == ":22"
    d = parse(["-id", "alice", "-broker", "h:1", ":bob:22"])
    assert d.forwards[0].is_stdio
    e = parse(["forward", "--name", "alice", "--broker", "h:1", "8022:bob:22", "9000:carol:80"])
    assert len(e.forwards) == 2
    f = parse(["listen", "--name", "bob", "--broker", "h:1"])
    assert f.listen
    g = parse(["broker", "--listen", ":10000"])
    assert g.command == "broker"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-bogus"],
        ["-name", "alice", "-broker", "h:1"],
        ["-name", "alice", "8022:bob:22"],
        ["-broker", "h:1", "8022:bob:22"],
        ["-name", "alice", "-broker", "h", "8022:bob:22"],
        ["-name", "alice", "-broker", "h:1", "80x22:bob:22"],
        ["-name", "al ice", "-broker", "h:1", "-listen"],
        ["-name", "alice", "-broker", "h:1", "8022:alice:22"],
        ["-name", "alice", "-broker", "h:1", ":bob:22", "8000:bob:80"],
        ["-server", "nowhere"],
        ["-server", ":1", "-listen"],
        ["broker"],
        ["forward", "--name", "a", "--broker", "h:1"],
        ["listen", "--name", "a"],
        ["-name", "alice", "-broker", "h:1", "-listen", "-udp-port", "99999"],
    ],
)
def test_usage_mistakes_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("natter: error: ")


def test_help_describes_the_seed_form(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "-server" in out and "-listen" in out and "8022:bob:22" in out
