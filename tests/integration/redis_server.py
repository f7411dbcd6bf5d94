"""A real Redis for the tests: a testcontainers container where a Docker engine answers,
otherwise a ``redis-server`` process on a free port in a temporary directory.

Both can be stopped and started again on the same port (for the Redis-restart test).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    return result.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """redis-server in the foreground, no persistence, loopback (or a namespace) only."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, prefix: Sequence[str] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.host = host
        self.port = port or _free_port()
        self.prefix = list(prefix)
        self.dir = tempfile.mkdtemp(prefix="natter-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisProcess:
        argv = [
            *self.prefix,
            self.binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            "--protected-mode", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        if not self.prefix:
            return _ping(self.host, self.port)
        check = subprocess.run(
            [*self.prefix, "redis-cli", "-h", self.host, "-p", str(self.port), "ping"],
            capture_output=True,
            check=False,
        )
        return check.stdout.strip() == b"PONG"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def resume(self) -> None:
        """Start again on the same port (after stop)."""
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisContainer:
    """testcontainers' Redis module around a locally available image."""

    def __init__(self, image: str) -> None:
        os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
        try:
            from testcontainers.community.redis import RedisContainer as Impl  # type: ignore
        except ImportError:
            from testcontainers.redis import RedisContainer as Impl  # type: ignore
        self._impl: Any = Impl(image=image)
        self.host = "127.0.0.1"
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisContainer:
        self._impl.start()
        self.port = int(self._impl.get_exposed_port(6379))
        return self

    def stop(self) -> None:
        self._impl.get_wrapped_container().stop()

    def resume(self) -> None:
        self._impl.get_wrapped_container().start()

    def close(self) -> None:
        try:
            self._impl.stop()
        except Exception as exc:  # already gone (docker.errors.NotFound): nothing left to clean
            if "No such container" not in str(exc):
                raise


def start_redis() -> RedisProcess | RedisContainer:
    """A container when Docker answers and NATTER_REDIS_IMAGE names a local image; else a process."""
    image = os.environ.get("NATTER_REDIS_IMAGE", "")
    if image and docker_answers():
        return RedisContainer(image).start()
    return RedisProcess().start()
