"""Where options come from: flags, then NATTER_* variables, then the config file, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from natter.options import parse
from natter.parsers import UsageError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("NATTER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config-here"))


def agent_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_environment_fills_what_flags_leave_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATTER_NAME", "alice")
    monkeypatch.setenv("NATTER_BROKER", "b1:10000, b2:10000")
    monkeypatch.setenv("NATTER_KEEPALIVE", "7.5")
    args = parse(["forward", "8022:bob:22"])
    assert args.name == "alice" and args.broker == ["b1:10000", "b2:10000"] and args.keepalive == 7.5
    flagged = parse(["forward", "--name", "carol", "--broker", "b3:1", "8022:bob:22"])
    assert flagged.name == "carol" and flagged.broker == ["b3:1"] and flagged.keepalive == 7.5


def test_broker_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATTER_LISTEN", ":10000")
    monkeypatch.setenv("NATTER_REDIS", "redis://r:6379/0")
    args = parse(["broker"])
    assert args.server == ":10000" and args.redis == "redis://r:6379/0" and args.ip_rate == 200.0
    monkeypatch.setenv("NATTER_IP_RATE", "lots")
    with pytest.raises(UsageError, match="NATTER_IP_RATE"):
        parse(["broker"])


def test_config_file_then_environment_then_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = agent_file(
        tmp_path,
        'name = "alice"\nbrokers = ["b:1"]\nkeepalive = 30\nlisten = true\n'
        '[[forward]]\nspec = "8022:bob:22"\n[[forward]]\nlocal = ":9000"\npeer = "bob"\nremote = ":80"\n'
        '[peers]\nbob = "nt1-aaaaaaaaaaaaaaaaaaaaaaaaaa"\n',
    )
    args = parse(["agent", "--config", str(path)])
    assert args.name == "alice" and args.listen and args.keepalive == 30.0
    assert [f.remote for f in args.forwards] == [":22", ":80"]
    assert args.pinned == {"bob": "nt1-aaaaaaaaaaaaaaaaaaaaaaaaaa"}
    monkeypatch.setenv("NATTER_KEEPALIVE", "5")
    assert parse(["agent", "--config", str(path)]).keepalive == 5.0  # environment beats the file
    args = parse(["agent", "--config", str(path), "--keepalive", "9", "7000:carol:7"])
    assert args.keepalive == 9.0 and [f.peer for f in args.forwards] == ["carol"]  # flags beat both
    monkeypatch.setenv("NATTER_CONFIG", str(path))
    assert parse(["agent"]).name == "alice"


def test_default_agent_config_is_read_when_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "natter").mkdir(parents=True)
    (home / "natter" / "natter.toml").write_text('name = "dora"\nbrokers = "b:1"\nlisten = true\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    args = parse(["agent"])
    assert args.name == "dora" and args.listen


def test_seed_style_with_a_config_file(tmp_path: Path) -> None:
    path = agent_file(tmp_path, 'brokers = ["b:1"]\n')
    args = parse(["-name", "bob", "-config", str(path), "-listen"])
    assert args.broker == ["b:1"] and args.listen


def test_quic_engine_from_flag_environment_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert parse(["forward", "--name", "a", "--broker", "b:1", "1:bob:2"]).quic_engine == "qh3"  # the default
    assert (
        parse(["-name", "a", "-broker", "b:1", "-quic-engine", "aioquic", "1:bob:2"]).quic_engine == "aioquic"
    )
    path = agent_file(
        tmp_path,
        'name = "a"\nbrokers = ["b:1"]\nlisten = true\nquic_engine = "aioquic"\nupgrade_interval = 30\n',
    )
    args = parse(["agent", "--config", str(path)])
    assert args.quic_engine == "aioquic" and args.upgrade_interval == 30.0
    monkeypatch.setenv("NATTER_QUIC_ENGINE", "qh3")
    assert parse(["agent", "--config", str(path)]).quic_engine == "qh3"  # environment beats the file
    monkeypatch.setenv("NATTER_QUIC_ENGINE", "quiche")
    with pytest.raises(UsageError, match="NATTER_QUIC_ENGINE='quiche': choose from aioquic, qh3, native"):
        parse(["agent", "--config", str(path)])
    monkeypatch.delenv("NATTER_QUIC_ENGINE")
    bad = agent_file(tmp_path, 'name = "a"\nquic_engine = "quiche"\n')
    with pytest.raises(UsageError, match="quic_engine"):
        parse(["agent", "--config", str(bad)])


def test_udp_and_socks_forwards_from_flags_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from natter_agent import ForwardKind

    args = parse(["-name", "a", "-broker", "b:1", "-D", "1080:bob", "5353:bob:53/udp", "8022:bob:22"])
    assert [f.kind for f in args.forwards] == [ForwardKind.UDP, ForwardKind.TCP, ForwardKind.SOCKS]
    args = parse(["forward", "--name", "a", "--broker", "b:1", "--dynamic", "127.0.0.1:1080:bob"])
    assert args.forwards[0].local == "127.0.0.1:1080" and args.udp_idle_timeout == 60.0
    with pytest.raises(UsageError, match="SOCKS login needs both"):
        parse(["forward", "--name", "a", "--broker", "b:1", "-D", "1080:bob", "--socks-user", "ann"])
    monkeypatch.setenv("NATTER_SOCKS_PASSWORD", "pw")
    args = parse(["forward", "--name", "a", "--broker", "b:1", "-D", "1080:bob", "--socks-user", "ann"])
    assert (args.socks_username, args.socks_password) == ("ann", "pw")
    monkeypatch.delenv("NATTER_SOCKS_PASSWORD")
    with pytest.raises(UsageError, match="stdio mode"):
        parse(["-name", "a", "-broker", "b:1", "-D", "1080:bob", ":bob:22"])
    path = agent_file(
        tmp_path,
        'name = "a"\nbrokers = ["b:1"]\nudp_idle_timeout = 20\n'
        'socks_username = "ann"\nsocks_password = "s3cret"\n'
        '[[forward]]\nspec = "5353:bob:53"\nproto = "udp"\n'
        '[[forward]]\nlocal = "5354"\npeer = "bob"\nremote = "10.0.0.1:53"\nproto = "udp"\n'
        '[[forward]]\ndynamic = true\nlocal = "1080"\npeer = "bob"\n'
        '[[forward]]\nspec = "1081:bob"\ndynamic = true\n',
    )
    args = parse(["agent", "--config", str(path)])
    kinds = [(f.local, f.kind) for f in args.forwards]
    assert kinds == [
        (":5353", ForwardKind.UDP),
        (":5354", ForwardKind.UDP),
        (":1080", ForwardKind.SOCKS),
        (":1081", ForwardKind.SOCKS),
    ]
    assert args.udp_idle_timeout == 20.0 and args.socks_password == "s3cret"
    for bad, why in (
        ('[[forward]]\nspec = "1:bob:2"\nproto = "sctp"\n', "proto"),
        ('[[forward]]\ndynamic = true\nlocal = "1080"\npeer = "bob"\nproto = "udp"\n', "carries TCP"),
        ('[[forward]]\nspec = "1:bob:2"\ncolour = "red"\n', "colour"),
    ):
        with pytest.raises(UsageError, match=why):
            parse(["agent", "--config", str(agent_file(tmp_path, 'name = "a"\nbrokers = ["b:1"]\n' + bad))])
