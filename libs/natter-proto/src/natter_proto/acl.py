"""A listener's access control: which peers may connect, and where they may go.

Pure matching; the agent resolves target names to addresses before asking.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from .endpoints import AddressError, is_decimal, split_host_port
from .frames import valid_name
from .identity import same_fingerprint, valid_fingerprint


class AclError(ValueError):
    pass


@dataclass(frozen=True)
class PeerRule:
    name: str
    fingerprint: str | None = None


def parse_peer_rule(text: str) -> PeerRule:
    name, _, print_ = text.partition("=")
    if not valid_name(name):
        raise AclError(f"--allow {text!r}: {name!r} is not a valid peer name")
    if print_ and not valid_fingerprint(print_):
        raise AclError(f"--allow {text!r}: {print_!r} is not a fingerprint (see 'natter id')")
    return PeerRule(name, print_ or None)


class PeerAllowList:
    """None of rules means: any authenticated peer."""

    def __init__(self, rules: list[PeerRule] | None) -> None:
        self.rules = rules

    def allows(self, name: str, fingerprint: str) -> bool:
        if self.rules is None:
            return True
        return any(
            rule.name == name
            and (rule.fingerprint is None or same_fingerprint(rule.fingerprint, fingerprint))
            for rule in self.rules
        )


class Proto(enum.Enum):
    TCP = "tcp"
    UDP = "udp"


@dataclass(frozen=True)
class TargetRule:
    host: str | None  # None: any host; "" : loopback
    port: int | None  # None: any port
    proto: Proto = Proto.TCP  # a rule is for one protocol: ``/udp`` names UDP's


def parse_target_rule(text: str) -> TargetRule:
    """``HOST:PORT``, ``PORT``, ``HOST:*`` or ``*``, each for TCP, or with ``/udp`` (or
    ``/tcp``) for that protocol."""
    base, slash, proto = text.rpartition("/")
    if slash and proto in ("udp", "tcp") and base:
        rule = _parse_host_port_rule(base, text)
        return TargetRule(rule.host, rule.port, Proto(proto))
    return _parse_host_port_rule(text, text)


def _parse_host_port_rule(text: str, original: str) -> TargetRule:
    if text == "*":
        return TargetRule(None, None)
    if is_decimal(text):
        return TargetRule("", _port(text, original))
    if text.endswith(":*"):
        host = text[:-2].strip("[]")
        if not host:
            raise AclError(f"--allow-target {original!r}: missing host")
        return TargetRule(host, None)
    try:
        host, port = split_host_port(text)
    except AddressError as exc:
        raise AclError(f"--allow-target {original!r}: {exc}") from None
    if not host:
        return TargetRule("", _port(str(port), original))
    return TargetRule(host, _port(str(port), original))


def _port(text: str, rule: str) -> int:
    if not is_decimal(text) or len(text) > 5:
        raise AclError(f"--allow-target {rule!r}: port out of range")
    port = int(text)
    if not 1 <= port <= 65535:
        raise AclError(f"--allow-target {rule!r}: port out of range")
    return port


class TargetAllowList:
    """None of rules means the default: loopback only, any port, TCP and UDP."""

    def __init__(self, rules: list[TargetRule] | None) -> None:
        loopback = [TargetRule("", None, Proto.TCP), TargetRule("", None, Proto.UDP)]
        self.rules = rules if rules is not None else loopback

    def allows(self, host: str, port: int, resolved: list[str], proto: Proto = Proto.TCP) -> bool:
        """host as the peer wrote it, resolved: its addresses (all must be allowed)."""
        return any(rule.proto is proto and self._match(rule, host, port, resolved) for rule in self.rules)

    @staticmethod
    def _match(rule: TargetRule, host: str, port: int, resolved: list[str]) -> bool:
        if rule.port is not None and rule.port != port:
            return False
        if rule.host is None:
            return True
        if not resolved:
            return False
        if rule.host == "":
            return all(ipaddress.ip_address(ip).is_loopback for ip in resolved)
        return rule.host == host or all(ip == rule.host for ip in resolved)
