"""Both ends of a forwarded connection on the native engine: the decisions, in Python.

The engine accepts the TCP connection, opens the stream, connects to the target and
splices in its own threads; here natter decides which tunnel a connection takes, whether
the peer accepted it, and (listening) whether a target is allowed, with the same words
in the log as the other engines.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from natter_proto import streamhdr
from natter_proto.endpoints import split_host_port

from .errors import NatterError

if TYPE_CHECKING:
    from .forward import Forward, Listener
    from .nativelink import NativeLink
    from .nativeplane import NativePlane

log = structlog.get_logger("natter.forward")


def listening_socket(host: str, port: int) -> socket.socket:
    """The forward's port, bound now (a port in use fails at once); the engine accepts on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=1024)


@dataclass(frozen=True)
class NativeAnswer:
    """How the peer answered a native connection's stream: ``reply``, or none and why."""

    reply: streamhdr.ReplyHeader | None
    problem: str = ""
    gone: bool = False  # the TCP side went away first: nothing to answer


async def open_native(
    plane: NativePlane,
    conn: int,
    header: bytes,
    timeout: float,
    peer: str,
    tunnel_to: Callable[[], Awaitable[Any]],
) -> NativeAnswer:
    """A tunnel for one connection, its stream with ``header``, and the peer's answer. A
    tunnel that closes before the peer answered delivered nothing: asked once more."""
    engine = plane.engine
    for attempt in range(2):
        try:
            link: NativeLink = await asyncio.wait_for(tunnel_to(), timeout)
        except (NatterError, ConnectionError, TimeoutError) as exc:
            return NativeAnswer(None, str(exc) or f"no tunnel to {peer} within {timeout:.0f} s")
        answer = plane.answer(conn)
        engine.open_stream(conn, link.tunnel, header)
        link.streams_opened += 1
        event = await answer
        if event[0] == "done":
            return NativeAnswer(None, gone=True)
        raw: bytes = event[2]
        if not raw:
            if attempt:
                return NativeAnswer(None, f"{peer} did not accept the stream: the tunnel closed")
            continue
        try:
            body, _rest = streamhdr.split_header(raw)
            if body is None:
                raise streamhdr.StreamHeaderError("malformed answer")
            return NativeAnswer(streamhdr.parse_reply(body))
        except streamhdr.StreamHeaderError as exc:
            return NativeAnswer(None, f"{peer} did not accept the stream: {exc}")
    raise AssertionError("unreachable")


async def splice_native(plane: NativePlane, conn: int, peer: str, target: str) -> None:
    """The engine splices an accepted connection until both sides end."""
    done = plane.answer(conn)
    plane.engine.splice(conn)
    event = await done
    log.debug("stream closed", peer=peer, target=target, bytes_out=event[2], bytes_in=event[3])


async def serve_forwarded(
    forward: Forward,
    plane: NativePlane,
    conn: int,
    tunnel_to: Callable[[], Awaitable[Any]],
) -> None:
    """One accepted connection: a tunnel, a stream with its header, the peer's answer."""
    header = streamhdr.encode_open(forward.target)
    answer = await open_native(plane, conn, header, forward.stream_timeout, forward.peer, tunnel_to)
    if answer.gone:
        return
    if answer.reply is None or not answer.reply.ok:
        why = (
            f"{forward.peer} refused {forward.target}: {answer.reply.error}"
            if answer.reply
            else answer.problem
        )
        forward.log.warning("connection closed", reason=why)
        plane.engine.refuse(conn)
        return
    await splice_native(plane, conn, forward.peer, forward.target)


async def serve_incoming(
    listener: Listener, plane: NativePlane, link: NativeLink, conn: int, raw: bytes
) -> None:
    """A stream the peer opened: its target, the ACL, then the engine connects and splices."""
    engine = plane.engine
    peer = link.peer
    try:
        body, _rest = streamhdr.split_header(raw)
        if body is None:
            raise streamhdr.StreamHeaderError("incomplete stream header")
        target = streamhdr.parse_open(body).target
        host, port = split_host_port(target, default_host="localhost")
    except (streamhdr.StreamHeaderError, ValueError) as exc:
        listener.refused["bad_header"] += 1
        log.debug("refused stream with a bad header", peer=peer, reason=str(exc))
        engine.refuse(conn)
        return
    addresses, refusal, why = await listener.resolve_allowed(host, port)
    if not addresses:
        listener.refused["target"] += 1
        log.warning("refused stream", peer=peer, target=target, reason=refusal)
        engine.refuse(conn, streamhdr.encode_reply(False, refusal, why))
        return
    answer = plane.answer(conn)
    link.streams_opened += 1
    engine.connect_target(conn, addresses, port, streamhdr.encode_reply(True))
    event = await answer
    if event[0] == "connect_failed":
        listener.refused["connect"] += 1
        reason = f"cannot connect to {target}: {event[2]}"
        log.warning("refused stream", peer=peer, target=target, reason=reason)
        engine.refuse(conn, streamhdr.encode_reply(False, reason, streamhdr.refusal_of_errno(event[3])))
        return
    log.debug("stream closed", peer=peer, target=target, bytes_in=event[3], bytes_out=event[2])


def count_refusal(listener: Listener, reason: str, peer: str) -> None:
    """A stream the engine reset before it named a target (over the limit, too slow, malformed)."""
    listener.refused[reason] += 1
    if listener.refused[reason] % 100 == 1:
        log.warning(
            "refused streams before their header", peer=peer, reason=reason, refused=listener.refused[reason]
        )
