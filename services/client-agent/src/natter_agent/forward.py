"""Forwards: a local TCP port (or stdio) whose connections become streams to a peer, and the
listener side that connects each incoming stream to its target.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import Counter
from collections.abc import Callable, Hashable

import structlog

from natter_proto import frames, streamhdr
from natter_proto.acl import Proto, TargetAllowList
from natter_proto.backoff import Backoff
from natter_proto.config import Config
from natter_proto.endpoints import Endpoint, format_host_port, split_host_port

from . import nativeforward
from .agent import Agent
from .bridge import LocalEnd, read_header, splice
from .errors import NatterError, PeerUnavailable, StreamRefused, cannot_listen
from .keeper import ConnectionCap, TunnelKeeper
from .link import PeerLink
from .links import AnyLink
from .stdio import StdioEnd
from .stream import StreamChannel, StreamClosed
from .tcpend import TcpEnd, open_first

log = structlog.get_logger("natter.forward")


def normalise_target(remote: str) -> str:
    """``":22"`` -> ``"localhost:22"``; the peer connects to the result."""
    host, port = split_host_port(remote, default_host="localhost")
    if port == 0:
        raise ValueError(f"remote address {remote!r} needs a port")
    return format_host_port(host, port)


def stream_timeout(config: Config) -> float:
    """How long a connection waits for its stream: an introduction, a punch, a handshake."""
    return config.connect_timeout + config.punch_timeout + config.handshake_timeout


class Listener:
    """The accepting side: each incoming stream names a target; connect there if allowed.

    A stream must send its header within ``header_timeout``, and a tunnel may have at most
    ``max_pending`` streams still waiting for theirs: a peer cannot hold the listener's
    memory with streams that never say where they go. Refusals are counted by reason."""

    def __init__(self, allow: TargetAllowList, *, header_timeout: float, max_pending: int) -> None:
        self.allow = allow
        self.header_timeout = header_timeout
        self.max_pending = max_pending
        self.refused: Counter[str] = Counter()
        self._pending: Counter[PeerLink] = Counter()  # per tunnel, streams without a header yet

    async def serve(self, channel: StreamChannel, peer: str) -> None:
        link = channel.link
        if self._pending[link] >= self.max_pending:
            self._refuse_silently(channel, "pending_streams")
            if self.refused["pending_streams"] % 100 == 1:
                log.warning(
                    "refusing streams: too many without a header",
                    peer=peer,
                    limit=self.max_pending,
                    refused=self.refused["pending_streams"],
                )
            return
        self._pending[link] += 1
        try:
            async with asyncio.timeout(self.header_timeout):
                header, rest = await read_header(channel)
            target = streamhdr.parse_open(header).target
            host, port = split_host_port(target, default_host="localhost")
        except TimeoutError:
            self._refuse_silently(channel, "header_timeout")
            if self.refused["header_timeout"] % 100 == 1:
                log.warning(
                    f"reset streams that sent no header within {self.header_timeout:g} s",
                    peer=peer,
                    refused=self.refused["header_timeout"],
                )
            return
        except (streamhdr.StreamHeaderError, ValueError, StreamClosed) as exc:
            self._refuse_silently(channel, "bad_header")
            log.debug("refused stream with a bad header", peer=peer, reason=str(exc))
            return
        finally:
            self._pending[link] -= 1
            if self._pending[link] <= 0:
                del self._pending[link]
        addresses, refusal, why = await self.resolve_allowed(host, port)
        if not addresses:
            self.refused["target"] += 1
            log.warning("refused stream", peer=peer, target=target, reason=refusal)
            await _refuse(channel, refusal, why)
            return
        try:
            local = await asyncio.wait_for(open_first(addresses, port), 10)
        except (OSError, TimeoutError) as exc:
            self.refused["connect"] += 1
            cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            reason = f"cannot connect to {target}: {cause}"
            log.warning("refused stream", peer=peer, target=target, reason=reason)
            code = exc.errno if isinstance(exc, OSError) else None
            await _refuse(channel, reason, streamhdr.refusal_of_errno(code))
            return
        log.debug("stream opened", peer=peer, target=target, stream=channel.stream_id)
        try:
            await channel.write(streamhdr.encode_reply(True))
        except StreamClosed:
            await local.close()
            channel.link.release(channel)
            return
        sent, received = await splice(local, channel, rest)
        log.debug("stream closed", peer=peer, target=target, bytes_in=received, bytes_out=sent)

    def _refuse_silently(self, channel: StreamChannel, reason: str) -> None:
        """Reset a stream that never named a target (nothing to answer it with)."""
        self.refused[reason] += 1
        channel.reset()
        channel.link.release(channel)

    async def resolve_allowed(
        self, host: str, port: int, kind: int = socket.SOCK_STREAM
    ) -> tuple[list[str], str, streamhdr.Refusal]:
        """The addresses to connect to, in order (resolved once, so a name cannot change
        between the check and the connect), or none and why not."""
        proto = Proto.TCP if kind == socket.SOCK_STREAM else Proto.UDP
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=kind)
        except (OSError, UnicodeError) as exc:
            why = f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}"
            return [], why, streamhdr.Refusal.NO_HOST
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not self.allow.allows(host, port, addresses, proto):
            return [], "target not allowed", streamhdr.Refusal.DENIED
        return addresses, "", streamhdr.Refusal.FAILED


async def _refuse(channel: StreamChannel, reason: str, why: streamhdr.Refusal) -> None:
    with contextlib.suppress(StreamClosed):
        await channel.write(streamhdr.encode_reply(False, reason, why))
        channel.write_eof()
    await _drain_and_release(channel)


async def _drain_and_release(channel: StreamChannel) -> None:
    """Discard what the peer still sends on a refused stream until it finishes."""
    with contextlib.suppress(StreamClosed):
        async with asyncio.timeout(5):
            while data := await channel.read():
                channel.consumed(len(data))
    channel.link.release(channel)


async def open_tunnel_stream(
    agent: Agent,
    peer: str,
    target: str,
    timeout: float,
    owner: Hashable = None,
    on_wait: Callable[[str], None] | None = None,
) -> tuple[StreamChannel, bytes]:
    """Open a stream to peer's target and wait for its answer; returns leftover payload.

    A tunnel that dies before the peer answered the header (the peer restarted and the
    agent replaced the tunnel) delivered nothing to the service: the stream is opened
    once more, on the tunnel that took over."""
    for attempt in range(2):
        link = await asyncio.wait_for(tunnel_to(agent, peer, target, on_wait), timeout)
        if not isinstance(link, PeerLink):
            raise NatterError("the native engine carries streams of its own forwards only")
        try:
            return await _open_on(link, peer, target, timeout, owner)
        except _TunnelLost:
            if attempt:
                raise NatterError(f"{peer} did not accept the stream: the tunnel closed") from None
    raise AssertionError("unreachable")


# the peer is not there yet (a wrong name, or it is starting): worth asking again
WAIT_FOR_PEER = {frames.ErrorCode.UNKNOWN_PEER, frames.ErrorCode.PEER_OFFLINE, frames.ErrorCode.NOT_LISTENING}


async def tunnel_to(agent: Agent, peer: str, target: str, on_wait: Callable[[str], None] | None) -> AnyLink:
    """The tunnel, asking again (1 s, 2 s, ...) while the peer is not there yet: a connection
    accepted meanwhile waits for it within its deadline instead of closing at once
    (``on_wait`` hears why, the first time)."""
    backoff = Backoff(initial=1.0, maximum=8.0)
    while True:
        try:
            return await agent.connect(peer, target)
        except PeerUnavailable as exc:
            if exc.code not in WAIT_FOR_PEER:
                raise
            if on_wait is not None and not backoff.attempts:
                on_wait(str(exc))
            await asyncio.sleep(backoff.next_delay())


class _TunnelLost(Exception):
    """The tunnel closed before the peer answered the stream's header."""


