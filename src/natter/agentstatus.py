"""A running agent's status: a control socket for `natter status`, optional HTTP metrics,
and a compact live view on a terminal.

The control socket lives in the agent's state directory (mode 0600): whoever may read the
identity key may ask about the tunnels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from natter_agent import Client, UdpForward, handoff
from natter_broker.http import HealthServer
from natter_proto.endpoints import split_host_port

SOCKET_NAME = "control.sock"


def snapshot(client: Client) -> dict[str, Any]:
    agent = client.agent
    registration = agent.registration
    return {
        "name": agent.name,
        "key": agent.identity.fingerprint,
        "broker": str(agent.broker),
        "registered": agent.registered.is_set(),
        "public_endpoint": str(registration.public) if registration and registration.public else None,
        "listening": agent.listening,
        "nat": agent.nat,
        "forwards": [f.status() for f in client.forwards],
        "tunnels": [link.status() for link in agent.links()],
        "dropped": {k: v for k, v in agent.stats.items() if k.startswith("dropped_")},
        "streams_refused": dict(client.listener.refused) if client.listener is not None else {},
        "udp_listener": client.udp_listener.status() if client.udp_listener is not None else None,
    }


class ControlSocket:
    def __init__(self, client: Client, directory: Path) -> None:
        self.client = client
        self.path = directory / SOCKET_NAME
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by an agent that did not exit cleanly
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old_umask)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            body = (
                json.loads(request)
                if request.startswith(b"{") and len(request) <= handoff.MAX_REQUEST
                else None
            )
            if request.strip() == b"status":
                writer.write(json.dumps(snapshot(self.client)).encode() + b"\n")
            elif isinstance(body, dict) and body.get("op") == "open":
                await handoff.serve_open(self.client.agent, body, reader, writer)
                return
            else:
                writer.write(b'{"error": "unknown request"}\n')
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def query(directory: Path) -> dict[str, Any]:
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(directory / SOCKET_NAME)), 5)
    writer.write(b"status\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("bad status answer")
    return data


def render(status: dict[str, Any]) -> str:
    """The human form of `natter status`."""
    lines = [
        f"{status['name']} ({status['key']}) at {status['broker']}: "
        + (
            f"registered, public endpoint {status['public_endpoint']}"
            if status["registered"]
            else "not registered"
        )
        + (", listening" if status["listening"] else "")
        + f", NAT {status.get('nat', 'unknown')}"
    ]
    for f in status["forwards"]:
        lines.append(f"  forward {f['local']} -> {f['peer']}:{f['target']}  ({_counts(f)})")
        if f.get("problem"):
            lines.append(f"    not connected: {f['problem']}")
    udp = status.get("udp_listener")
    if udp:
        lines.append(f"  udp listener  ({_counts(udp)})")
    if not status["tunnels"]:
        lines.append("  no tunnels")
    for t in status["tunnels"]:
        lines.append(
            f"  tunnel {t['peer']:<12} {t['path']:<8} {t['endpoint']:<22} rtt {t['rtt_ms']:>7.2f} ms  "
            f"sent {human(t['bytes_sent'])}  received {human(t['bytes_received'])}  "
            f"open {t['open_connections']}  up {t['uptime_s']:.0f} s"
        )
    return "\n".join(lines)


def _counts(entry: dict[str, Any]) -> str:
    """A forward's (or the UDP listener's) numbers: connections, or flows and datagrams."""
    if "flows" in entry:
        dropped = sum(entry.get("dropped", {}).values())
        text = (
            f"{entry['flows']} flows, {entry['datagrams_in']} datagrams in, "
            f"{entry['datagrams_out']} out, {dropped} dropped"
        )
        return text + (f", {entry['refused']} flows refused" if entry.get("refused") else "")
    refused = f", {entry['refused']} refused" if entry.get("refused") else ""
    failed = sum(entry.get("failures", {}).values())
    failures = f", {failed} SOCKS failures" if failed else ""
    return f"{entry.get('open_connections', 0)} open, {entry['connections']} in all{refused}{failures}"


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


class _AgentCollector:
    def __init__(self, client: Client) -> None:
        self.client = client

    def collect(self) -> Iterable[Any]:
        links = self.client.agent.links()
        tunnels = GaugeMetricFamily("natter_agent_tunnels", "Live tunnels to peers")
        tunnels.add_metric([], len(links))
        sent = CounterMetricFamily("natter_agent_tunnel_sent_bytes", "Payload bytes sent", labels=["peer"])
        received = CounterMetricFamily(
            "natter_agent_tunnel_received_bytes", "Payload bytes received", labels=["peer"]
        )
        rtt = GaugeMetricFamily("natter_agent_tunnel_rtt_seconds", "Smoothed RTT", labels=["peer", "path"])
        for link in links:
            sent.add_metric([link.peer], link.bytes_sent)
            received.add_metric([link.peer], link.bytes_received)
            rtt.add_metric([link.peer, link.kind.value], link.rtt)
        frames = CounterMetricFamily("natter_agent_datagrams", "Datagrams by outcome", labels=["outcome"])
        for key, value in sorted(self.client.agent.stats.items()):
            frames.add_metric([key], value)
        refused = CounterMetricFamily(
            "natter_agent_streams_refused",
            "Connections refused: by a forward over its cap, by the listener by reason",
            labels=["side", "reason"],
        )
        listener = self.client.listener
        for reason, value in sorted((listener.refused if listener is not None else {}).items()):
            refused.add_metric(["listener", reason], value)
        capped = sum(f.cap.refused for f in self.client.forwards if not isinstance(f, UdpForward))
        refused.add_metric(["forward", "max_connections"], capped)
        return [tunnels, sent, received, rtt, frames, refused, *self._udp()]

    def _udp(self) -> list[Any]:
        """UDP forwards' flows and datagrams, by forward (and the listener as ``listener``)."""
        flows = GaugeMetricFamily("natter_agent_udp_flows", "Live UDP flows", labels=["forward"])
        datagrams = CounterMetricFamily(
            "natter_agent_udp_datagrams", "UDP datagrams by direction", labels=["forward", "direction"]
        )
        dropped = CounterMetricFamily(
            "natter_agent_udp_dropped", "UDP datagrams dropped, by reason", labels=["forward", "reason"]
        )
        tables = [(f"{f.local}/udp", f.flows) for f in self.client.forwards if isinstance(f, UdpForward)]
        if self.client.udp_listener is not None:
            tables.append(("listener", self.client.udp_listener.flows))
        for name, table in tables:
            flows.add_metric([name], len(table))
            datagrams.add_metric([name, "in"], table.datagrams_in)
            datagrams.add_metric([name, "out"], table.datagrams_out)
            for reason, count in sorted(table.dropped.items(), key=lambda item: item[0].value):
                dropped.add_metric([name, reason.value], count)
        return [flows, datagrams, dropped]


class AgentMetrics:
    def __init__(self, client: Client) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_AgentCollector(client))
        self.server = HealthServer(lambda: client.agent.registered.is_set(), self._render)
        self.address: tuple[str, int] | None = None  # where it listens, once started

    def _render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))

    async def start(self, address: str) -> None:
        host, port = split_host_port(address, default_host="0.0.0.0")
        self.address = await self.server.start(host, port)

    async def close(self) -> None:
        await self.server.close()


async def live_view(client: Client, interval: float = 1.0) -> None:
    """A compact status that redraws itself on a terminal; logs scroll above it."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(stderr=True)
    with Live(console=console, refresh_per_second=4, transient=True, redirect_stderr=True) as live:
        while True:
            live.update(Text(render(snapshot(client)), style="bold"))
            await asyncio.sleep(interval)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"
