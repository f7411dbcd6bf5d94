"""The natter command's option parsers: the seed's single-dash form and subcommands."""

from __future__ import annotations

import argparse
from typing import NoReturn

from natter_proto.agent.settings import DEFAULTS
from natter_proto.config import DEFAULT_ENGINE, QUIC_ENGINES, Config

from . import __version__, logs

SUBCOMMANDS = ("broker", "listen", "forward", "agent", "id", "config", "status")

SPEC_HELP = (
    "forward spec [LOCALHOST:]LOCALPORT:PEER:[REMOTEHOST:]REMOTEPORT, e.g. 8022:bob:22; "
    "add /udp to forward UDP (5353:bob:53/udp); an empty LOCALPORT (:bob:22) pipes stdin/stdout"
)


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_at_least_one.__name__ = "whole number, 1 or more"  # argparse names the type in its error


def _flags(dash: str, name: str) -> tuple[str, str]:
    """Both spellings of an option, this form's first: the seed form takes ``--state-dir``
    as well as ``-state-dir``, and the subcommands take ``-state-dir`` too."""
    other = "--" if dash == "-" else "-"
    return f"{dash}{name}", f"{other}{name}"


def _common(parser: argparse.ArgumentParser, dash: str) -> None:
    parser.add_argument(
        *_flags(dash, "log-format"),
        choices=("auto", "console", "json"),
        default="auto",
        help="log format on stderr (default: console on a terminal, else json)",
    )
    parser.add_argument(*_flags(dash, "log-level"), choices=tuple(logs.LEVELS), default="info")


def _agent_options(parser: argparse.ArgumentParser, dash: str, legacy: bool) -> None:
    names = [*_flags(dash, "name")] + (["-id"] if legacy else [])
    parser.add_argument(*names, dest="name", metavar="NAME", help="this client's name")
    parser.add_argument(
        *_flags(dash, "broker"),
        dest="broker",
        action="append",
        metavar="ADDR",
        help="broker HOST:PORT; repeat it (or use a name with several addresses) to fail over",
    )
    parser.add_argument(
        *_flags(dash, "proxy"),
        dest="proxy",
        metavar="URL",
        default="",
        help="HTTP CONNECT proxy for the TCP way to the broker, http://HOST:PORT"
        " (default: HTTPS_PROXY; 'none': never)",
    )
    parser.add_argument(
        *_flags(dash, "broker-ca"),
        dest="broker_ca",
        metavar="FILE",
        default="",
        help="verify the broker's TLS certificate against FILE's CAs ('system': the system's);"
        " default: any, its key remembered and a change warned about",
    )
    parser.add_argument(
        *_flags(dash, "broker-key"),
        dest="broker_key",
        metavar="SHA256",
        default="",
        help="pin the broker's TLS key (SHA256:..., as the broker logs it at start)",
    )
    parser.add_argument(
        *_flags(dash, "udp-port"),
        dest="udp_port",
        type=int,
        default=0,
        metavar="PORT",
        help="local UDP port for the agent's one socket (default: any)",
    )
    parser.add_argument(
        *_flags(dash, "keepalive"),
        dest="keepalive",
        type=float,
        default=DEFAULTS.keepalive_interval,
        metavar="SECONDS",
        help=f"seconds between keepalives to the broker (default {DEFAULTS.keepalive_interval:g})",
    )
    parser.add_argument(
        *_flags(dash, "upgrade-interval"),
        dest="upgrade_interval",
        type=float,
        default=DEFAULTS.upgrade_interval,
        metavar="SECONDS",
        help=f"while relayed, look for a direct path this often (default {DEFAULTS.upgrade_interval:g})",
    )
    parser.add_argument(
        *_flags(dash, "quic-engine"),
        dest="quic_engine",
        choices=QUIC_ENGINES,
        default=DEFAULT_ENGINE,
        help=(
            f"QUIC implementation for tunnels (default {DEFAULT_ENGINE}); peers need the same one,"
            " except that native and aioquic work together"
        ),
    )
    parser.add_argument(
        *_flags(dash, "max-connections"),
        dest="max_connections",
        type=_at_least_one,
        default=Config.max_connections,
        metavar="N",
        help=f"connections one forward serves at once; more are refused (default {Config.max_connections})",
    )
    parser.add_argument(
        "-D",
        *_flags(dash, "dynamic"),
        dest="dynamic",
        action="append",
        default=[],
        metavar="[HOST:]PORT:PEER",
        help="a SOCKS5 server on PORT (loopback unless HOST is given), as ssh -D: each"
        " connection goes where it asks, resolved and connected from PEER's side",
    )
    parser.add_argument(
        *_flags(dash, "udp-idle-timeout"),
        dest="udp_idle_timeout",
        type=float,
        default=Config.udp_idle_timeout,
        metavar="SECONDS",
        help=f"a UDP forward's flow ends after this long idle (default {Config.udp_idle_timeout:g})",
    )
    parser.add_argument(
        *_flags(dash, "socks-user"),
        dest="socks_username",
        default="",
        metavar="USER",
        help="SOCKS clients must log in as USER with the password from the config file's"
        " socks_password or NATTER_SOCKS_PASSWORD (RFC 1929)",
    )
    parser.add_argument("--socks-password", dest="socks_password", default="", help=argparse.SUPPRESS)
    _identity_options(parser, dash)
    parser.add_argument(
        *_flags(dash, "token"),
        dest="token",
        metavar="TOKEN",
        default="",
        help="token for a broker that requires one",
    )
    parser.add_argument(
        *_flags(dash, "peer"),
        dest="peers",
        action="append",
        default=[],
        metavar="NAME=FINGERPRINT",
        help="pin a peer's key: refuse a tunnel to or from NAME unless it proves this key",
    )
    parser.add_argument(
        *_flags(dash, "allow"),
        dest="allow",
        action="append",
        metavar="PEER[=FINGERPRINT]",
        help="listener: only these peers may connect (default: any authenticated peer)",
    )
    parser.add_argument(
        *_flags(dash, "allow-target"),
        dest="allow_targets",
        action="append",
        metavar="HOST:PORT|PORT|HOST:*|*[/udp]",
        help="listener: where peers may connect to, TCP or with /udp UDP"
        " (default: loopback only, any port, both)",
    )


