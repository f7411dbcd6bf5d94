"""What an agent needs before it starts: its brokers' addresses, its key, whom it trusts,
its QUIC engine, and the protocol's settings out of the product's Config."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from natter_proto.acl import PeerAllowList, parse_peer_rule
from natter_proto.agent.settings import AgentSettings
from natter_proto.config import Config, broker_list
from natter_proto.endpoints import AddressError, Endpoint, endpoint, split_host_port
from natter_proto.identity import Identity

from .brokertrust import BrokerTrust
from .engines import AnyEngine, make_engine
from .keystore import KNOWN_PEERS, KnownPeers, load_identity, state_dir
from .tls import credentials_for
from .trust import PeerTrust


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


def resolve_brokers(addrs: str | list[str]) -> dict[Endpoint, str]:
    """Resolve broker HOST:PORTs to endpoints of both families, each with the host as given
    (the TCP stream's TLS server name); blocking.

    A name with several addresses yields each of them: several brokers to fail over
    between, IPv4 first, then IPv6 (the agent races the two families: BrokerLink), without
    those this host has no route to (an IPv6-only host's IPv4 ones).
    """
    found: dict[Endpoint, str] = {}
    for host, port in broker_addresses(addrs):
        try:
            infos = socket.getaddrinfo(host.strip("[]"), port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise AddressError(f"cannot resolve broker host {host!r}: {exc.strerror}") from None
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        routable = [info for info in infos if _routable(info[0], info[4])] or infos
        for info in routable:
            ip, resolved_port = info[4][:2]
            found.setdefault(endpoint(str(ip).split("%")[0], int(resolved_port)), host)
    return found


def _routable(family: int, address: tuple[object, ...]) -> bool:
    """Does this host have a route to address (an IPv6-only host has none to IPv4)?
    A UDP connect only looks the route up; nothing is sent."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
    except OSError:
        return False
    return True


def agent_settings(config: Config) -> AgentSettings:
    """The protocol's knobs out of the product's Config."""
    names = AgentSettings.__dataclass_fields__
    return AgentSettings(**{name: getattr(config, name) for name in names if hasattr(config, name)})


@dataclass
class Loaded:
    brokers: dict[Endpoint, str]  # each with its host name as given
    identity: Identity
    created: bool  # the key was made just now
    trust: PeerTrust
    engine: AnyEngine
    broker_trust: BrokerTrust


def load(config: Config, engine: AnyEngine | None = None) -> Loaded:
    """Blocking (DNS, the state directory): the agent calls it in start(), not in __init__."""
    brokers = resolve_brokers(config.broker_addr)
    directory = state_dir(config.state_dir)
    identity, created = load_identity(directory)
    rules = config.allow_peers
    trust = PeerTrust(
        pinned=dict(config.pinned_peers),
        known=KnownPeers(directory / KNOWN_PEERS),
        allow=PeerAllowList([parse_peer_rule(r) for r in rules] if rules is not None else None),
        me=config.client_user,
    )
    engine = engine or make_engine(
        config.quic_engine,
        credentials=credentials_for(identity, config.client_user),
        max_datagram_size=config.max_datagram_size,
        idle_timeout=config.idle_timeout,
        stream_window=config.stream_window,
        connection_window=config.connection_window,
        max_streams=config.max_streams,
    )
    broker_trust = BrokerTrust(config.broker_ca, config.broker_key, directory)
    return Loaded(brokers, identity, created, trust, engine, broker_trust)
