"""natter from Python: the seed's example on localhost.

A broker, bob listening, alice forwarding a local port to bob's side of a small TCP echo
service; bytes sent through the forward must come back unchanged. Exit code 0 on success.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import tempfile

from natter import Broker, Client, Config, logs


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def main() -> int:
    logs.configure("console", "warning")  # structlog prints everything unless told otherwise
    service = await asyncio.start_server(echo, "127.0.0.1", 0)
    service_port = service.sockets[0].getsockname()[1]
    async with Broker(Config(broker_addr="127.0.0.1:0")) as broker:
        assert broker.address is not None
        broker_addr = f"127.0.0.1:{broker.address.port}"
        bob = Client(Config(client_user="bob", broker_addr=broker_addr, state_dir=tempfile.mkdtemp()))
        alice = Client(Config(client_user="alice", broker_addr=broker_addr, state_dir=tempfile.mkdtemp()))
        async with bob, alice:
            await bob.listen()
            forward = await alice.forward("127.0.0.1:0", "bob", f":{service_port}")
            assert forward.local is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", forward.local.port)
            payload = os.urandom(1 << 20)
            writer.write(payload)
            writer.write_eof()
            received = await reader.read()
            writer.close()
            ok = hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            verdict = "ok" if ok else "MISMATCH"
            print(f"{verdict}: {len(received)} bytes through {forward.local} -> bob:{service_port}")
            await forward.close()
    service.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
