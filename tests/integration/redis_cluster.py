"""A real Redis Cluster for the tests: six ``redis-server`` processes in cluster mode on
loopback (three masters, each with a replica), made a cluster by ``redis-cli --cluster
create``. It can fail a master over, kill a node, and move a slot to another master.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from redis_server import _ping

NODE_TIMEOUT_MS = 1000  # a killed master is replaced within a few seconds


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose cluster-bus port (10000 higher) is free too."""
    for _ in range(1000):
        port = random.randrange(20000, 55000)
        if port not in taken and _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes]
    dir: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class RedisCluster:
    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (apt-get install redis-server redis-tools)")
        self.size = masters * (1 + replicas)
        self.replicas = replicas
        self.nodes: list[Node] = []

    @property
    def url(self) -> str:
        """One node's URL, as a user would give it: the broker finds the rest."""
        alive = next(node for node in self.nodes if node.proc.poll() is None)
        return f"redis://{alive.address}/0"

    def start(self) -> RedisCluster:
        for _ in range(self.size):
            port = cluster_port({node.port for node in self.nodes})
            workdir = tempfile.mkdtemp(prefix="natter-cluster-")
            argv = [
                "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
                "--cluster-config-file", f"{workdir}/nodes.conf", "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS), "--save", "", "--appendonly", "no", "--dir", workdir,
                "--protected-mode", "no",
            ]  # fmt: skip
            log = open(f"{workdir}/redis.log", "wb")  # noqa: SIM115  # closed with the process
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            self.nodes.append(Node(port, proc, workdir))
        deadline = time.monotonic() + 10
        while not all(_ping("127.0.0.1", node.port) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster nodes did not start")
            time.sleep(0.05)
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]}")
        self.wait_ok()
        self.wait_synced()
        return self

    def wait_synced(self, timeout: float = 30) -> None:
        """Until every replica has synchronised with its master (a replica that never did
        cannot take over when its master dies)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            roles = [self.cli(n, "role").split("\n") for n in self.nodes if n.proc.poll() is None]
            replicas = [role for role in roles if role[0] == "slave"]
            if len(replicas) == self.size // (1 + self.replicas) * self.replicas and all(
                len(role) > 3 and role[3] == "connected" for role in replicas
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("the replicas did not synchronise")

    def cli(self, node: Node, *args: str) -> str:
        result = subprocess.run(
            ["redis-cli", "-p", str(node.port), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result.stdout.strip()

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says the cluster is ok and agrees on the masters."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [n for n in self.nodes if n.proc.poll() is None]
            states = {self.cli(n, "cluster", "info").split("\n")[0].strip() for n in alive}
            if states == {"cluster_state:ok"} and len({tuple(self.masters_of(n)) for n in alive}) == 1:
                return
            time.sleep(0.2)
        raise RuntimeError("the cluster did not become ok")

    def masters_of(self, node: Node) -> list[int]:
        """The ports of the masters that serve slots, as ``node`` sees them."""
        masters = []
        for line in self.cli(node, "cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) > 8 and "master" in fields[2] and "fail" not in fields[2]:
                masters.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(masters)

    def node(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def master_of_slot(self, slot: int) -> Node:
        for entry in self._slots():
            if entry[0] <= slot <= entry[1]:
                return self.node(entry[2])
        raise LookupError(slot)

    def _slots(self) -> list[tuple[int, int, int]]:
        alive = next(n for n in self.nodes if n.proc.poll() is None)
        ranges = []
        for line in self.cli(alive, "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for part in fields[8:]:
                if part.startswith("["):
                    continue
                low, _, high = part.partition("-")
                ranges.append((int(low), int(high or low), port))
        return ranges

    def replica_of(self, master: Node) -> Node:
        for node in self.nodes:
            if node is master or node.proc.poll() is not None:
                continue
            role = self.cli(node, "role").split("\n")
            if role[0] == "slave" and len(role) > 2 and role[2] == str(master.port):
                return node
        raise LookupError(f"no replica of {master.address}")

    def fail_over(self, master: Node) -> Node:
        """Promote ``master``'s replica (CLUSTER FAILOVER, as an operator would); returns it."""
        replica = self.replica_of(master)
        self.cli(replica, "cluster", "failover")
        deadline = time.monotonic() + 20
        while "master" not in self.cli(replica, "role").split("\n")[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("the failover did not happen")
            time.sleep(0.1)
        self.wait_ok()
        return replica

    def kill(self, node: Node) -> None:
        """SIGKILL a node; a master's slots are served by its promoted replica on return."""
        slots = [low for low, _high, port in self._slots() if port == node.port]
        node.proc.kill()
        node.proc.wait()
        deadline = time.monotonic() + 30
        while slots and any(self._owner(slot) in (None, node.port) for slot in slots):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over {node.address}'s slots")
            time.sleep(0.1)
        self.wait_ok()

    def _owner(self, slot: int) -> int | None:
        for low, high, port in self._slots():
            if low <= slot <= high:
                return port
        return None

    def move_slot(self, slot: int, to: Node) -> None:
        """Reshard one slot with its keys to another master, as ``redis-cli --cluster
        reshard`` does: IMPORTING, MIGRATING, MIGRATE the keys, then NODE everywhere."""
        source = self.master_of_slot(slot)
        if source is to:
            return
        source_id, target_id = self.cli(source, "cluster", "myid"), self.cli(to, "cluster", "myid")
        self.cli(to, "cluster", "setslot", str(slot), "importing", source_id)
        self.cli(source, "cluster", "setslot", str(slot), "migrating", target_id)
        while True:
            keys = self.cli(source, "cluster", "getkeysinslot", str(slot), "100").split()
            if not keys:
                break
            self.cli(source, "migrate", "127.0.0.1", str(to.port), "", "0", "5000", "keys", *keys)
        for node in self.nodes:
            if node.proc.poll() is None:
                self.cli(node, "cluster", "setslot", str(slot), "node", target_id)
        self.wait_ok()

    def keyslot(self, key: str) -> int:
        alive = next(n for n in self.nodes if n.proc.poll() is None)
        return int(self.cli(alive, "cluster", "keyslot", key))

    def close(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
            shutil.rmtree(node.dir, ignore_errors=True)
