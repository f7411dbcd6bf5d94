"""Configuration shared by the broker and the client agent (the seed's ``Config``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .agent.settings import DEFAULTS
from .names import NAME_GRACE
from .udpflows import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_FLOWS, DEFAULT_QUEUE


def broker_list(value: str | list[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> ``["a:1", "b:2"]``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


def default_state_dir() -> Path:
    """Where an agent keeps its key and known peers, and a lone broker its name bindings."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "natter"


QUIC_ENGINES = ("aioquic", "qh3", "native")  # native: libs/natter-quic, where it is built
DEFAULT_ENGINE = "qh3"  # both peers of a tunnel need the same (bench/README.md)


@dataclass
class Config:
    """Settings of a broker or a client; the defaults suit the public internet.

    ``broker_addr`` is the broker's listen address for a broker (``":10000"``) and the
    broker to register with for a client (``"host:10000"``). A client may name several
    brokers (a list, or commas) and fails over between them; a name that resolves to
    several addresses counts as several brokers.
    """

    broker_addr: str | list[str] = ""
    client_user: str = ""

    # broker: fleet membership and side port
    redis_url: str = ""
    metrics_addr: str = ""
    broker_id: str = ""
    probe_addr: str = ""  # a second UDP port: agents learn whether their NAT is symmetric
    relay_bytes: int = 1 << 30  # per relayed session; 0 turns the relay off
    relay_seconds: float = 3600.0
    # broker: the relay mesh between replicas (UDP, authenticated with the fleet secret):
    # where this replica listens ("" off), the address the others send to ("" the bound
    # one), and the secret every replica of the fleet shares (16 bytes or more)
    mesh_addr: str = ""
    mesh_advertise: str = ""
    fleet_secret: str = ""
    # broker: the TCP way in for agents whose UDP is blocked (TLS, then WebSocket at
    # /natter/v1): "" the UDP address's host and port, "off" none, else HOST:PORT (":443")
    tcp_addr: str = ""
    # PEM files (a Kubernetes TLS Secret's tls.crt and tls.key); none: a self-signed pair
    # made once and kept in the state dir (memory only for a library broker without one)
    tls_cert: str = ""
    tls_key: str = ""
    tcp_per_ip: int = 32  # TCP connections at once from one address
    tcp_max: int = 20000  # TCP connections at once in all
    tcp_handshake_timeout: float = 10.0  # TLS and the WebSocket upgrade, together
    tcp_idle_timeout: float = 75.0  # no message this long: closed (agents send every 20 s)
    # broker: who may register, which names are whose, address validation and rate limits
    tokens_file: str = ""
    names_file: str = ""  # NAME FINGERPRINT per line: names bound before anyone registers
    name_grace: float = NAME_GRACE  # a released name stays its key's this long (seconds)
    cookie_window: float = 120.0
    rate_per_ip: float = 200.0
    burst_per_ip: float = 400.0
    rate_per_identity: float = 20.0
    burst_per_identity: float = 40.0

    # client: identity and authorization
    # an agent's key and known peers (default ~/.config/natter); a lone broker's name
    # bindings (the command defaults to the same; a library broker without one: memory)
    state_dir: str = ""
    token: str = ""
    pinned_peers: dict[str, str] = field(default_factory=dict)  # name -> fingerprint
    allow_peers: list[str] | None = None  # NAME or NAME=FINGERPRINT; None: any (warned)
    allow_targets: list[str] | None = None  # HOST:PORT, PORT, HOST:* or *; None: loopback

    # registration with the broker
    keepalive_interval: float = DEFAULTS.keepalive_interval
    register_timeout: float = DEFAULTS.register_timeout
    # broker: forget an agent that has been silent this long
    registration_ttl: float = 60.0

    # introduction and hole punching
    connect_timeout: float = DEFAULTS.connect_timeout
    punch_interval: float = DEFAULTS.punch_interval
    punch_timeout: float = DEFAULTS.punch_timeout
    handshake_timeout: float = DEFAULTS.handshake_timeout
    # a new tunnel's handshake starts on the relay this long after the punch began, unless a
    # direct path answered first; the punch goes on and a direct path takes over when found
    relay_head_start: float = DEFAULTS.relay_head_start
    # against a symmetric NAT (birthday method): sockets on the hard side, probes on the easy
    hard_nat_sockets: int = DEFAULTS.hard_nat_sockets
    # while relayed, punch again this often; a direct path takes over (0: never)
    upgrade_interval: float = DEFAULTS.upgrade_interval
    # a direct tunnel that sends but hears nothing back this long asks the broker where it
    # sees us; this long, it punches again and falls back to the relay if nothing answers
    path_silence: float = DEFAULTS.path_silence
    path_dead: float = DEFAULTS.path_dead
    spray_probes: int = DEFAULTS.spray_probes  # 255 mappings x 2048 probes: about 99.97% (1024: 98%)

    # the TCP way to the broker, when its UDP gets no answer (TLS, then WebSocket)
    proxy: str = ""  # an HTTP CONNECT proxy, http://[USER:PASS@]HOST:PORT; "": HTTPS_PROXY; "none"
    broker_ca: str = ""  # verify the broker's certificate: a CA file, or "system"; "": any (remembered)
    broker_key: str = ""  # or pin its key: SHA256:... (as `natter broker` logs it)

    # the agent's one UDP socket
    udp_host: str = "0.0.0.0"
    udp_port: int = 0

    # QUIC tunnel
    quic_engine: str = DEFAULT_ENGINE  # one of QUIC_ENGINES
    max_datagram_size: int = 1350
    idle_timeout: float = 60.0
    ping_interval: float = DEFAULTS.ping_interval
    stream_window: int = 1 << 20
    connection_window: int = 8 << 20
    send_buffer_limit: int = 1 << 20
    # streams (connections) a peer may open at once on a tunnel; QUIC allows 2^60. Each
    # costs a few kB while idle; bytes in flight stay within connection_window
    max_streams: int = 4096

    # forwards and the listener: what one local client or one peer can hold open
    max_connections: int = 1024  # per forward, open at once; more are refused and logged
    header_timeout: float = 5.0  # listener: a stream must name its target within this
    max_pending_streams: int = 64  # listener: streams per tunnel still without their header
    # listener: tunnels at once from peers that no --peer pin, --allow rule or known_peers
    # line names (any authenticated peer may connect, but not without bound)
    max_unvetted_tunnels: int = 64

    # UDP forwards (``/udp``): a flow is one local source address; it ends after this long
    # without a datagram either way, as conntrack's UDP entries do
    udp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    udp_flow_queue: int = DEFAULT_QUEUE  # datagrams a flow holds while its tunnel comes up
    udp_max_flows: int = DEFAULT_MAX_FLOWS  # per forward, and at the listener
    # SOCKS forwards (-D): username and password (RFC 1929) clients must give; "": none
    socks_username: str = ""
    socks_password: str = ""
