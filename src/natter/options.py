"""From argv, NATTER_* variables and config files to one checked set of options.

Precedence: command-line flags, then environment variables, then the config file, then
the built-in defaults. Every mistake becomes a UsageError: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from natter_agent.brokerstream import Proxy
from natter_proto.acl import AclError, parse_peer_rule, parse_target_rule
from natter_proto.endpoints import split_host_port
from natter_proto.frames import valid_name
from natter_proto.identity import valid_fingerprint
from natter_proto.mesh import MIN_SECRET

from . import configfile
from .configfile import DEFAULT_BROKER_CONFIG, ConfigError, default_agent_config, guess_kind
from .parsers import SUBCOMMANDS, UsageError, legacy_parser, subcommand_parser
from .specs import ForwardSpec, SpecError, parse_dynamic, parse_spec

# Environment variables fill in what the command line leaves out (flags win over them,
# they win over the built-in defaults): containers and systemd units configure natter so.
ENVIRONMENT = {
    "server": "NATTER_LISTEN",
    "redis": "NATTER_REDIS",
    "metrics": "NATTER_METRICS",
    "broker_id": "NATTER_BROKER_ID",
    "tokens": "NATTER_TOKENS",
    "names": "NATTER_NAMES",
    "ip_rate": "NATTER_IP_RATE",
    "probe": "NATTER_PROBE",
    "relay_mb": "NATTER_RELAY_MB",
    "tcp_listen": "NATTER_TCP_LISTEN",
    "tls_cert": "NATTER_TLS_CERT",
    "tls_key": "NATTER_TLS_KEY",
    "proxy": "NATTER_PROXY",
    "broker_ca": "NATTER_BROKER_CA",
    "broker_key": "NATTER_BROKER_KEY",
    "relay_seconds": "NATTER_RELAY_SECONDS",
    "mesh_listen": "NATTER_MESH_LISTEN",
    "mesh_advertise": "NATTER_MESH_ADVERTISE",
    "fleet_secret_file": "NATTER_FLEET_SECRET_FILE",
    "fleet_secret": "NATTER_FLEET_SECRET",
    "name": "NATTER_NAME",
    "broker": "NATTER_BROKER",
    "state_dir": "NATTER_STATE_DIR",
    "token": "NATTER_TOKEN",
    "keepalive": "NATTER_KEEPALIVE",
    "upgrade_interval": "NATTER_UPGRADE_INTERVAL",
    "quic_engine": "NATTER_QUIC_ENGINE",
    "max_connections": "NATTER_MAX_CONNECTIONS",
    "udp_idle_timeout": "NATTER_UDP_IDLE_TIMEOUT",
    "socks_username": "NATTER_SOCKS_USER",
    "socks_password": "NATTER_SOCKS_PASSWORD",
    "udp_port": "NATTER_UDP_PORT",
    "log_format": "NATTER_LOG_FORMAT",
    "log_level": "NATTER_LOG_LEVEL",
    "config": "NATTER_CONFIG",
}


def _actions(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                parsers += _actions(child)
    return parsers


def _resolve(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse argv; options it leaves unset come from NATTER_* variables, then the config
    file, then the built-in defaults."""
    parsers = _actions(parser)
    builtin: dict[str, object] = {}
    for each in parsers:
        for action in each._actions:
            if action.dest in ENVIRONMENT or action.dest in FROM_CONFIG:
                builtin.setdefault(action.dest, action.default)
                action.default = None
    args = parser.parse_args(argv)
    actions = {a.dest: a for each in parsers for a in each._actions}
    from_file = _config_values(args)
    for dest in sorted(set(ENVIRONMENT) | FROM_CONFIG):
        if not hasattr(args, dest) or getattr(args, dest) not in (None, [], False):
            continue
        value = _from_environment(dest, actions[dest]) if dest in ENVIRONMENT else None
        if value is None:
            value = from_file.get(dest, builtin.get(dest))
        setattr(args, dest, value)
    if hasattr(args, "specs"):
        args.specs = args.specs or []
    if hasattr(args, "peers"):
        args.peers = args.peers or []
    if hasattr(args, "dynamic"):
        args.dynamic = args.dynamic or []
    return args


