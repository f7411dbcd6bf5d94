"""A SOCKS5 forward (``-D 1080:bob``, as ``ssh -D``): a local SOCKS5 server whose every
CONNECT becomes one stream to the peer, which resolves the target, checks its
``--allow-target`` rules and connects there. The peer's answer becomes the SOCKS reply
code (not allowed 0x02, refused 0x05, unreachable 0x04 or 0x03).

The handshake runs here, a few hundred bytes per connection; the bytes after it take the
same path as a TCP forward's (spliced in the native engine's threads, on that engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from collections import Counter
from typing import TYPE_CHECKING

import structlog

from natter_proto import socks, streamhdr
from natter_proto.endpoints import Endpoint, split_host_port

from . import nativeforward
from .bridge import splice
from .errors import NatterError, StreamRefused, cannot_listen
from .forward import open_tunnel_stream, stream_timeout, tunnel_to
from .keeper import ConnectionCap, TunnelKeeper
from .tcpend import TcpEnd

if TYPE_CHECKING:
    from .agent import Agent

log = structlog.get_logger("natter.socks")

HANDSHAKE_TIMEOUT = 10.0  # a client that has not asked for a target by then is cut off
SOCKS_TARGET = "socks"  # what the tunnel is for, in the broker's and the peer's logs


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SocksForward:
    """``local`` serves SOCKS5; each CONNECT goes to ``peer``'s side. Runs until ``close()``."""

    def __init__(self, agent: Agent, local: str, peer: str) -> None:
        self.agent = agent
        self.peer = peer
        self.target = SOCKS_TARGET
        self._bind = split_host_port(local, default_host="127.0.0.1")
        config = agent.config
        self.credentials = (
            socks.Credentials(config.socks_username, config.socks_password) if config.socks_username else None
        )
        self.local: Endpoint | None = None
        self.failures: Counter[str] = Counter()  # SOCKS replies other than success, by code name
        self.log = log.bind(peer=peer)
        self.cap = ConnectionCap(config.max_connections, self.log)
        self.keeper = TunnelKeeper(agent, peer, SOCKS_TARGET, self.log)
        self.stream_timeout = stream_timeout(config)
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def problem(self) -> str:
        return self.keeper.problem

    async def bind(self) -> None:
        host, port = self._bind
        try:
            self._socket = nativeforward.listening_socket(host, port)
        except OSError as exc:
            raise cannot_listen(host, port, exc) from None
        self._socket.setblocking(False)
        sockname = self._socket.getsockname()
        self.local = Endpoint(sockname[0], sockname[1])
        if not is_loopback_host(host):
            hint = (
                "clients must give the configured username and password"
                if self.credentials is not None
                else "anyone who reaches it may use the tunnel; set socks_username and socks_password"
            )
            self.log.warning(f"the SOCKS server listens on {self.local}, not on loopback: {hint}")

    def run(self) -> None:
        self.log.info(f"SOCKS5 on {self.local} -> {self.peer}")
        self.keeper.start()
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def close(self) -> None:
        await self.keeper.close()
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()

    async def _accept(self) -> None:
        assert self._socket is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(self._socket)
            except OSError as exc:  # EMFILE and the like: the listener itself stays
                self.log.warning("cannot accept a SOCKS client", reason=exc.strerror or str(exc))
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(client))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _serve(self, client: socket.socket) -> None:
        if not self.cap.admit():
            client.close()
            return
        try:
            await self._handshake_and_open(client)
        finally:
            self.cap.done()

    async def _handshake_and_open(self, client: socket.socket) -> None:
        handshake = socks.SocksHandshake(self.credentials)
        try:
            target = await asyncio.wait_for(self._request(client, handshake), HANDSHAKE_TIMEOUT)
        except (TimeoutError, OSError):
            target = None
            self.failures["handshake"] += 1
            self.log.info("SOCKS client closed", reason="no request within the handshake time")
        if target is None:
            client.close()
            return
        if self.agent.plane is not None:
            await self._open_native(client, handshake, target)
        else:
            await self._open(client, handshake, target)

    async def _request(self, client: socket.socket, handshake: socks.SocksHandshake) -> socks.Target | None:
        loop = asyncio.get_running_loop()
        heard = False
        while True:
            data = await loop.sock_recv(client, socks.MAX_BUFFER)
            if not data:
                if heard:
                    self.failures["handshake"] += 1
                    self.log.info("SOCKS client left in the middle of its handshake")
                return None
            heard = True
            step = handshake.receive(data)
            if step.send:
                await loop.sock_sendall(client, step.send)
            if step.failure:
                self.failures["handshake"] += 1
                self.log.warning("SOCKS client refused", reason=step.failure)
                return None
            if step.target is not None:
                return step.target

    def _count_failure(self, code: socks.Reply, why: str) -> None:
        self.failures[code.name.lower()] += 1
        self.log.warning("SOCKS request failed", reply=f"0x{code:02x} {code.name.lower()}", reason=why)

    async def _fail(
        self, client: socket.socket, handshake: socks.SocksHandshake, code: socks.Reply, why: str
    ) -> None:
        self._count_failure(code, why)
        with contextlib.suppress(OSError):
            await asyncio.get_running_loop().sock_sendall(client, handshake.reply(code))
        client.close()

    async def _open(
        self, client: socket.socket, handshake: socks.SocksHandshake, target: socks.Target
    ) -> None:
        try:
            channel, first = await open_tunnel_stream(self.agent, self.peer, target.spec, self.stream_timeout)
        except StreamRefused as exc:
            await self._fail(client, handshake, socks.reply_for(exc.refusal), str(exc))
            return
        except (NatterError, ConnectionError, TimeoutError) as exc:
            why = str(exc) or f"no tunnel to {self.peer} within {self.stream_timeout:.0f} s"
            await self._fail(client, handshake, socks.Reply.NETWORK_UNREACHABLE, why)
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(client, handshake.reply(socks.Reply.SUCCEEDED))
            _, local = await loop.connect_accepted_socket(TcpEnd, client)
        except OSError:
            channel.reset()
            channel.link.release(channel)
            client.close()
            return
        if handshake.rest:
            await channel.write(handshake.rest)
        await splice(local, channel, first)

    async def _open_native(
        self, client: socket.socket, handshake: socks.SocksHandshake, target: socks.Target
    ) -> None:
        plane = self.agent.plane
        assert plane is not None
        conn = plane.engine.adopt_tcp(os.dup(client.fileno()))
        header = streamhdr.encode_open(target.spec) + handshake.rest
        answer = await nativeforward.open_native(
            plane,
            conn,
            header,
            self.stream_timeout,
            self.peer,
            lambda: tunnel_to(self.agent, self.peer, target.spec, None),
        )
        if answer.gone:
            client.close()
            return
        reply = answer.reply
        if reply is None or not reply.ok:
            code = socks.reply_for(reply.why) if reply is not None else socks.Reply.NETWORK_UNREACHABLE
            why = f"{self.peer} refused {target.spec}: {reply.error}" if reply is not None else answer.problem
            self._count_failure(code, why)
            plane.engine.refuse(conn, handshake.reply(code))  # the engine writes it, then closes
            client.close()
            return
        try:
            await asyncio.get_running_loop().sock_sendall(client, handshake.reply(socks.Reply.SUCCEEDED))
        except OSError:
            client.close()
            plane.engine.refuse(conn)
            return
        client.close()  # the engine holds its own descriptor of the connection
        await nativeforward.splice_native(plane, conn, self.peer, target.spec)

    def status(self) -> dict[str, object]:
        return {
            "local": str(self.local),
            "peer": self.peer,
            "target": "SOCKS5",
            "open_connections": self.cap.open_now,
            "connections": self.cap.connections,
            "refused": self.cap.refused,
            "failures": dict(self.failures),
            "problem": self.problem,
        }
