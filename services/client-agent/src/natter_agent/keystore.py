"""The agent's state directory: its identity key and its known peers (trust on first use).

Files are created mode 0600 in a directory of mode 0700, like ssh's ~/.ssh.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from natter_proto.config import default_state_dir
from natter_proto.frames import valid_name
from natter_proto.identity import Identity, fingerprint, valid_fingerprint

KEY_FILE = "identity.pem"
KNOWN_PEERS = "known_peers"
MAX_KNOWN_PEERS = 1 << 20


class StateError(Exception):
    """The state directory or a file in it cannot be used."""


def state_dir(path: str) -> Path:
    directory = Path(path).expanduser() if path else default_state_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create state directory {directory}: {exc.strerror}") from None
    return directory


def _write_private(path: Path, data: bytes) -> None:
    temp = path.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


def load_identity(directory: Path) -> tuple[Identity, bool]:
    """The identity stored in directory, created on first use; returns (identity, created)."""
    path = directory / KEY_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            with contextlib.suppress(OSError):
                path.chmod(0o600)
        try:
            key = load_pem_private_key(path.read_bytes()[:16384], password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise StateError(f"cannot read identity key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise StateError(f"{path} is not an Ed25519 key")
        return Identity(key), False
    identity = Identity.generate()
    pem = identity.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        _write_private(path, pem)
    except OSError as exc:
        raise StateError(f"cannot write identity key {path}: {exc.strerror}") from None
    return identity, True


class KnownPeers:
    """name -> fingerprint, learned on first contact and checked on every later one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        if path is not None and path.exists():
            self.entries = parse_known_peers(
                path.read_text(encoding="utf-8", errors="replace")[:MAX_KNOWN_PEERS]
            )
        self.from_before = frozenset(self.entries)  # known before this run (not learned in it)

    def get(self, name: str) -> str | None:
        return self.entries.get(name)

    def learn(self, name: str, public_key: bytes) -> None:
        self.entries[name] = fingerprint(public_key)
        if self.path is None:
            return
        lines = [f"{peer} {print_}\n" for peer, print_ in sorted(self.entries.items())]
        text = "# natter known peers: NAME FINGERPRINT\n" + "".join(lines)
        with contextlib.suppress(OSError):  # the pin still holds for this run
            _write_private(self.path, text.encode())


def parse_known_peers(text: str) -> dict[str, str]:
    """Lines ``NAME FINGERPRINT``; anything else is skipped (never trusted, never fatal)."""
    entries: dict[str, str] = {}
    for raw in text.splitlines():
        parts = raw.split("#", 1)[0].split()
        if len(parts) == 2 and valid_name(parts[0]) and valid_fingerprint(parts[1]):
            entries[parts[0]] = parts[1]
    return entries