async def _open_on(
    link: PeerLink, peer: str, target: str, timeout: float, owner: Hashable
) -> tuple[StreamChannel, bytes]:
    try:
        channel = await asyncio.wait_for(link.open_stream(owner), timeout)
    except TimeoutError:
        raise NatterError(
            f"{peer} allows no more connections at once ({link.open_streams} open): none ended"
            f" within {timeout:.0f} s"
        ) from None
    except StreamClosed:
        raise _TunnelLost() from None
    try:
        await channel.write(streamhdr.encode_open(target))
        header, rest = await read_header(channel)
        reply = streamhdr.parse_reply(header)
    except (streamhdr.StreamHeaderError, StreamClosed) as exc:
        channel.reset()
        channel.link.release(channel)
        if not link.is_alive:
            raise _TunnelLost() from None
        raise NatterError(f"{peer} did not accept the stream: {exc}") from None
    if not reply.ok:
        channel.reset()
        channel.link.release(channel)
        raise StreamRefused(f"{peer} refused {target}: {reply.error}", reply.why)
    return channel, rest


class Forward:
    """A forward ``local -> peer:remote``; its TCP listener runs until ``close()``."""

    def __init__(self, agent: Agent, local: str, peer: str, remote: str) -> None:
        self.agent = agent
        self.peer = peer
        self.remote = remote
        self.target = normalise_target(remote)
        host, port = split_host_port(local, default_host="127.0.0.1") if local else ("", 0)
        self._bind = (host, port)
        self.local: Endpoint | None = None
        self._server: asyncio.Server | None = None
        self._native_socket: socket.socket | None = None  # native engine: the engine accepts
        self._native_id: int | None = None
        self._handlers: set[asyncio.Task[None]] = set()  # one per accepted connection
        self.log = self._log = log.bind(peer=peer, target=self.target)
        self.cap = ConnectionCap(agent.config.max_connections, self.log)
        self.keeper = TunnelKeeper(agent, peer, self.target, self.log)
        self.stream_timeout = stream_timeout(agent.config)

    async def bind(self) -> None:
        """Listen on the local port (connections wait for ``run``'s tunnel)."""
        host, port = self._bind
        try:
            if self.agent.wants_native:
                self._native_socket = nativeforward.listening_socket(host, port)
                sockname = self._native_socket.getsockname()
                self.local = Endpoint(sockname[0], sockname[1])
                return
            self._server = await asyncio.get_running_loop().create_server(self._accept, host, port)
        except OSError as exc:
            raise cannot_listen(host, port, exc) from None
        sockname = self._server.sockets[0].getsockname()
        self.local = Endpoint(sockname[0], sockname[1])

    def run(self) -> None:
        self._log.info(f"forwarding {self.local} -> {self.peer}:{self.target}")
        self.keeper.start()
        plane = self.agent.plane
        if self._native_socket is not None and plane is not None:
            self._native_id = plane.new_forward(self._on_native)
            plane.engine.listen_tcp(self._native_id, os.dup(self._native_socket.fileno()))
            self._native_socket.close()

    def _on_native(self, conn: int) -> None:
        """A connection the native engine accepted: the same limits and words as _on_tcp."""
        plane = self.agent.plane
        assert plane is not None
        if not self.cap.admit():
            plane.engine.refuse(conn)
            return
        self._say_waiting()
        task = asyncio.get_running_loop().create_task(
            nativeforward.serve_forwarded(
                self, plane, conn, lambda: tunnel_to(self.agent, self.peer, self.target, None)
            )
        )
        self._handlers.add(task)
        task.add_done_callback(self._native_done)

    def _native_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self.cap.done()

    @property
    def problem(self) -> str:
        return self.keeper.problem

    def status(self) -> dict[str, object]:
        return {
            "local": str(self.local) if self.local else "stdio",
            "peer": self.peer,
            "target": self.target,
            "open_connections": self.cap.open_now,
            "connections": self.cap.connections,
            "refused": self.cap.refused,
            "problem": self.problem,
        }

    def _say_waiting(self) -> None:
        if self.problem:  # say at once why this connection waits (ssh itself will not)
            self._log.warning(f"connection waits for a tunnel to {self.peer}", reason=self.problem)

    def _accept(self) -> TcpEnd:
        local = TcpEnd()
        task = asyncio.get_running_loop().create_task(self._on_tcp(local))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        return local

    async def _on_tcp(self, local: TcpEnd) -> None:
        if not self.cap.admit():
            local.abort()
            await local.close()
            return
        self._say_waiting()
        try:
            await self._serve(local)
        finally:
            self.cap.done()

    async def _serve(self, local: TcpEnd) -> None:
        try:
            channel, rest = await open_tunnel_stream(
                self.agent, self.peer, self.target, self.stream_timeout, owner=self
            )
        except (NatterError, ConnectionError, TimeoutError) as exc:
            reason = str(exc) or f"no tunnel to {self.peer} within {self.stream_timeout:.0f} s"
            if self.problem and not str(exc):
                reason += f" ({self.problem})"
            self._log.warning("connection closed", reason=reason)
            local.abort()
            await local.close()
            return
        await splice(local, channel, rest)

    async def close(self) -> None:
        await self.keeper.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        plane = self.agent.plane
        if self._native_id is not None and plane is not None:
            plane.engine.stop_tcp(self._native_id)
            plane.forwards.pop(self._native_id, None)
        if self._native_socket is not None:
            self._native_socket.close()


