"""The agent's TCP way to its broker, for networks that block UDP.

TCP (through an HTTP CONNECT proxy first, if one is set), TLS, then a WebSocket upgrade;
each binary message carries one datagram, exactly as it would travel over UDP (a broker
frame or a relay packet). To the agent it looks like one more socket (``sendto``,
``send_batch``, ``close``): the machine's BROKER_STREAM. What arrives goes to the same
handler as a UDP datagram from the broker, so it is validated the same way.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from natter_proto import websocket as ws
from natter_proto.endpoints import AddressError, Endpoint

from .brokertrust import BrokerTrust, BrokerTrustError

MAX_MESSAGE = 4096  # larger than any datagram natter sends (QUIC's, a relay frame's)
WRITE_LIMIT = 1 << 20  # queued for the kernel beyond this: datagrams are dropped, as UDP would
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy that tunnels with CONNECT (``http://[user:pass@]host:port``)."""

    host: str
    port: int
    auth: str = ""  # "user:password", sent as Basic

    @classmethod
    def parse(cls, url: str) -> Proxy:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "") or not parts.hostname:
            raise AddressError(f"proxy {url!r}: use http://HOST:PORT (an HTTP CONNECT proxy)")
        try:
            port = parts.port or 3128
        except ValueError:
            raise AddressError(f"proxy {url!r}: bad port") from None
        auth = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}" if parts.username else ""
        return cls(parts.hostname, port, auth)


def proxy_for(host: str, configured: str) -> Proxy | None:
    """``--proxy`` if set, else HTTPS_PROXY / https_proxy unless NO_PROXY covers host."""
    if configured:
        return None if configured == "none" else Proxy.parse(configured)
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or ""
    if not url:
        return None
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    for rule in (r.strip().lstrip(".") for r in no_proxy.split(",")):
        if rule == "*" or (rule and (host == rule or host.endswith("." + rule))):
            return None
    return Proxy.parse(url)


class BrokerStream:
    def __init__(
        self,
        broker: Endpoint,
        server_name: str,
        trust: BrokerTrust,
        proxy: Proxy | None,
        on_datagram: Callable[[bytes, Endpoint], None],
        on_open: Callable[[], None],
        on_closed: Callable[[str], None],
        on_warning: Callable[[str], None],
    ) -> None:
        self.broker = broker
        self.server_name = server_name  # the name the agent was given (SNI, certificate check)
        self.trust, self.proxy = trust, proxy
        self._on_datagram, self._on_open, self._on_closed = on_datagram, on_open, on_closed
        self._on_warning = on_warning
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.send_errors = 0
        self.gso = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- the socket interface -----------------------------------------------------------
    def sendto(self, data: bytes, addr: Any) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            self.send_errors += 1
            return
        if writer.transport.get_write_buffer_size() > WRITE_LIMIT:
            self.send_errors += 1  # a stalled connection: loss, which QUIC and registration recover
            return
        writer.write(ws.encode(data, os.urandom(4)))

    def send_batch(self, datagrams: list[tuple[bytes, Any]]) -> None:
        for data, addr in datagrams:
            self.sendto(data, addr)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(ws.close_frame(ws.CloseCode.GOING_AWAY, "agent closing", os.urandom(4)))
            self._writer.close()
        if self._task is not None:
            self._task.cancel()

    # -- connecting and reading ---------------------------------------------------------
    async def _run(self) -> None:
        reason = "closed"
        try:
            reader, writer = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
            self._writer = writer
            self._on_open()
            reason = await self._read(reader)
        except asyncio.CancelledError:
            reason = "closed by the agent"
        except TimeoutError:
            reason = f"no connection within {CONNECT_TIMEOUT:g} s"
        except ConnectionRefusedError:
            reason = "connection refused"
        except BrokerTrustError as exc:
            reason = str(exc)
        except ssl.SSLError as exc:
            reason = f"TLS: {exc.reason or exc}"
        except ws.WebSocketError as exc:
            reason = f"WebSocket: {exc}"
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        finally:
            if self._writer is not None:
                self._writer.close()
            self._writer = None
        if not self._closed:
            self._closed = True
            self._on_closed(reason)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        proxy = self.proxy
        target = (proxy.host, proxy.port) if proxy is not None else (self.broker.host, self.broker.port)
        reader, writer = await asyncio.open_connection(*target)
        if proxy is not None:
            await self._through_proxy(reader, writer, proxy)
        # an IP literal sends no SNI but is checked against the certificate's IP names
        await writer.start_tls(self.trust.context(), server_hostname=self.server_name.strip("[]"))
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        warning = self.trust.check(str(self.broker), der)
        if warning:
            self._on_warning(warning)
        key = os.urandom(16)
        writer.write(ws.client_request(self.server_name, key))
        head = await _read_head(reader)
        ws.parse_response(head, key)
        return reader, writer

    async def _through_proxy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: Proxy
    ) -> None:
        where = str(self.broker)
        auth = ""
        if proxy.auth:
            auth = f"Proxy-Authorization: Basic {base64.b64encode(proxy.auth.encode()).decode()}\r\n"
        writer.write(f"CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n{auth}\r\n".encode())
        head = await _read_head(reader)
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = status.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            raise OSError(0, f"proxy {proxy.host}:{proxy.port} refused CONNECT: {status[:100]}")

    async def _read(self, reader: asyncio.StreamReader) -> str:
        decoder = ws.Decoder(max_message=MAX_MESSAGE, masked=False)
        while True:
            data = await reader.read(65536)
            if not data:
                return "the broker closed the connection"
            for event in decoder.feed(data):
                if isinstance(event, ws.Message):
                    if event.data:
                        self._on_datagram(event.data, self.broker)
                elif isinstance(event, ws.Ping):
                    if self._writer is not None:
                        self._writer.write(ws.encode(event.data, os.urandom(4), ws.Opcode.PONG))
                elif isinstance(event, ws.Closed):
                    return f"the broker closed the connection ({event.code} {event.reason})".strip()


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """An HTTP head, bounded (ws.MAX_HEAD); leaves what follows it in the reader."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise ws.WebSocketError("HTTP head too long") from None
    except asyncio.IncompleteReadError:
        raise ws.WebSocketError("connection closed during the upgrade") from None
    if len(head) > ws.MAX_HEAD:
        raise ws.WebSocketError("HTTP head too long")
    return head
