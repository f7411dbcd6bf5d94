"""Simulated agents for the fleet load test: each is natter_proto's own ``Registration``
machine (the agent's, unchanged: keepalives, loss after two silent intervals, rotation to
the next broker, challenges) with its own UDP socket and Ed25519 identity, signing its
registrations as an agent does. One worker process drives a few thousand of them with one
epoll loop (a process may hold only so many sockets); the coordinator starts several.

    python fleetswarm.py worker --first 0 --count 5000 --brokers H:P,H:P,H:P \
        --interval 20 --duration 120 --connect-rate 5 --agents 20000 --out FILE

It runs until SIGTERM (or ``--duration``), then writes its report; SIGUSR1 starts the
connects. A worker asks for connects between random agents at ``--connect-rate`` per second,
retrying each (same request id, as agents do) every second until a punch comes or the
deadline (two keepalive intervals and 5 s) passes. It writes what happened, with wall-clock
times, as JSON: the coordinator knows when it injected faults.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "libs" / "natter-proto" / "src"))

from natter_proto import frames
from natter_proto.identity import Identity
from natter_proto.registration import (
    BrokerChanged,
    Registration,
    RegistrationLost,
    RegistrationUp,
    RegState,
)

RETRY_EVERY = 1.0


@dataclass
class Agent:
    index: int
    name: str
    identity: Identity
    sock: socket.socket
    brokers: list[tuple[str, int]]  # in this agent's failover order
    reg: Registration
    generation: int = 0  # for lazy deletion of stale timer entries
    ups: list[tuple[float, int]] = field(default_factory=list)  # (time, broker index)
    losses: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Connect:
    request_id: str
    requester: int
    target: str
    started: float
    deadline: float
    attempts: int = 0
    next_try: float = 0.0
    errors: list[str] = field(default_factory=list)


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        brokers = [(h, int(p)) for h, p in (b.rsplit(":", 1) for b in args.brokers.split(","))]
        self.agents: list[Agent] = []
        self.by_fd: dict[int, Agent] = {}
        self.poller = select.epoll()
        for index in range(args.first, args.first + args.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            order = brokers[index % len(brokers) :] + brokers[: index % len(brokers)]
            reg = Registration(
                f"a{index}", listening=True, keepalive_interval=args.interval, brokers=len(order)
            )
            agent = Agent(index, f"a{index}", Identity.generate(), sock, order, reg)
            self.agents.append(agent)
            self.by_fd[sock.fileno()] = agent
            self.poller.register(sock.fileno(), select.EPOLLIN)
        self.timers: list[tuple[float, int, int]] = []
        self.connects: dict[str, Connect] = {}
        self.done: list[dict[str, object]] = []
        self.rng = random.Random(args.first)
        self.serial = 0
        self.sent = 0
        self.stopping = False
        self.connecting = args.connect_after == 0
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "connecting", True))

    # -- an agent's turn ------------------------------------------------------------
    def flush(self, agent: Agent, now: float) -> None:
        for message in agent.reg.frames_to_send():
            if isinstance(message, frames.Register):
                unsigned = replace(message, public_key=agent.identity.public_key)
                message = replace(unsigned, signature=agent.identity.sign_register(unsigned))
            self.send(agent, frames.encode(message))
        while (event := agent.reg.next_event()) is not None:
            wall = time.time()
            if isinstance(event, RegistrationUp):
                agent.ups.append((wall, agent.reg.broker_index))
            elif isinstance(event, RegistrationLost):
                agent.losses.append((wall, event.reason))
            elif isinstance(event, BrokerChanged):
                pass
        timer = agent.reg.get_timer()
        if timer is not None:
            agent.generation += 1
            heapq.heappush(self.timers, (timer, agent.generation, agent.index - self.args.first))

    def send(self, agent: Agent, data: bytes) -> None:
        try:
            agent.sock.sendto(data, agent.brokers[agent.reg.broker_index])
            self.sent += 1
        except OSError:
            pass  # a full buffer: the machine's retries cover it, as on a real network

    def received(self, agent: Agent, data: bytes, now: float) -> None:
        try:
            message = frames.decode(data)
        except frames.FrameError:
            return
        request_id = getattr(message, "request_id", None)
        if request_id is not None and request_id in self.connects:
            self.answered(self.connects[request_id], message, now)
            return
        if isinstance(message, frames.Punch | frames.ConnectOffer):
            return  # we are the target of someone's connect: nothing to do here
        agent.reg.receive(message, now)
        self.flush(agent, now)

    # -- connects ---------------------------------------------------------------------
    def start_connect(self, now: float) -> None:
        ready = [a for a in self.agents if a.reg.state is RegState.REGISTERED]
        if not ready:
            return
        requester = self.rng.choice(ready)
        target = self.rng.randrange(self.args.agents)
        if target == requester.index:
            return
        self.serial += 1
        request_id = f"w{self.args.first}-{self.serial}"
        deadline = now + 2 * self.args.interval + 5
        connect = Connect(request_id, requester.index, f"a{target}", time.time(), deadline)
        self.connects[request_id] = connect
        self.try_connect(connect, now)

    def try_connect(self, connect: Connect, now: float) -> None:
        agent = self.agents[connect.requester - self.args.first]
        connect.attempts += 1
        connect.next_try = now + RETRY_EVERY
        message = frames.ConnectRequest(
            connect.request_id, agent.name, connect.target, "localhost:22", agent.reg.cookie
        )
        self.send(agent, frames.encode(message))

    def answered(self, connect: Connect, message: frames.Message, now: float) -> None:
        if isinstance(message, frames.Punch):
            self.finish(connect, "ok" if connect.attempts == 1 and not connect.errors else "healed")
        elif isinstance(message, frames.Error):
            connect.errors.append(str(message.code))  # retried at its next_try

    def finish(self, connect: Connect, outcome: str) -> None:
        self.connects.pop(connect.request_id, None)
        self.done.append(
            {
                "started": connect.started,
                "ended": time.time(),
                "outcome": outcome,
                "attempts": connect.attempts,
                "errors": connect.errors[-3:],
            }
        )

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        start = time.monotonic()
        end = start + self.args.duration
        now = start
        for agent in self.agents:  # the registration storm: everyone at once
            agent.reg.start(now)
            self.flush(agent, now)
        next_connect = start + self.args.connect_after
        next_sweep = start
        while now < end and not self.stopping:
            wait = min(0.05, max(0.0, self.timers[0][0] - now)) if self.timers else 0.05
            for fd, _ in self.poller.poll(wait):
                agent = self.by_fd[fd]
                for _ in range(16):
                    try:
                        data = agent.sock.recv(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    self.received(agent, data, time.monotonic())
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, generation, slot = heapq.heappop(self.timers)
                agent = self.agents[slot]
                if generation != agent.generation:
                    continue
                agent.reg.handle_timer(now)
                self.flush(agent, now)
            self.connecting = self.connecting or now >= start + self.args.connect_after
            if self.args.connect_rate > 0 and self.connecting:
                if next_connect > now + 1.0:  # started by SIGUSR1
                    next_connect = now
                while next_connect <= now:
                    self.start_connect(now)
                    next_connect += 1.0 / self.args.connect_rate
            if now >= next_sweep:
                next_sweep = now + 0.2
                for connect in list(self.connects.values()):
                    if now >= connect.deadline:
                        self.finish(connect, "failed")
                    elif now >= connect.next_try:
                        self.try_connect(connect, now)
        for connect in list(self.connects.values()):
            self.finish(connect, "unfinished")

    def report(self) -> dict[str, object]:
        return {
            "agents": [
                {"name": a.name, "home": a.brokers[0][1], "ups": a.ups, "losses": a.losses}
                for a in self.agents
            ],
            "connects": self.done,
            "sent": self.sent,
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["worker"])
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--agents", type=int, required=True, help="all workers' agents together")
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--interval", type=float, default=20.0)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connect-rate", type=float, default=0.0)
    parser.add_argument(
        "--connect-after", type=float, default=0.0, help="seconds before connects begin (or SIGUSR1)"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    worker = Worker(args)
    print("ready", flush=True)
    worker.run()
    Path(args.out).write_text(json.dumps(worker.report()))
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
