"""The processes of one NAT-lab scenario: a broker (or replicas) on the "internet", agents
and helper services in their namespaces, all stopped in reverse order on exit."""

from __future__ import annotations

import os
import threading

from natlab import INET_IP, NatLab
from netcheck import digest_of_pattern
from procs import Proc, direct, natter, server, tool

FLEET_SECRET = "natter-lab-fleet-secret-0123"


class Scene:
    def __init__(self, lab: NatLab, engine: str | None = None) -> None:
        self.lab = lab
        # every agent's --quic-engine: the suite's second pass sets NATTER_QUIC_ENGINE=native
        self.engine = engine or os.environ.get("NATTER_QUIC_ENGINE") or "qh3"
        self.procs: list[Proc] = []

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def broker(self, port: int = 10000, *extra: str) -> Proc:
        """A seed-style broker at INET_IP:port; returns once it listens."""
        broker = self.add(natter("-server", f"{INET_IP}:{port}", *extra, prefix=self.lab.prefix("inet")))
        broker.wait_event("broker listening")
        return broker

    def replicas(self, redis_url: str, ports: tuple[int, ...], *, mesh: bool = False) -> list[Proc]:
        """Fleet replicas r1, r2, ... sharing Redis, one per port; with ``mesh``, relaying
        to each other over the relay mesh (port + 1000, a shared fleet secret) and
        serving metrics on port + 2000."""
        started = []
        for i, port in enumerate(ports, start=1):
            argv = ["broker", "--listen", f"{INET_IP}:{port}", "--redis", redis_url, "--broker-id", f"r{i}"]
            prefix = self.lab.prefix("inet")
            if mesh:
                argv += ["--mesh-listen", f"{INET_IP}:{port + 1000}", "--metrics", f"{INET_IP}:{port + 2000}"]
                prefix = [*prefix, "env", f"NATTER_FLEET_SECRET={FLEET_SECRET}"]
            replica = self.add(natter(*argv, prefix=prefix))
            replica.wait_event("broker listening")
            started.append(replica)
        return started

    def service(self, kind: str, *args: str, on: str = "bob") -> int:
        """A netcheck server (echo, sink, ...) on role's loopback; returns its port."""
        proc, port = server(kind, "0", *args, prefix=self.lab.prefix(on))
        self.add(proc)
        return port

    def agent(self, on: str, name: str, broker_port: int, *args: str) -> Proc:
        """natter -name NAME -broker INET_IP:PORT ARGS... inside role's namespace."""
        return self.add(
            natter(
                "-name",
                name,
                "-broker",
                f"{INET_IP}:{broker_port}",
                "-quic-engine",
                self.engine,
                *args,
                prefix=self.lab.prefix(on),
            )
        )

    def listener(self, broker_port: int, timeout: float = 20.0) -> Proc:
        """bob, listening behind his NAT, once the broker has registered him."""
        bob = self.agent("bob", "bob", broker_port, "-listen")
        bob.wait_kind("registered", name="bob", timeout=timeout)
        return bob

    def forward_to_bob(
        self, broker_port: int, local_port: int, service: str = "echo"
    ) -> tuple[Proc, Proc, Proc]:
        """A broker, bob listening with a netcheck service, alice forwarding local_port to it
        over a direct path: (broker, bob, alice), once the path is up."""
        broker = self.broker(broker_port)
        service_port = self.service(service)
        bob = self.listener(broker_port)
        alice = self.agent("alice", "alice", broker_port, f"{local_port}:bob:{service_port}")
        alice.wait_path("bob", direct, timeout=30)
        return broker, bob, alice

    def send_checked(self, port: int, size: int, on: str = "alice", timeout: float = 120) -> None:
        """Send size bytes through a forward to a sink; every byte must arrive."""
        reply = tool("send", "127.0.0.1", str(port), str(size), prefix=self.lab.prefix(on), timeout=timeout)
        assert reply.split() == [str(size), digest_of_pattern(size)], reply

    def send_in_background(self, port: int, size: int, on: str = "alice") -> Transfer:
        return Transfer(self, port, size, on)


class Transfer:
    """A checked send running in a thread while the test changes the network under it."""

    def __init__(self, scene: Scene, port: int, size: int, on: str) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                scene.send_checked(port, size, on, timeout=200)
            except BaseException as exc:  # reported by finish()
                self._error = exc

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def finish(self) -> None:
        self._thread.join(200)
        assert not self._thread.is_alive(), "transfer did not finish"
        if self._error is not None:
            raise self._error
