"""Whom a tunnel may be with: the key the broker vouched for, the user's pins, the known
peers learned on first use, and (for a listener) the --allow list.

Checked once per tunnel, right after the QUIC handshake (which proved the peer holds its
key) and before any stream is opened or accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from natter_proto.acl import PeerAllowList
from natter_proto.identity import fingerprint, same_fingerprint

from .keystore import KnownPeers

log = structlog.get_logger("natter.trust")


@dataclass
class PeerTrust:
    pinned: dict[str, str]
    known: KnownPeers
    allow: PeerAllowList
    me: str

    def names(self, peer: str) -> bool:
        """Whether the user named this peer: pinned, in --allow, or in known_peers before this
        run (a peer learned in this run is still a stranger: identities cost nothing)."""
        rules = self.allow.rules or []
        named = peer in self.pinned or any(rule.name == peer for rule in rules)
        return named or peer in self.known.from_before

    def check(self, peer: str, vouched: bytes | None, presented: bytes | None, role: str) -> str | None:
        """None if the tunnel may go on, else the reason to refuse it (for logs and peers)."""
        if presented is None:
            return f"{peer} presented no key in the TLS handshake"
        seen = fingerprint(presented)
        if vouched is not None and vouched != presented:
            return f"{peer} presented key {seen}, but the broker vouched for {fingerprint(vouched)}"
        pin = self.pinned.get(peer)
        if pin is not None and not same_fingerprint(pin, seen):
            return f"{peer} presented key {seen}, which does not match the pinned fingerprint {pin}"
        known = self.known.get(peer)
        if pin is None and known is not None and not same_fingerprint(known, seen):
            return (
                f"KEY CHANGED for {peer}: known as {known}, now presents {seen}; if this is "
                f"expected, remove {peer}'s line from {self.known.path} (or pin it with --peer)"
            )
        if role == "server" and not self.allow.allows(peer, seen):
            return f"{peer} ({seen}) is not allowed by {self.me}'s --allow list"
        if known is None:
            self.known.learn(peer, presented)
            log.info(f"learned {peer}'s key (trust on first use)", peer=peer, key=seen)
        return None
