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


async def serve_forwarded(
    forward: Forward,
    plane: NativePlane,
    conn: int,
    tunnel_to: Callable[[], Awaitable[Any]],
) -> None:
    """One accepted connection: a tunnel, a stream with its header, the peer's answer."""
    engine = plane.engine
    header = streamhdr.encode_open(forward.target)
    for attempt in range(2):
        try:
            link: NativeLink = await asyncio.wait_for(tunnel_to(), forward.stream_timeout)
        except (NatterError, ConnectionError, TimeoutError) as exc:
            reason = str(exc) or f"no tunnel to {forward.peer} within {forward.stream_timeout:.0f} s"
            forward.log.warning("connection closed", reason=reason)
            engine.refuse(conn)
            return
        answer = plane.answer(conn)
        engine.open_stream(conn, link.tunnel, header)
        link.streams_opened += 1
        event = await answer
        if event[0] == "done":
            return  # the TCP side went away first
        raw: bytes = event[2]
        if not raw:
            if attempt:
                forward.log.warning(
                    "connection closed", reason=f"{forward.peer} did not accept the stream: the tunnel closed"
                )
                engine.refuse(conn)
                return
            continue  # the tunnel closed before an answer: nothing reached the service
        try:
            body, _rest = streamhdr.split_header(raw)
            reply = streamhdr.parse_reply(body) if body is not None else None
        except streamhdr.StreamHeaderError as exc:
            forward.log.warning(
                "connection closed", reason=f"{forward.peer} did not accept the stream: {exc}"
            )
            engine.refuse(conn)
            return
        if reply is None or not reply.ok:
            why = reply.error if reply is not None else "malformed answer"
            forward.log.warning("connection closed", reason=f"{forward.peer} refused {forward.target}: {why}")
            engine.refuse(conn)
            return
        done = plane.answer(conn)
        engine.splice(conn)
        event = await done
        log.debug(
            "stream closed", peer=forward.peer, target=forward.target, bytes_out=event[2], bytes_in=event[3]
        )
        return


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
    addresses, refusal = await listener.resolve_allowed(host, port)
    if not addresses:
        listener.refused["target"] += 1
        log.warning("refused stream", peer=peer, target=target, reason=refusal)
        engine.refuse(conn, streamhdr.encode_reply(False, refusal))
        return
    answer = plane.answer(conn)
    link.streams_opened += 1
    engine.connect_target(conn, addresses, port, streamhdr.encode_reply(True))
    event = await answer
    if event[0] == "connect_failed":
        listener.refused["connect"] += 1
        reason = f"cannot connect to {target}: {event[2]}"
        log.warning("refused stream", peer=peer, target=target, reason=reason)
        engine.refuse(conn, streamhdr.encode_reply(False, reason))
        return
    log.debug("stream closed", peer=peer, target=target, bytes_in=event[3], bytes_out=event[2])


def count_refusal(listener: Listener, reason: str, peer: str) -> None:
    """A stream the engine reset before it named a target (over the limit, too slow, malformed)."""
    listener.refused[reason] += 1
    if listener.refused[reason] % 100 == 1:
        log.warning(
            "refused streams before their header", peer=peer, reason=reason, refused=listener.refused[reason]
        )