# options a config file may set beyond the NATTER_* ones
FROM_CONFIG = {"listen", "specs", "peers", "allow", "allow_targets", "ttl"}  # and ENVIRONMENT's


def _config_values(args: argparse.Namespace) -> dict[str, Any]:
    if not hasattr(args, "config") or getattr(args, "command", None) in ("id", "config", "status"):
        return {}
    broker = getattr(args, "command", None) == "broker" or bool(getattr(args, "server", None))
    explicit = args.config or os.environ.get("NATTER_CONFIG")
    path = Path(explicit) if explicit else (DEFAULT_BROKER_CONFIG if broker else default_agent_config())
    if not explicit and not path.exists():
        return {}
    kind = "broker" if broker or (explicit and guess_kind(path) == "broker") else "agent"
    try:
        values = configfile.load(path, kind)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if kind == "broker" and getattr(args, "command", None) == "client":
        args.command = "broker"
    return values


def _from_environment(dest: str, action: argparse.Action) -> object | None:
    variable = ENVIRONMENT[dest]
    raw = os.environ.get(variable, "")
    if not raw:
        return None
    try:
        if isinstance(action, argparse._AppendAction):
            value: object = [item.strip() for item in raw.split(",") if item.strip()]
        else:
            value = action.type(raw) if callable(action.type) else raw
    except (TypeError, ValueError):
        raise UsageError(f"{variable}={raw!r} is not a valid value") from None
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{variable}={raw!r}: choose from {', '.join(map(str, action.choices))}")
    return value


