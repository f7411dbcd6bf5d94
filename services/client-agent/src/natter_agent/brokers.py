"""Where the brokers are, and the protocol settings out of the product's Config."""

from __future__ import annotations

import socket

from natter_proto.agent.settings import AgentSettings
from natter_proto.config import Config, broker_list
from natter_proto.endpoints import AddressError, Endpoint, endpoint, split_host_port


def broker_addresses(addrs: str | list[str]) -> list[tuple[str, int]]:
    """Check broker HOST:PORTs without looking anything up (a usage mistake shows at once)."""
    found = []
    for addr in broker_list(addrs):
        host, port = split_host_port(addr, default_host="127.0.0.1")
        if port == 0:
            raise AddressError(f"broker address {addr!r} needs a port")
        found.append((host, port))
    if not found:
        raise AddressError("no broker address given")
    return found


def resolve_brokers(addrs: str | list[str]) -> list[Endpoint]:
    """Resolve broker HOST:PORTs to IPv4 endpoints (the agent's socket is IPv4); blocking.

    A name with several addresses yields each of them: several brokers to fail over between.
    """
    found: dict[Endpoint, None] = {}
    for host, port in broker_addresses(addrs):
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise AddressError(f"cannot resolve broker host {host!r}: {exc.strerror}") from None
        for info in infos:
            ip, resolved_port = info[4][:2]
            found.setdefault(endpoint(str(ip), int(resolved_port)), None)
    return list(found)


def agent_settings(config: Config) -> AgentSettings:
    """The protocol's knobs out of the product's Config."""
    names = AgentSettings.__dataclass_fields__
    return AgentSettings(**{name: getattr(config, name) for name in names if hasattr(config, name)})
