"""The raw-engine anchor: one QUIC stream between two processes over UDP, no natter code.

    python bench/rawquic.py server PORT [ENGINE [HOST]]       # receives one stream, prints "ready PORT"
    python bench/rawquic.py client PORT SIZE [ENGINE [HOST]]  # sends SIZE bytes, prints MB/s

ENGINE is aioquic (default) or qh3: the same code with the other package's imports. HOST
is 127.0.0.1 unless given (the server's address to bind, the client's to send to: the NAT
lab's anchor runs through a port forward).

The same batched sans-IO loop natter uses (read many datagrams per wake-up, transmit once
per loop turn), as in shared/QUIC-NOTES.md, so the ratio natter/raw shows natter's own cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import sys
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CHUNK = 64 * 1024
LIMIT = 1 << 20
ENGINE = (
    sys.argv[4 if sys.argv[1:2] == ["client"] else 3]
    if len(sys.argv) > (4 if sys.argv[1:2] == ["client"] else 3)
    else "aioquic"
)

if ENGINE == "qh3":
    from qh3._hazmat import Buffer
    from qh3.quic import events
    from qh3.quic.configuration import QuicConfiguration
    from qh3.quic.connection import QuicConnection
    from qh3.quic.packet import QuicPacketType, pull_quic_header
    from qh3.tls import load_pem_private_key, load_pem_x509_certificates
else:
    from aioquic.buffer import Buffer  # type: ignore[no-redef]
    from aioquic.quic import events  # type: ignore[no-redef]
    from aioquic.quic.configuration import QuicConfiguration  # type: ignore[no-redef]
    from aioquic.quic.connection import QuicConnection  # type: ignore[no-redef]
    from aioquic.quic.packet import QuicPacketType, pull_quic_header  # type: ignore[no-redef]


def configuration(is_client: bool) -> Any:
    cfg = QuicConfiguration(
        is_client=is_client, alpn_protocols=["raw"], max_datagram_size=1350, verify_mode=ssl.CERT_NONE
    )
    if ENGINE == "qh3":
        cfg.probe_datagram_size = False  # as natter runs it: one datagram size
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raw")])
    now = datetime.datetime.now(datetime.UTC)
    cfg.certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cfg.private_key = key
    if ENGINE == "qh3":
        cfg.certificate = load_pem_x509_certificates(
            cfg.certificate.public_bytes(serialization.Encoding.PEM)
        )[0]
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        cfg.private_key = load_pem_private_key(pem, None)
    return cfg


class Endpoint:
    def __init__(self, sock: socket.socket, is_client: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.is_client = is_client
        self.conn: QuicConnection | None = None
        self.peer: tuple[str, int] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.flush_handle: asyncio.Handle | None = None
        self.received = 0
        self.first_byte = 0.0
        self.done = asyncio.Event()
        self.connected = asyncio.Event()
        self.writable = asyncio.Event()
        self.loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        now = self.loop.time()
        for _ in range(128):
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                break
            if self.conn is None:
                cfg = configuration(False)
                header = pull_quic_header(Buffer(data=data), host_cid_length=cfg.connection_id_length)
                if header.packet_type != QuicPacketType.INITIAL:
                    continue
                self.conn = QuicConnection(
                    configuration=cfg, original_destination_connection_id=header.destination_cid
                )
                self.peer = addr
            self.conn.receive_datagram(data, addr, now)
        self.process()
        self.flush()

    def process(self) -> None:
        assert self.conn is not None
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted):
                self.connected.set()
            elif isinstance(event, events.StreamDataReceived):
                if not self.received:
                    self.first_byte = time.perf_counter()
                self.received += len(event.data)
                if event.end_stream:
                    self.done.set()

    def schedule(self) -> None:
        if self.flush_handle is None:
            self.flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_handle = None
        if self.conn is None:
            return
        for data, addr in self.conn.datagrams_to_send(self.loop.time()):
            with contextlib.suppress(BlockingIOError):
                self.sock.sendto(data, addr)
        when = self.conn.get_timer()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self.on_timer) if when is not None else None
        self.writable.set()

    def on_timer(self) -> None:
        assert self.conn is not None
        self.timer = None
        self.conn.handle_timer(self.loop.time())
        self.process()
        self.flush()

    def backlog(self, stream_id: int) -> int:
        assert self.conn is not None
        if ENGINE == "qh3":
            return int(self.conn.get_send_buffer_size(stream_id))  # not yet sent (qh3 has no more)
        stream = self.conn._streams.get(stream_id)
        return 0 if stream is None else stream.sender._buffer_stop - stream.sender._buffer_start


async def server(port: int, host: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    sock.setblocking(False)
    endpoint = Endpoint(sock, False)
    print(f"ready {sock.getsockname()[1]}", flush=True)
    await endpoint.done.wait()
    elapsed = time.perf_counter() - endpoint.first_byte
    await asyncio.sleep(0.2)
    rate = endpoint.received / elapsed / 1e6
    print(f"received {endpoint.received} in {elapsed:.3f} s: {rate:.1f} MB/s", flush=True)


async def client(port: int, size: int, host: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind(("127.0.0.1" if host == "127.0.0.1" else "0.0.0.0", 0))
    sock.setblocking(False)
    endpoint = Endpoint(sock, True)
    endpoint.conn = QuicConnection(configuration=configuration(True))
    endpoint.conn.connect((host, port), endpoint.loop.time())
    endpoint.flush()
    await asyncio.wait_for(endpoint.connected.wait(), 10)
    stream = endpoint.conn.get_next_available_stream_id()
    data = b"\x00" * CHUNK
    start = time.perf_counter()
    sent = 0
    while sent < size:
        while endpoint.backlog(stream) > LIMIT:
            endpoint.writable.clear()
            await endpoint.writable.wait()
        piece = data[: min(CHUNK, size - sent)]
        endpoint.conn.send_stream_data(stream, piece, end_stream=sent + len(piece) >= size)
        sent += len(piece)
        endpoint.schedule()
        await asyncio.sleep(0)
    while endpoint.backlog(stream) > 0:
        endpoint.writable.clear()
        await endpoint.writable.wait()
    elapsed = time.perf_counter() - start
    print(f"sent {size} in {elapsed:.3f} s: {size / elapsed / 1e6:.1f} MB/s", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(server(int(sys.argv[2]), sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"))
    else:
        host = sys.argv[5] if len(sys.argv) > 5 else "127.0.0.1"
        asyncio.run(client(int(sys.argv[2]), int(sys.argv[3]), host))
