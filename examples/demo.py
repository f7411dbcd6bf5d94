"""The demo: a broker, bob and alice on localhost, as the seed's three command lines.

bob listens; alice forwards a local port to a small TCP echo service on bob's side; the
demo sends bytes through the forward, checks every one of them, and exits 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

NATTER = str(Path(sys.executable).parent / "natter")


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Agent:
    """A natter process whose JSON log lines we watch and echo in plain words."""

    def __init__(self, label: str, *args: str) -> None:
        self.label = label
        # each agent keeps its identity key in a state directory of its own, and the broker
        # its name bindings (a fresh one per run: the demo's keys are new each time)
        state = ["-state-dir", tempfile.mkdtemp(prefix=f"natter-demo-{label}-")]
        argv = [NATTER, *args, *state, "-log-format", "json"]
        print(f"$ natter {' '.join(args)}")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_for(self, text: str, timeout: float = 20.0) -> dict[str, object]:
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), True)
        signal.alarm(int(timeout))
        try:
            for raw in self.proc.stderr:
                entry = json.loads(raw)
                extra = {k: v for k, v in entry.items() if k not in ("event", "level", "timestamp")}
                print(f"  [{self.label}] {entry['event']}  {extra}")
                if text in entry["event"]:
                    return dict(entry)
        finally:
            signal.alarm(0)
        raise SystemExit(f"{self.label} exited before '{text}'")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def push() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    pusher = asyncio.create_task(push())
    received = await reader.read(-1)
    await pusher
    writer.close()
    return received


async def main() -> int:
    service = await asyncio.start_server(echo, "127.0.0.1", 0)
    service_port = service.sockets[0].getsockname()[1]
    print(f"a TCP echo service listens on 127.0.0.1:{service_port} (bob's side)")
    broker_port = free_port(socket.SOCK_DGRAM)
    local_port = free_port(socket.SOCK_STREAM)
    broker_addr = f"127.0.0.1:{broker_port}"
    agents = []
    try:
        broker = Agent("broker", "-server", broker_addr)
        agents.append(broker)
        broker.wait_for("broker listening")
        bob = Agent("bob", "-name", "bob", "-broker", broker_addr, "-listen")
        agents.append(bob)
        bob.wait_for("registered as bob")
        alice = Agent("alice", "-name", "alice", "-broker", broker_addr, f"{local_port}:bob:{service_port}")
        agents.append(alice)
        await asyncio.to_thread(alice.wait_for, "direct path up")
        payload = os.urandom(5 << 20)
        received = await round_trip(local_port, payload)
        ok = hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        print(
            f"sent {len(payload)} bytes through 127.0.0.1:{local_port} -> bob:{service_port}, "
            f"got {len(received)} back: {'all bytes match' if ok else 'MISMATCH'}"
        )
        return 0 if ok else 1
    finally:
        for agent in reversed(agents):
            agent.stop()
        service.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