def parse(argv: Sequence[str]) -> argparse.Namespace:
    if argv and argv[0] in SUBCOMMANDS:
        args = _resolve(subcommand_parser(), argv)
        if args.command == "listen":
            args.listen = True
        if args.command in ("id", "config", "status"):
            return args
    else:
        if not argv:
            raise UsageError(
                "nothing to do: give -server ADDR, or -name NAME -broker ADDR (see 'natter --help')"
            )
        args = _resolve(legacy_parser(), argv)
        args.command = "broker" if args.server else "client"
        if args.command == "client" and args.config and guess_kind(Path(args.config)) == "broker":
            args.command = "broker"
    if args.command == "broker":
        if not args.server:
            raise UsageError("a broker needs --listen ADDR (or NATTER_LISTEN)")
        if getattr(args, "name", None) or getattr(args, "specs", None) or getattr(args, "listen", False):
            raise UsageError("-server runs a broker and takes no -name, -listen or forward specs")
        if args.ip_rate <= 0:
            raise UsageError("--ip-rate must be positive")
        if args.fleet_secret_file and not args.fleet_secret:
            try:
                args.fleet_secret = Path(args.fleet_secret_file).read_text().strip()
            except OSError as exc:
                raise UsageError(f"--fleet-secret-file {args.fleet_secret_file}: {exc.strerror}") from None
        if args.mesh_listen:
            if not args.redis:
                raise UsageError("--mesh-listen relays between replicas of a fleet: add --redis")
            if len(args.fleet_secret.encode()) < MIN_SECRET:
                raise UsageError(
                    f"--mesh-listen needs the fleet secret ({MIN_SECRET} bytes or more) in"
                    " NATTER_FLEET_SECRET or --fleet-secret-file"
                )
            for what, value in (
                ("--mesh-listen", args.mesh_listen),
                ("--mesh-advertise", args.mesh_advertise),
            ):
                if value:
                    try:
                        split_host_port(value)
                    except ValueError as exc:
                        raise UsageError(f"bad {what} address: {exc}") from None
        if args.relay_mb < 0 or args.relay_seconds <= 0:
            raise UsageError("--relay-mb must be 0 or more and --relay-seconds positive")
        schemes = ("redis://", "rediss://", "unix://", "redis+sentinel://")
        if args.redis and not args.redis.startswith(schemes):
            raise UsageError(
                f"bad Redis URL {args.redis!r}: expected redis://HOST:PORT/DB or redis+sentinel://..."
            )
        if bool(args.tls_cert) != bool(args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        if args.tcp_listen and args.tcp_listen != "off":
            try:
                split_host_port(args.tcp_listen)
            except ValueError as exc:
                raise UsageError(f"bad TCP listen address: {exc}") from None
        for what, value in (("metrics", args.metrics), ("probe", args.probe)):
            if value:
                try:
                    split_host_port(value)
                except ValueError as exc:
                    raise UsageError(f"bad {what} address: {exc}") from None
        try:
            split_host_port(args.server)
        except ValueError as exc:
            raise UsageError(f"bad broker listen address: {exc}") from None
        return args
    if not args.name:
        raise UsageError("a client needs -name NAME (or give -server ADDR to run a broker)")
    if not valid_name(args.name):
        raise UsageError(f"invalid name {args.name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    if getattr(args, "redis", "") or getattr(args, "tokens", "") or getattr(args, "probe", ""):
        raise UsageError("-redis, -tokens and -probe are broker options (use them with -server)")
    if args.metrics:
        try:
            split_host_port(args.metrics)
        except ValueError as exc:
            raise UsageError(f"bad metrics address: {exc}") from None
    if args.proxy and args.proxy != "none":
        try:
            Proxy.parse(args.proxy)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.broker_key and not args.broker_key.startswith("SHA256:"):
        raise UsageError(f"bad --broker-key {args.broker_key!r}: expected SHA256:... as the broker logs it")
    if args.broker_ca and args.broker_ca != "system" and not Path(args.broker_ca).is_file():
        raise UsageError(f"--broker-ca {args.broker_ca}: no such file")
    if not args.broker:
        raise UsageError("a client needs -broker HOST:PORT")
    for broker in args.broker:
        try:
            _, port = split_host_port(broker)
        except ValueError as exc:
            raise UsageError(f"bad broker address: {exc}") from None
        if port == 0:
            raise UsageError(f"bad broker address {broker!r}: port 0")
    try:
        args.forwards = [s if isinstance(s, ForwardSpec) else parse_spec(s) for s in args.specs]
        args.forwards += [parse_dynamic(s) for s in args.dynamic]
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    if args.udp_idle_timeout <= 0:
        raise UsageError("--udp-idle-timeout must be positive")
    if bool(args.socks_username) != bool(args.socks_password):
        raise UsageError(
            "SOCKS login needs both a user (--socks-user, socks_username) and a password"
            " (socks_password in the config file, or NATTER_SOCKS_PASSWORD)"
        )
    if not args.listen and not args.forwards:
        raise UsageError("either give -listen or at least one forward spec (or a config file with them)")
    stdio = [f for f in args.forwards if f.is_stdio]
    if stdio and (len(args.forwards) > 1 or args.listen):
        raise UsageError("stdio mode (:PEER:PORT) takes exactly one spec, no -D and no -listen")
    if any(f.peer == args.name for f in args.forwards):
        raise UsageError("a forward cannot target this client's own name")
    if not 0 <= args.udp_port <= 65535:
        raise UsageError(f"bad UDP port {args.udp_port}")
    if args.keepalive <= 0:
        raise UsageError("keepalive must be positive")
    args.pinned = {}
    for pin in args.peers or []:
        name, _, print_ = pin.partition("=")
        if not valid_name(name) or not valid_fingerprint(print_):
            raise UsageError(f"--peer {pin!r}: expected NAME=FINGERPRINT (see 'natter id')")
        args.pinned[name] = print_
    try:
        for rule in args.allow or []:
            parse_peer_rule(rule)
        for rule in args.allow_targets or []:
            parse_target_rule(rule)
    except AclError as exc:
        raise UsageError(str(exc)) from None
    if (args.allow or args.allow_targets) and not args.listen:
        raise UsageError("--allow and --allow-target restrict a listener: add -listen")
    return args
