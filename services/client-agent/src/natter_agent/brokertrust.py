"""How an agent trusts the broker's TLS certificate on the TCP stream.

Strict where asked: ``--broker-ca FILE`` (or ``system``: the system's CAs) verifies the
chain and the name, ``--broker-key SHA256`` pins the certificate's public key. Otherwise
any certificate is taken, as the UDP path takes any broker today (the broker never sees a
tunnel's contents, and tunnels are pinned end to end), but its key is remembered on first
use in ``known_brokers`` and a change is warned about, once per connection.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from natter_proto.tlskey import key_fingerprint

KNOWN_BROKERS = "known_brokers"


class BrokerTrustError(Exception):
    """The broker's certificate is not the one we were told to expect."""


@dataclass
class BrokerTrust:
    ca: str = ""  # a CA file, "system", or "": any certificate (remembered)
    pinned_key: str = ""  # SHA256:... of the broker's key, or ""
    state_dir: Path | None = None  # where known_brokers lives (None: memory only)
    _memory: dict[str, str] = field(default_factory=dict, repr=False)  # without a state dir

    @property
    def strict(self) -> bool:
        return bool(self.ca or self.pinned_key)

    def context(self) -> ssl.SSLContext:
        if self.ca:
            ctx = ssl.create_default_context(cafile=None if self.ca == "system" else self.ca)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # checked by key below, after the handshake
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def check(self, broker: str, der_certificate: bytes | None) -> str:
        """After the handshake: raise if a pin is broken; else a warning to log, or ""."""
        if der_certificate is None:
            raise BrokerTrustError("the broker sent no certificate")
        seen = key_fingerprint(der_certificate)
        if self.pinned_key:
            if seen != self.pinned_key:
                raise BrokerTrustError(f"broker key {seen} is not the pinned {self.pinned_key}")
            return ""
        if self.ca:
            return ""
        known = self._known()
        before = known.get(broker)
        if before == seen:
            return ""
        known[broker] = seen
        self._save(known)
        if before is None:
            return ""
        return (
            f"broker {broker} presents another key than before ({seen}, was {before}); "
            "accepted (pin it with --broker-key, or verify with --broker-ca)"
        )

    def _file(self) -> Path | None:
        return self.state_dir / KNOWN_BROKERS if self.state_dir is not None else None

    def _known(self) -> dict[str, str]:
        path = self._file()
        if path is None or not path.exists():
            return dict(self._memory)
        known: dict[str, str] = {}
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[:10000]:
            parts = line.split()
            if len(parts) == 2:
                known[parts[0]] = parts[1]
        return known

    def _save(self, known: dict[str, str]) -> None:
        self._memory = dict(known)
        path = self._file()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{b} {k}\n" for b, k in sorted(known.items())), encoding="utf-8")
        except OSError:
            pass  # a read-only state dir: remembered for this run only