def _config_option(parser: argparse.ArgumentParser, dash: str, default: str) -> None:
    parser.add_argument(
        *_flags(dash, "config"),
        dest="config",
        metavar="FILE",
        default=None,
        help=f"TOML configuration file (default {default}, if it exists); flags override it",
    )


def _agent_metrics(parser: argparse.ArgumentParser, dash: str) -> None:
    parser.add_argument(
        *_flags(dash, "metrics"),
        dest="metrics",
        metavar="ADDR",
        default="",
        help="serve /healthz and /metrics (tunnels, bytes, drops) over HTTP on ADDR",
    )


def _identity_options(parser: argparse.ArgumentParser, dash: str) -> None:
    parser.add_argument(
        *_flags(dash, "state-dir"),
        dest="state_dir",
        metavar="DIR",
        default="",
        help=(
            "where the identity key and known_peers live, and with -server the name bindings"
            " (default ~/.config/natter)"
        ),
    )


def _broker_options(parser: argparse.ArgumentParser, dash: str) -> None:
    parser.add_argument(
        *_flags(dash, "redis"),
        dest="redis",
        metavar="URL",
        default="",
        help="join a fleet of replicas sharing registrations in Redis (redis://HOST:PORT/DB)",
    )
    parser.add_argument(
        *_flags(dash, "metrics"),
        dest="metrics",
        metavar="ADDR",
        default="",
        help="serve /healthz, /readyz and /metrics over HTTP on ADDR (e.g. :9100)",
    )
    parser.add_argument(
        *_flags(dash, "tokens"),
        dest="tokens",
        metavar="FILE",
        default="",
        help="only agents listed in FILE ('NAME_OR_FINGERPRINT TOKEN' per line) may register",
    )
    parser.add_argument(
        *_flags(dash, "names"),
        dest="names",
        metavar="FILE",
        default="",
        help="bind names to keys before anyone registers ('NAME FINGERPRINT' per line, see 'natter id')",
    )
    parser.add_argument(
        *_flags(dash, "probe"),
        dest="probe",
        metavar="ADDR",
        default="",
        help="second UDP port (e.g. :10001) where agents learn whether their NAT is symmetric",
    )
    parser.add_argument(
        *_flags(dash, "tcp-listen"),
        dest="tcp_listen",
        metavar="ADDR",
        default="",
        help="take agents whose UDP is blocked over TCP (TLS, WebSocket) on ADDR, e.g. :443"
        " (default: the UDP address's port; 'off': none)",
    )
    parser.add_argument(
        *_flags(dash, "tls-cert"),
        dest="tls_cert",
        metavar="FILE",
        default="",
        help="PEM certificate chain for the TCP way in (default: a self-signed one kept in the state dir)",
    )
    parser.add_argument(
        *_flags(dash, "tls-key"),
        dest="tls_key",
        metavar="FILE",
        default="",
        help="PEM private key for --tls-cert",
    )
    parser.add_argument(
        *_flags(dash, "relay-mb"),
        dest="relay_mb",
        type=float,
        default=1024.0,
        metavar="MB",
        help="relay at most this many MB per session when no direct path works (0: no relay; default 1024)",
    )
    parser.add_argument(
        *_flags(dash, "relay-seconds"),
        dest="relay_seconds",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="relay a session for at most this long (default 3600)",
    )
    parser.add_argument(
        *_flags(dash, "mesh-listen"),
        dest="mesh_listen",
        metavar="ADDR",
        default="",
        help="relay to other replicas straight over UDP on ADDR (a private address, e.g. the pod's"
        " :10002) instead of through Redis; needs the fleet secret in NATTER_FLEET_SECRET or"
        " --fleet-secret-file",
    )
    parser.add_argument(
        *_flags(dash, "mesh-advertise"),
        dest="mesh_advertise",
        metavar="HOST:PORT",
        default="",
        help="the address other replicas send mesh packets to (default: the one bound)",
    )
    parser.add_argument(
        *_flags(dash, "fleet-secret-file"),
        dest="fleet_secret_file",
        metavar="FILE",
        default="",
        help="the secret all replicas share, authenticating the relay mesh (16 bytes or more)",
    )
    parser.add_argument("--fleet-secret", dest="fleet_secret", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        *_flags(dash, "ip-rate"),
        dest="ip_rate",
        type=float,
        default=200.0,
        metavar="FRAMES",
        help="frames per second accepted from one source IP, bursts of twice that (default 200)",
    )
    parser.add_argument(
        *_flags(dash, "broker-id"),
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
    _config_option(p, "-", "~/.config/natter/natter.toml, or /etc/natter/broker.toml with -server")
    p.add_argument(
        *_flags("-", "listen"), dest="listen", action="store_true", help="accept forwards from peers"
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
        *_flags("--", "listen"),
        dest="server",
        metavar="ADDR",
        help="UDP address to listen on, e.g. :10000",
    )
    broker.add_argument(
        *_flags("--", "keepalive"),
        dest="keepalive",
        type=float,
        default=DEFAULTS.keepalive_interval,
        metavar="SECONDS",
        help=f"keepalive interval suggested to agents (default {DEFAULTS.keepalive_interval:g})",
    )
    broker.add_argument(
        *_flags("--", "ttl"),
        dest="ttl",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="an agent silent this long is offline (default 60)",
    )
    _broker_options(broker, "--")
    broker.add_argument(
        *_flags("--", "state-dir"),
        dest="state_dir",
        metavar="DIR",
        default="",
        help="where a lone broker keeps which key owns which name (default ~/.config/natter)",
    )
    _config_option(broker, "--", "/etc/natter/broker.toml")
    _common(broker, "--")
    agent_commands = (
        (
            "listen",
            "accept forwards from peers",
            "Register with a broker and accept tunnels from peers.",
            None,
        ),
        (
            "forward",
            "forward local ports to peers",
            "Forward local TCP ports (or stdio) to ports on peers.",
            "also accept forwards",
        ),
        (
            "agent",
            "run an agent as its config file says (listen and/or forwards)",
            "Run an agent: listen if configured, and every forward of the config file.",
            "accept forwards",
        ),
    )
    for name, summary, description, listen_help in agent_commands:
        command = sub.add_parser(name, help=summary, description=description)
        _agent_options(command, "--", legacy=False)
        _agent_metrics(command, "--")
        _config_option(command, "--", "~/.config/natter/natter.toml")
        if listen_help is not None:
            command.add_argument(
                *_flags("--", "listen"), dest="listen", action="store_true", help=listen_help
            )
        command.add_argument("specs", nargs="*", metavar="SPEC", help=SPEC_HELP)
        _common(command, "--")
    config = sub.add_parser(
        "config",
        help="check a configuration file",
        description="Check a TOML configuration file: prints 'ok' or the first problem (FILE:LINE: KEY).",
    )
    config_sub = config.add_subparsers(dest="config_command", required=True, parser_class=Parser)
    check = config_sub.add_parser("check", help="check FILE")
    check.add_argument("file", metavar="FILE")
    check.add_argument(
        *_flags("--", "kind"),
        choices=("agent", "broker"),
        default=None,
        help="default: guessed from the keys",
    )
    _common(config, "--")
    status = sub.add_parser(
        "status",
        help="show a running agent's tunnels",
        description="Ask the agent running with this state directory for its tunnels.",
    )
    _identity_options(status, "--")
    status.add_argument(*_flags("--", "json"), action="store_true", help="print JSON for scripts")
    _common(status, "--")
    ident = sub.add_parser(
        "id",
        help="show this agent's key fingerprint",
        description="Print the fingerprint of this agent's key (created on first use).",
    )
    _identity_options(ident, "--")
    _common(ident, "--")
    return p
