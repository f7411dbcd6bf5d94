"""The ``natter`` command: the seed's single-dash form and GNU-style subcommands.

    natter -server 1.2.3.4:10000
    natter -name bob -broker 1.2.3.4:10000 -listen
    natter -name alice -broker 1.2.3.4:10000 8022:bob:22
    natter broker --listen ADDR
    natter listen --name N --broker ADDR
    natter forward --name N --broker ADDR SPEC...
    natter agent --config FILE
    natter id | natter config check FILE

A usage mistake prints one line and exits 2; a runtime failure prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from natter_agent import Client, NatterError, handoff
from natter_agent.keystore import KEY_FILE, StateError, load_identity, state_dir
from natter_broker import Broker
from natter_proto import AddressError, Config
from natter_proto.config import default_state_dir

from . import configfile, logs
from .agentstatus import (
    SOCKET_NAME,
    AgentMetrics,
    ControlSocket,
    live_view,
    query,
    render,
    stderr_is_terminal,
)
from .options import parse
from .parsers import UsageError
from .specs import ForwardSpec

EXIT_USAGE = 2
EXIT_FAILURE = 1

log = structlog.get_logger("natter.cli")


async def run_broker(args: argparse.Namespace) -> int:
    config = Config(
        broker_addr=args.server,
        redis_url=args.redis,
        metrics_addr=args.metrics,
        broker_id=args.broker_id,
        tokens_file=args.tokens,
        names_file=args.names,
        state_dir=args.state_dir or str(default_state_dir()),  # the command keeps name bindings
        probe_addr=args.probe,
        tcp_addr=args.tcp_listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        relay_bytes=int(args.relay_mb * (1 << 20)),
        relay_seconds=args.relay_seconds,
        mesh_addr=args.mesh_listen,
        mesh_advertise=args.mesh_advertise,
        fleet_secret=args.fleet_secret,
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
        upgrade_interval=args.upgrade_interval,
        quic_engine=args.quic_engine,
        state_dir=args.state_dir,
        token=args.token,
        pinned_peers=args.pinned,
        allow_peers=args.allow,
        allow_targets=args.allow_targets,
        max_connections=args.max_connections,
        udp_idle_timeout=args.udp_idle_timeout,
        socks_username=args.socks_username,
        socks_password=args.socks_password,
        proxy=args.proxy,
        broker_ca=args.broker_ca,
        broker_key=args.broker_key,
    )
    forwards: list[ForwardSpec] = args.forwards
    if forwards and forwards[0].is_stdio:
        return await _run_stdio(config, forwards[0])
    client = Client(config)
    control = ControlSocket(client, state_dir(args.state_dir))
    metrics = AgentMetrics(client) if args.metrics else None
    view: asyncio.Task[None] | None = None
    try:
        await control.start()
        if metrics is not None:
            await metrics.start(args.metrics)
        await client.forward_all([spec.request for spec in forwards])
        if args.listen:
            await client.listen(wait=False)
        if args.log_format == "console" or (args.log_format == "auto" and stderr_is_terminal()):
            view = asyncio.get_running_loop().create_task(live_view(client))
        await _until_signalled()
        return 0
    finally:
        if view is not None:
            view.cancel()
            await asyncio.gather(view, return_exceptions=True)
        await control.close()
        if metrics is not None:
            await metrics.close()
        await client.close()


async def _run_stdio(config: Config, spec: ForwardSpec) -> int:
    """The agent running as this identity carries the connection, if there is one; else an
    agent of our own for it."""
    socket_path = state_dir(config.state_dir) / SOCKET_NAME
    try:
        handed = await handoff.hand_over(socket_path, config.client_user, spec.peer, spec.remote)
        if handed is not None:
            return handed
        client = Client(config)
        try:
            await client.forward_stdio(spec.peer, spec.remote)
        finally:
            await client.close()
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


def show_status(args: argparse.Namespace) -> int:
    directory = state_dir(args.state_dir)
    try:
        status = asyncio.run(query(directory))
    except (OSError, TimeoutError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or "no answer"
        print(f"natter: no agent answers at {directory / SOCKET_NAME}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def check_config(args: argparse.Namespace) -> int:
    path = Path(args.file)
    kind = args.kind or configfile.guess_kind(path)
    try:
        configfile.load(path, kind)
    except configfile.ConfigError as exc:
        print(f"natter: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"ok: {path} is a valid {kind} config")
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
    if args.command == "status":
        return show_status(args)
    if args.command == "config":
        return check_config(args)
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
