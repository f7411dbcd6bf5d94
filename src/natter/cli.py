"""The ``natter`` command: the seed's single-dash form and GNU-style subcommands.

    natter -server 1.2.3.4:10000
    natter -name bob -broker 1.2.3.4:10000 -listen
    natter -name alice -broker 1.2.3.4:10000 8022:bob:22
    natter broker --listen ADDR
    natter listen --name N --broker ADDR
    natter forward --name N --broker ADDR SPEC...

A usage mistake prints one line and exits 2; a runtime failure prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import structlog

from natter_agent import Client, NatterError
from natter_agent.keystore import KEY_FILE, StateError, load_identity, state_dir
from natter_broker import Broker
from natter_proto import AddressError, Config
from natter_proto.acl import AclError, parse_peer_rule, parse_target_rule
from natter_proto.endpoints import split_host_port
from natter_proto.frames import valid_name
from natter_proto.identity import valid_fingerprint

from . import __version__, logs
from .specs import ForwardSpec, SpecError, parse_spec

EXIT_USAGE = 2
EXIT_FAILURE = 1
SUBCOMMANDS = ("broker", "listen", "forward", "id")

SPEC_HELP = (
    "forward spec [LOCALHOST:]LOCALPORT:PEER:[REMOTEHOST:]REMOTEPORT, e.g. 8022:bob:22; "
    "an empty LOCALPORT (:bob:22) pipes stdin/stdout"
)

log = structlog.get_logger("natter.cli")


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(parser: argparse.ArgumentParser, dash: str) -> None:
    parser.add_argument(
        f"{dash}log-format",
        choices=("auto", "console", "json"),
        default="auto",
        help="log format on stderr (default: console on a terminal, else json)",
    )
    parser.add_argument(f"{dash}log-level", choices=tuple(logs.LEVELS), default="info")


def _agent_options(parser: argparse.ArgumentParser, dash: str, legacy: bool) -> None:
    names = [f"{dash}name"] + (["-id"] if legacy else [])
    parser.add_argument(*names, dest="name", metavar="NAME", help="this client's name")
    parser.add_argument(
        f"{dash}broker",
        dest="broker",
        action="append",
        metavar="ADDR",
        help="broker HOST:PORT; repeat it (or use a name with several addresses) to fail over",
    )
    parser.add_argument(
        f"{dash}udp-port",
        dest="udp_port",
        type=int,
        default=0,
        metavar="PORT",
        help="local UDP port for the agent's one socket (default: any)",
    )
    parser.add_argument(
        f"{dash}keepalive",
        dest="keepalive",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="seconds between keepalives to the broker (default 20)",
    )
    _identity_options(parser, dash)
    parser.add_argument(
        f"{dash}token", dest="token", metavar="TOKEN", default="", help="token for a broker that requires one"
    )
    parser.add_argument(
        f"{dash}peer",
        dest="peers",
        action="append",
        default=[],
        metavar="NAME=FINGERPRINT",
        help="pin a peer's key: refuse a tunnel to or from NAME unless it proves this key",
    )
    parser.add_argument(
        f"{dash}allow",
        dest="allow",
        action="append",
        metavar="PEER[=FINGERPRINT]",
        help="listener: only these peers may connect (default: any authenticated peer)",
    )
    parser.add_argument(
        f"{dash}allow-target",
        dest="allow_targets",
        action="append",
        metavar="HOST:PORT|PORT|HOST:*|*",
        help="listener: where peers may connect to (default: loopback only, any port)",
    )


def _identity_options(parser: argparse.ArgumentParser, dash: str) -> None:
    parser.add_argument(
        f"{dash}state-dir",
        dest="state_dir",
        metavar="DIR",
        default="",
        help="where the identity key and known_peers live (default ~/.config/natter)",
    )


def _broker_options(parser: argparse.ArgumentParser, dash: str) -> None:
    parser.add_argument(
        f"{dash}redis",
        dest="redis",
        metavar="URL",
        default="",
        help="join a fleet of replicas sharing registrations in Redis (redis://HOST:PORT/DB)",
    )
    parser.add_argument(
        f"{dash}metrics",
        dest="metrics",
        metavar="ADDR",
        default="",
        help="serve /healthz, /readyz and /metrics over HTTP on ADDR (e.g. :9100)",
    )
    parser.add_argument(
        f"{dash}tokens",
        dest="tokens",
        metavar="FILE",
        default="",
        help="only agents listed in FILE ('NAME_OR_FINGERPRINT TOKEN' per line) may register",
    )
    parser.add_argument(
        f"{dash}ip-rate",
        dest="ip_rate",
        type=float,
        default=200.0,
        metavar="FRAMES",
        help="frames per second accepted from one source IP, bursts of twice that (default 200)",
    )
    parser.add_argument(
        f"{dash}broker-id",
        dest="broker_id",
        metavar="ID",
        default="",
        help="this replica's id in the fleet (default: hostname and a random suffix)",
    )


def legacy_parser() -> Parser:
    p = Parser(
        prog="natter",
        description="natter: forward TCP ports between machines behind NATs "
        "(seed-compatible form). "
        "Subcommands 'natter broker|listen|forward --help' offer the same with GNU-style options.",
        epilog="examples:\n  natter -server 1.2.3.4:10000\n"
        "  natter -name bob -broker 1.2.3.4:10000 -listen\n"
        "  natter -name alice -broker 1.2.3.4:10000 8022:bob:22\n"
        "  ssh -o ProxyCommand='natter -name alice -broker 1.2.3.4:10000 :bob:22' bob",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-server",
        "--server",
        dest="server",
        metavar="ADDR",
        help="run a broker listening on ADDR (e.g. :10000)",
    )
    _agent_options(p, "-", legacy=True)
    _broker_options(p, "-")
    p.add_argument(
        "-listen", "--listen", dest="listen", action="store_true", help="accept forwards from peers"
    )
    p.add_argument("specs", nargs="*", metavar="SPEC", help=SPEC_HELP)
    _common(p, "-")
    p.add_argument("-version", "--version", action="version", version=f"natter {__version__}")
    return p


def subcommand_parser() -> Parser:
    p = Parser(prog="natter", description="natter: forward TCP ports between machines behind NATs.")
    p.add_argument("--version", action="version", version=f"natter {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    broker = sub.add_parser(
        "broker",
        help="run a broker (rendezvous server)",
        description="Run a broker: agents register with it and it introduces them.",
    )
    broker.add_argument(
        "--listen",
        dest="server",
        metavar="ADDR",
        help="UDP address to listen on, e.g. :10000",
    )
    broker.add_argument(
        "--keepalive",
        dest="keepalive",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="keepalive interval suggested to agents (default 20)",
    )
    broker.add_argument(
        "--ttl",
        dest="ttl",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="an agent silent this long is offline (default 60)",
    )
    _broker_options(broker, "--")
    _common(broker, "--")
    listen = sub.add_parser(
        "listen",
        help="accept forwards from peers",
        description="Register with a broker and accept tunnels from peers.",
    )
    _agent_options(listen, "--", legacy=False)
    listen.add_argument("specs", nargs="*", metavar="SPEC", help=SPEC_HELP)
    _common(listen, "--")
    forward = sub.add_parser(
        "forward",
        help="forward local ports to peers",
        description="Forward local TCP ports (or stdio) to ports on peers.",
    )
    _agent_options(forward, "--", legacy=False)
    forward.add_argument("--listen", dest="listen", action="store_true", help="also accept forwards")
    forward.add_argument("specs", nargs="+", metavar="SPEC", help=SPEC_HELP)
    _common(forward, "--")
    ident = sub.add_parser(
        "id",
        help="show this agent's key fingerprint",
        description="Print the fingerprint of this agent's key (created on first use).",
    )
    _identity_options(ident, "--")
    _common(ident, "--")
    return p


# Environment variables fill in what the command line leaves out (flags win over them,
# they win over the built-in defaults): containers and systemd units configure natter so.
ENVIRONMENT = {
    "server": "NATTER_LISTEN",
    "redis": "NATTER_REDIS",
    "metrics": "NATTER_METRICS",
    "broker_id": "NATTER_BROKER_ID",
    "tokens": "NATTER_TOKENS",
    "ip_rate": "NATTER_IP_RATE",
    "name": "NATTER_NAME",
    "broker": "NATTER_BROKER",
    "state_dir": "NATTER_STATE_DIR",
    "token": "NATTER_TOKEN",
    "keepalive": "NATTER_KEEPALIVE",
    "udp_port": "NATTER_UDP_PORT",
    "log_format": "NATTER_LOG_FORMAT",
    "log_level": "NATTER_LOG_LEVEL",
}


def _with_environment(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse argv; then, for options left unset, take NATTER_* variables, then defaults."""
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    builtin: dict[str, object] = {}
    for each in parsers:
        for action in each._actions:
            if action.dest in ENVIRONMENT:
                builtin.setdefault(action.dest, action.default)
                action.default = None
    args = parser.parse_args(argv)
    actions = {a.dest: a for each in parsers for a in each._actions}
    for dest, variable in ENVIRONMENT.items():
        if not hasattr(args, dest) or getattr(args, dest) is not None:
            continue
        raw = os.environ.get(variable, "")
        if not raw:
            setattr(args, dest, builtin.get(dest))
            continue
        action = actions[dest]
        try:
            if isinstance(action, argparse._AppendAction):
                value: object = [item.strip() for item in raw.split(",") if item.strip()]
            else:
                value = action.type(raw) if callable(action.type) else raw
        except (TypeError, ValueError):
            raise UsageError(f"{variable}={raw!r} is not a valid value") from None
        if action.choices is not None and value not in action.choices:
            raise UsageError(f"{variable}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        setattr(args, dest, value)
    return args


def parse(argv: Sequence[str]) -> argparse.Namespace:
    if argv and argv[0] in SUBCOMMANDS:
        args = _with_environment(subcommand_parser(), argv)
        if args.command == "listen":
            args.listen = True
        if args.command == "id":
            return args
    else:
        if not argv:
            raise UsageError(
                "nothing to do: give -server ADDR, or -name NAME -broker ADDR (see 'natter --help')"
            )
        args = _with_environment(legacy_parser(), argv)
        args.command = "broker" if args.server else "client"
    if args.command == "broker":
        if not args.server:
            raise UsageError("a broker needs --listen ADDR (or NATTER_LISTEN)")
        if getattr(args, "name", None) or getattr(args, "specs", None) or getattr(args, "listen", False):
            raise UsageError("-server runs a broker and takes no -name, -listen or forward specs")
        if args.ip_rate <= 0:
            raise UsageError("--ip-rate must be positive")
        schemes = ("redis://", "rediss://", "unix://", "redis+sentinel://")
        if args.redis and not args.redis.startswith(schemes):
            raise UsageError(
                f"bad Redis URL {args.redis!r}: expected redis://HOST:PORT/DB or redis+sentinel://..."
            )
        if args.metrics:
            try:
                split_host_port(args.metrics)
            except ValueError as exc:
                raise UsageError(f"bad metrics address: {exc}") from None
        try:
            split_host_port(args.server)
        except ValueError as exc:
            raise UsageError(f"bad broker listen address: {exc}") from None
        return args
    if not args.name:
        raise UsageError("a client needs -name NAME (or give -server ADDR to run a broker)")
    if not valid_name(args.name):
        raise UsageError(f"invalid name {args.name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    if getattr(args, "redis", "") or getattr(args, "metrics", "") or getattr(args, "tokens", ""):
        raise UsageError("-redis, -metrics and -tokens are broker options (use them with -server)")
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
        args.forwards = [parse_spec(s) for s in args.specs]
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    if not args.listen and not args.forwards:
        raise UsageError("either give -listen or at least one forward spec")
    stdio = [f for f in args.forwards if f.is_stdio]
    if stdio and (len(args.forwards) > 1 or args.listen):
        raise UsageError("stdio mode (:PEER:PORT) takes exactly one spec and no -listen")
    if any(f.peer == args.name for f in args.forwards):
        raise UsageError("a forward cannot target this client's own name")
    if not 0 <= args.udp_port <= 65535:
        raise UsageError(f"bad UDP port {args.udp_port}")
    if args.keepalive <= 0:
        raise UsageError("keepalive must be positive")
    args.pinned = {}
    for pin in args.peers:
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


async def run_broker(args: argparse.Namespace) -> int:
    config = Config(
        broker_addr=args.server,
        redis_url=args.redis,
        metrics_addr=args.metrics,
        broker_id=args.broker_id,
        tokens_file=args.tokens,
        rate_per_ip=args.ip_rate,
        burst_per_ip=2 * args.ip_rate,
    )
    if hasattr(args, "ttl"):
        config.keepalive_interval = args.keepalive
        config.registration_ttl = args.ttl
    broker = Broker(config)
    await broker.start()
    try:
        await _until_signalled()
    finally:
        await broker.close()
    return 0


async def run_client(args: argparse.Namespace) -> int:
    config = Config(
        client_user=args.name,
        broker_addr=args.broker,
        udp_port=args.udp_port,
        keepalive_interval=args.keepalive,
        state_dir=args.state_dir,
        token=args.token,
        pinned_peers=args.pinned,
        allow_peers=args.allow,
        allow_targets=args.allow_targets,
    )
    client = Client(config)
    try:
        forwards: list[ForwardSpec] = args.forwards
        if forwards and forwards[0].is_stdio:
            return await _run_stdio(client, forwards[0])
        if args.listen:
            await client.listen(wait=False)
        for spec in forwards:
            await client.forward(spec.local, spec.peer, spec.remote)
        await _until_signalled()
        return 0
    finally:
        await client.close()


async def _run_stdio(client: Client, spec: ForwardSpec) -> int:
    try:
        await client.forward_stdio(spec.peer, spec.remote)
    except (NatterError, TimeoutError, ConnectionError) as exc:
        log.error(f"stdio forward to {spec.peer} failed", reason=str(exc) or "timed out")
        return EXIT_FAILURE
    return 0


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")


def show_id(args: argparse.Namespace) -> int:
    try:
        directory = state_dir(args.state_dir)
        identity, created = load_identity(directory)
    except StateError as exc:
        print(f"natter: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(identity.fingerprint)
    if created:
        print(f"natter: created a new key in {directory / KEY_FILE}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
    except UsageError as exc:
        print(f"natter: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(args.log_format, args.log_level)
    if args.command == "id":
        return show_id(args)
    runner = run_broker if args.command == "broker" else run_client
    try:
        return asyncio.run(runner(args))
    except (AddressError, NatterError, StateError, OSError) as exc:
        print(f"natter: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
