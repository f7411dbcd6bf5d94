"""A stdio forward (ssh's ProxyCommand) handed to the agent already running with the same
identity, over its control socket.

Two agents with one name would fight over the broker's registration (each new endpoint
replaces the other's). So ``natter ... :bob:22`` first asks the running agent, if there is
one, to open the stream; its stdin and stdout are then piped through the control socket,
and the connection rides the running agent's tunnel (no registration, no punch: it starts
at once). With no agent running, the stdio forward runs its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import structlog

from .agent import Agent
from .bridge import LocalEnd, splice
from .errors import NatterError
from .forward import normalise_target, open_tunnel_stream, pipe_through_native, stream_timeout
from .stdio import CHUNK as STDIO_CHUNK
from .stdio import StdioEnd

log = structlog.get_logger("natter.handoff")

MAX_REQUEST = 4096
OWNER = "stdio"  # the fair-queue line of streams handed over (natter_agent.link)


class StreamEnd:
    """An asyncio stream pair (one side of the control socket) as a pipe's local end."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    async def read(self, size: int) -> bytes:
        return await self._reader.read(size)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def write_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self._writer.can_write_eof() and not self._writer.is_closing():
                self._writer.write_eof()

    def abort(self) -> None:
        self._writer.transport.abort()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


def open_request(name: str, peer: str, remote: str) -> bytes:
    return json.dumps({"op": "open", "name": name, "peer": peer, "target": remote}).encode() + b"\n"


async def serve_open(
    agent: Agent, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The running agent's half: open the stream, answer one JSON line, then pipe."""
    peer, remote = request.get("peer"), request.get("target")
    if request.get("name") != agent.name:  # the same key under another name: no conflict
        await _answer(writer, {"decline": f"this agent is {agent.name}"})
        return
    if not isinstance(peer, str) or not isinstance(remote, str):
        await _answer(writer, {"error": "an open request names a peer and a target"})
        return
    timeout = stream_timeout(agent.config)
    if agent.plane is not None:
        await _serve_open_native(agent, peer, remote, reader, writer)
        return
    try:
        channel, rest = await open_tunnel_stream(
            agent,
            peer,
            normalise_target(remote),
            timeout,
            OWNER,
            on_wait=lambda why: log.warning(f"stdio connection waits for {peer}", peer=peer, reason=why),
        )
    except (NatterError, ValueError, ConnectionError, TimeoutError) as exc:
        reason = str(exc) or f"no tunnel to {peer} within {timeout:.0f} s"
        log.warning("stdio connection refused", peer=peer, reason=reason)
        await _answer(writer, {"error": reason})
        return
    await _answer(writer, {"ok": True})
    log.info("stdio connection handed over", peer=peer, target=remote)
    await splice(StreamEnd(reader, writer), channel, rest)


async def _serve_open_native(
    agent: Agent, peer: str, remote: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The native engine carries the bytes: the tunnel first (so a failure is answered),
    then the connection through a loopback forward of its own."""
    try:
        await asyncio.wait_for(agent.connect(peer, normalise_target(remote)), stream_timeout(agent.config))
    except (NatterError, ValueError, ConnectionError, TimeoutError) as exc:
        reason = str(exc) or f"no tunnel to {peer}"
        log.warning("stdio connection refused", peer=peer, reason=reason)
        await _answer(writer, {"error": reason})
        return
    await _answer(writer, {"ok": True})
    log.info("stdio connection handed over", peer=peer, target=remote)
    await pipe_through_native(agent, peer, remote, StreamEnd(reader, writer))


async def _answer(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    writer.write(json.dumps(body).encode() + b"\n")
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def hand_over(socket_path: Path, name: str, peer: str, remote: str) -> int | None:
    """The stdio side: None if no agent answers at socket_path (run our own), else the exit
    code once the piped connection has ended."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket_path)), 2)
    except (OSError, TimeoutError):
        return None
    writer.write(open_request(name, peer, remote))
    await writer.drain()
    try:
        line = await reader.readline()
        answer = json.loads(line) if line else {"error": "the running agent closed the connection"}
    except (ValueError, ConnectionError) as exc:
        answer = {"error": f"bad answer from the running agent: {exc}"}
    if not isinstance(answer, dict):
        answer = {"error": "bad answer from the running agent"}
    if answer.get("ok") is not True:
        writer.close()
        if answer.get("error") == "unknown request" or "decline" in answer:  # older, or another name
            return None
        raise NatterError(f"the agent running as this identity could not connect: {answer.get('error')}")
    await pipe(StdioEnd(0, 1), StreamEnd(reader, writer))
    return 0


async def pipe(a: LocalEnd, b: LocalEnd) -> None:
    """Both directions between two local ends, with half-close; ends when both have."""

    async def one_way(source: LocalEnd, sink: LocalEnd) -> None:
        while data := await source.read(STDIO_CHUNK):
            await sink.write(data)
        sink.write_eof()

    try:
        await asyncio.gather(one_way(a, b), one_way(b, a))
    except (OSError, ConnectionError):
        a.abort()
        b.abort()
    finally:
        await a.close()
        await b.close()
