"""Running natter and helper processes, and reading their JSON log lines."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# NATTER_BIN: another build's command (bench/nat_matrix.py --natter, for before and after)
NATTER = os.environ.get("NATTER_BIN") or str(Path(sys.executable).parent / "natter")
NETCHECK = [sys.executable, str(HERE / "netcheck.py")]


def direct(path: object) -> bool:
    """A tunnel_up's path that is not the relay: direct, lan or predicted."""
    return path in ("direct", "lan", "predicted")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose stderr (JSON log lines) and stdout are collected by threads."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = subprocess.DEVNULL,
        prefix: Sequence[str] = (),
        home: str | None = None,
    ) -> None:
        # each process gets its own state directory (identity key, known peers) unless told
        home = home or tempfile.mkdtemp(prefix="natter-home-")
        self.home = home
        env = dict(os.environ, PYTHONUNBUFFERED="1", XDG_CONFIG_HOME=home)
        self.argv = list(prefix) + list(argv)
        self.popen = subprocess.Popen(
            self.argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        self.lines: list[dict[str, Any]] = []
        self.raw_err: list[str] = []
        self.out: queue.Queue[str] = queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._read_err, daemon=True).start()
        threading.Thread(target=self._read_out, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            text = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.raw_err.append(text)
                try:
                    entry = json.loads(text)
                    if isinstance(entry, dict):
                        self.lines.append(entry)
                except ValueError:
                    pass
                self._cond.notify_all()

    def _read_out(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.out.put(raw.decode(errors="replace").rstrip("\n"))

    def mark(self) -> int:
        """A position in the log; pass it as ``since`` to wait only for later lines."""
        with self._cond:
            return len(self.lines)

    def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0, since: int = 0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for entry in self.lines[since:]:
                    if predicate(entry):
                        return entry
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and not self._more_soon()):
                    raise AssertionError(
                        f"log line not seen in {self.argv}; exit={self.popen.poll()}\n"
                        + "\n".join(self.raw_err[-30:])
                    )
                self._cond.wait(min(remaining, 0.2))

    def _more_soon(self) -> bool:
        return False

    def wait_kind(self, kind: str, timeout: float = 20.0, since: int = 0, **fields: object) -> dict[str, Any]:
        """An agent event of this kind (natter_proto.agent's vocabulary) with these fields (a
        field's value, or a test of it)."""

        def matches(entry: dict[str, Any]) -> bool:
            return entry.get("kind") == kind and all(
                want(entry.get(key)) if callable(want) else entry.get(key) == want
                for key, want in fields.items()
            )

        return self.wait_log(matches, timeout, since)

    def wait_path(
        self, peer: str, kind: str | Callable[[object], bool], timeout: float = 40.0
    ) -> dict[str, Any]:
        """The tunnel to peer on a path of this kind: its tunnel_up, or the path_changed that
        moved it there (a slow punch starts on the relay and moves over). The entry's
        ``endpoint`` is the path's remote endpoint, either way."""

        def wanted(value: object) -> bool:
            return kind(value) if callable(kind) else value == kind

        def matches(entry: dict[str, Any]) -> bool:
            if entry.get("peer") != peer:
                return False
            up = entry.get("kind") == "tunnel_up" and wanted(entry.get("path"))
            return up or (entry.get("kind") == "path_changed" and wanted(entry.get("new_kind")))

        entry = self.wait_log(matches, timeout)
        return {**entry, "endpoint": entry.get("peer_endpoint", entry.get("new"))}

    def wait_event(self, text: str, timeout: float = 20.0, since: int = 0) -> dict[str, Any]:
        return self.wait_log(lambda e: text in str(e.get("event", "")), timeout, since)

    def read_line(self, timeout: float = 20.0) -> str:
        try:
            return self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from {self.argv}\n" + "\n".join(self.raw_err[-30:])) from None

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def natter(
    *args: str, prefix: Sequence[str] = (), stdin: int | None = subprocess.DEVNULL, home: str | None = None
) -> Proc:
    """Run the natter command with JSON logs; ``home`` keeps one identity across runs."""
    log_flag = (
        "--log-format" if args and args[0] in ("broker", "listen", "forward", "agent") else "-log-format"
    )
    return Proc([NATTER, *args, log_flag, "json"], prefix=prefix, stdin=stdin, home=home)


def isolated_env() -> dict[str, str]:
    """The environment for a one-off natter run with a state directory of its own."""
    return dict(os.environ, XDG_CONFIG_HOME=tempfile.mkdtemp(prefix="natter-home-"))


def server(kind: str, *args: str, prefix: Sequence[str] = ()) -> tuple[Proc, int]:
    proc = Proc([*NETCHECK, kind, *args], prefix=prefix)
    line = proc.read_line()
    assert line.startswith("ready "), line
    return proc, int(line.split()[1])


def tool(*args: str, prefix: Sequence[str] = (), timeout: float = 120.0) -> str:
    result = subprocess.run([*prefix, *NETCHECK, *args], capture_output=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()