async def forward_stdio(agent: Agent, peer: str, remote: str, timeout: float) -> tuple[int, int]:
    """Pipe stdin/stdout through one stream to peer's remote; returns (sent, received)."""
    target = normalise_target(remote)
    if agent.plane is not None:
        await pipe_through_native(agent, peer, remote, StdioEnd(0, 1))
        return 0, 0  # the counts are the tunnel's, in status

    def waiting(reason: str) -> None:
        log.warning(f"waiting up to {timeout:.0f} s for {peer}", peer=peer, reason=reason)

    channel, rest = await open_tunnel_stream(agent, peer, target, timeout, on_wait=waiting)
    local = StdioEnd(0, 1)
    return await splice(local, channel, rest)


async def pipe_through_native(agent: Agent, peer: str, remote: str, end: LocalEnd) -> None:
    """A local end that is the agent's own I/O (stdio, a handed-over connection) on the
    native engine: a forward on a loopback port, and the end piped to one connection
    through it, once the tunnel is up (an unreachable peer fails here, with its reason)."""
    from .handoff import StreamEnd, pipe  # handoff builds on this module

    await asyncio.wait_for(
        tunnel_to(agent, peer, normalise_target(remote), None), stream_timeout(agent.config)
    )
    forward = Forward(agent, "127.0.0.1:0", peer, remote)
    await forward.bind()
    forward.run()
    try:
        assert forward.local is not None
        reader, writer = await asyncio.open_connection(forward.local.host, forward.local.port)
        await pipe(end, StreamEnd(reader, writer))
    finally:
        await forward.close()
