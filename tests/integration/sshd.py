"""A private OpenSSH server for tests: its own host key, one client key, loopback (or a
namespace's address) only, started and stopped by the test. Needs root (sshd switches
to the logged-in user) and Debian's openssh-server."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from procs import Proc

SSHD = "/usr/sbin/sshd"


def available() -> str | None:
    """None if a test sshd can run here, else why not."""
    if os.geteuid() != 0:
        return "a test sshd needs root"
    if not os.path.exists(SSHD):
        return "openssh-server is not installed (scripts/setup.sh installs it as root)"
    return None


class Sshd:
    def __init__(self, port: int, address: str = "127.0.0.1", prefix: Sequence[str] = ()) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="natter-sshd-"))
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.dir / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress {address}\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nLogLevel ERROR\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        self.proc = Proc([SSHD, "-D", "-e", "-f", str(config)], prefix=prefix)

    def ssh(self, host: str, port: int, *options: str, command: str = "echo ok") -> list[str]:
        """An ssh command line for root@host:port with this server's client key."""
        return [
            "ssh",
            "-i",
            str(self.client_key),
            "-p",
            str(port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=20",
            *options,
            f"root@{host}",
            command,
        ]

    def stop(self) -> None:
        self.proc.stop()
