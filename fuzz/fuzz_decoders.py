"""Coverage-guided fuzzing of every decoder that reads bytes from the network or a file.

    make fuzz                       # 60 s per run
    .venv/bin/python fuzz/fuzz_decoders.py -max_total_time=600 fuzz/corpus

Each decoder may reject its input only with its own error type; anything else (a crash, an
exception of another type) is a finding that libFuzzer reports and saves.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from natter.specs import SpecError, parse_spec
    from natter_agent.keystore import parse_known_peers
    from natter_proto import bus, frames, socks, streamhdr, tunnelctl, udpframes
    from natter_proto.acl import AclError, parse_peer_rule, parse_target_rule
    from natter_proto.tokens import TokenList, TokenListError


def one_input(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0] % 7, data[1:]
    if selector == 0:
        with contextlib.suppress(frames.FrameError):
            frames.decode(bytes([frames.PREFIX]) + body)
    elif selector == 1:
        try:
            header, _ = streamhdr.split_header(body)
            if header is not None:
                streamhdr.parse_open(header)
        except streamhdr.StreamHeaderError:
            pass
    elif selector == 3:
        with contextlib.suppress(tunnelctl.ControlError):
            tunnelctl.ControlReader().feed(body)  # the tunnel's control stream (qh3 engine)
    elif selector == 4:
        with contextlib.suppress(bus.BusError):
            bus.decode(body)  # what another broker replica says over Redis
    elif selector == 5:
        with contextlib.suppress(udpframes.UdpFrameError):
            udpframes.decode(body)  # a UDP forward's DATAGRAM frame
    elif selector == 6:
        fuzz_socks(body)
    else:
        text = body.decode("utf-8", errors="replace")
        parse_known_peers(text)
        for parser, error in (
            (TokenList.parse, TokenListError),
            (parse_spec, SpecError),
            (parse_peer_rule, AclError),
            (parse_target_rule, AclError),
        ):
            with contextlib.suppress(error):
                parser(text)  # type: ignore[operator]


def fuzz_socks(body: bytes) -> None:
    """A SOCKS client's bytes, cut where the input says, with and without a password:
    the handshake answers and bounds itself, and never raises."""
    cut = body[0] if body else 0
    for credentials in (None, socks.Credentials("ann", "pw")):
        handshake = socks.SocksHandshake(credentials)
        sent = 0
        for part in (body[1 : 1 + cut], body[1 + cut :]):
            step = handshake.receive(part)
            sent += len(step.send)
            if step.target is not None:
                handshake.reply(socks.Reply.CONNECTION_REFUSED)
        if sent > 64:
            raise AssertionError(f"a SOCKS handshake answered {sent} bytes")


def seeds() -> list[bytes]:
    e = frames.Endpoint("127.0.0.1", 9)
    messages = [
        frames.Register(name="bob", public_key=b"k" * 32, cookie=b"c" * 20, signature=b"s" * 64),
        frames.Punch("r", "s", "alice", e, (e,), "server", peer_key=b"k" * 32),
        frames.ProbeAck("s", "alice", 1, e),
    ]
    bus_messages: list[bus.BusMessage] = [
        bus.Introduce("r1", "alice", "rid", e, (frames.encode(messages[1]),), "0123456789abcdef", "bob"),
        bus.Ack("alice", "rid"),
        bus.RelayBatch((bus.RelayItem("bob", b"k" * 8, b"q" * 1200),)),
    ]
    control = [
        tunnelctl.Proof(b"k" * 32, b"s" * 64, 1 << 20, 8 << 20),
        tunnelctl.Credit({0: 5000}, 9000),
        tunnelctl.Fin(4, 100),
    ]
    return (
        [b"\x00" + frames.encode(m)[1:] for m in messages]
        + [b"\x01" + streamhdr.encode_open("h:1")]
        + [b"\x03" + tunnelctl.encode(f) for f in control]
        + [b"\x04" + bus.encode(m) for m in bus_messages]
        + [
            b"\x05" + udpframes.encode_open(7, "localhost:53", b"q"),
            b"\x05" + udpframes.encode_refused(7, "no"),
        ]
        + [b"\x06\x03\x05\x01\x00\x05\x01\x00\x03\x09localhost\x00\x50"]
        + [b"\x06\x03\x05\x01\x02\x01\x03ann\x02pw\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x16"]
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[-1] != "--seeds" and not sys.argv[-1].startswith("-"):
        import pathlib

        corpus = pathlib.Path(sys.argv[-1])
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds()):
            (corpus / f"seed{i}").write_bytes(seed)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
