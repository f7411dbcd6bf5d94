"""TOML configuration files for agents and brokers.

Agent (default ``~/.config/natter/natter.toml``)::

    name = "alice"
    brokers = ["b1.example.com:10000", "b2.example.com:10000"]
    listen = true
    allow = ["carol", "dave=nt1-..."]
    allow_targets = ["127.0.0.1:22", "5432"]
    [peers]
    bob = "nt1-..."
    [[forward]]
    local = "127.0.0.1:8022"     # or: spec = "8022:bob:22"
    peer = "bob"
    remote = ":22"
    [[forward]]
    spec = "5353:bob:53"         # or local, peer and remote
    proto = "udp"                # UDP datagrams ("tcp" is the default)
    [[forward]]
    dynamic = true               # a SOCKS5 server, as ssh -D (or: spec = "1080:bob")
    local = "1080"
    peer = "bob"
    socks_username = "ann"       # SOCKS clients log in (RFC 1929), with
    socks_password = "..."       # this password

Broker (default ``/etc/natter/broker.toml``)::

    listen = ":10000"
    redis = "redis://redis:6379/0"
    metrics = ":9100"

Every value is checked here, and a bad one is reported as ``FILE:LINE: KEY: problem``.
Command-line flags override the file, and ``NATTER_*`` variables override the file too.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from natter_proto.acl import AclError, parse_peer_rule, parse_target_rule
from natter_proto.config import QUIC_ENGINES
from natter_proto.endpoints import AddressError, split_host_port
from natter_proto.frames import valid_name
from natter_proto.identity import valid_fingerprint

from .specs import ForwardSpec, SpecError, parse_dynamic, parse_spec

MAX_CONFIG = 1 << 20
LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    pass


def default_agent_config() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "natter" / "natter.toml"


DEFAULT_BROKER_CONFIG = Path("/etc/natter/broker.toml")


def _address(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string HOST:PORT")
    try:
        split_host_port(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not valid_name(value):
        raise ValueError("must be a name of letters, digits, '.', '_' or '-'")
    return value


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError("must be a positive number")
    return float(value)


def _non_negative(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError("must be a number, 0 or more")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a whole number, 1 or more")
    return value


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError("must be a port number 0-65535")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return str(value)

    return check


def _list_of(item: Callable[[Any], str]) -> Callable[[Any], list[str]]:
    def check(value: Any) -> list[str]:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values:
            raise ValueError("must be a string or a non-empty list of strings")
        return [item(v) for v in values]

    return check


def _peer_rule(value: Any) -> str:
    try:
        parse_peer_rule(_string(value))
    except AclError as exc:
        raise ValueError(str(exc)) from None
    return str(value)


def _target_rule(value: Any) -> str:
    try:
        parse_target_rule(_string(value))
    except AclError as exc:
        raise ValueError(str(exc)) from None
    return str(value)


def _pins(value: Any) -> list[str]:
    if not isinstance(value, dict):
        raise ValueError("must be a table of NAME = FINGERPRINT")
    pins = []
    for name, print_ in value.items():
        if not valid_name(name) or not isinstance(print_, str) or not valid_fingerprint(print_):
            raise ValueError(f"{name} = {print_!r}: expected NAME = \"nt1-...\" (see 'natter id')")
        pins.append(f"{name}={print_}")
    return pins


def _forwards(value: Any) -> list[ForwardSpec]:
    tables = value if isinstance(value, list) else None
    if not tables:
        raise ValueError("must be one or more [[forward]] tables")
    return [_forward(table) for table in tables]


def _forward(table: Any) -> ForwardSpec:
    if not isinstance(table, dict):
        raise ValueError("each forward must be a table")
    unknown = set(table) - {"spec", "local", "peer", "remote", "proto", "dynamic"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} in a forward")
    dynamic = _boolean(table.get("dynamic", False))
    proto = table.get("proto", "tcp")
    if proto not in ("tcp", "udp"):
        raise ValueError(f"proto {proto!r}: choose tcp or udp")
    needs = {"local", "peer"} if dynamic else {"local", "peer", "remote"}
    if "spec" in table:
        spec = _string(table["spec"])
    else:
        missing = needs - set(table)
        if missing:
            raise ValueError(
                f"a forward needs spec, or {', '.join(sorted(needs))} (missing {sorted(missing)})"
            )
        parts = [table[key] for key in ("local", "peer", "remote") if key in needs]
        spec = ":".join(_string(part) for part in parts)
    if dynamic and proto == "udp":
        raise ValueError('a SOCKS forward (dynamic = true) carries TCP: no proto = "udp"')
    try:
        if dynamic:
            return parse_dynamic(spec)
        return parse_spec(spec + ("/udp" if proto == "udp" and "/" not in spec else ""))
    except SpecError as exc:
        raise ValueError(str(exc)) from None


# key in the file -> (argparse dest, checker)
AGENT_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "name": ("name", _name),
    "brokers": ("broker", _list_of(_address)),
    "listen": ("listen", _boolean),
    "forward": ("specs", _forwards),
    "keepalive": ("keepalive", _positive),
    "upgrade_interval": ("upgrade_interval", _positive),
    "quic_engine": ("quic_engine", _choice(QUIC_ENGINES)),
    "udp_port": ("udp_port", _port),
    "state_dir": ("state_dir", _string),
    "token": ("token", _string),
    "peers": ("peers", _pins),
    "allow": ("allow", _list_of(_peer_rule)),
    "allow_targets": ("allow_targets", _list_of(_target_rule)),
    "max_connections": ("max_connections", _count),
    "udp_idle_timeout": ("udp_idle_timeout", _positive),
    "socks_username": ("socks_username", _string),
    "socks_password": ("socks_password", _string),
    "proxy": ("proxy", _string),
    "broker_ca": ("broker_ca", _string),
    "broker_key": ("broker_key", _string),
    "metrics": ("metrics", _address),
    "log_format": ("log_format", _choice(LOG_FORMATS)),
    "log_level": ("log_level", _choice(LOG_LEVELS)),
}
BROKER_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "listen": ("server", _address),
    "redis": ("redis", _string),
    "metrics": ("metrics", _address),
    "broker_id": ("broker_id", _string),
    "probe": ("probe", _address),
    "relay_mb": ("relay_mb", _non_negative),
    "tcp_listen": ("tcp_listen", _string),
    "mesh_listen": ("mesh_listen", _address),
    "mesh_advertise": ("mesh_advertise", _address),
    "fleet_secret_file": ("fleet_secret_file", _string),
    "tls_cert": ("tls_cert", _string),
    "tls_key": ("tls_key", _string),
    "relay_seconds": ("relay_seconds", _positive),
    "tokens": ("tokens", _string),
    "names": ("names", _string),
    "state_dir": ("state_dir", _string),
    "ip_rate": ("ip_rate", _positive),
    "keepalive": ("keepalive", _positive),
    "ttl": ("ttl", _positive),
    "log_format": ("log_format", _choice(LOG_FORMATS)),
    "log_level": ("log_level", _choice(LOG_LEVELS)),
}


def _line_of(text: str, key: str) -> int:
    pattern = re.compile(rf"^\s*(\[\[?\s*)?{re.escape(key)}\b")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return 1


def load(path: Path, kind: str) -> dict[str, Any]:
    """Read and check a config file; returns values by argparse dest."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG} bytes")
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    keys = AGENT_KEYS if kind == "agent" else BROKER_KEYS
    values: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}:{_line_of(text, key)}: {key}"
        if key not in keys:
            known = ", ".join(sorted(keys))
            raise ConfigError(f"{where}: unknown key for a {kind} config (known: {known})")
        dest, check = keys[key]
        try:
            values[dest] = check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return values


def guess_kind(path: Path) -> str:
    """broker or agent, from the keys a file uses (for `natter config check`)."""
    try:
        data = tomllib.loads(path.read_text(errors="replace")[:MAX_CONFIG])
    except (OSError, tomllib.TOMLDecodeError):
        return "agent"
    broker_only = {"redis", "ttl", "tokens", "ip_rate", "broker_id"}
    if broker_only & set(data) or isinstance(data.get("listen"), str):
        return "broker"
    return "agent"
