"""The agent protocol's knobs, each default written once (``Config`` takes them from here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AgentSettings:
    # registration with the broker
    keepalive_interval: float = 20.0
    register_timeout: float = 10.0
    # the broker's UDP unanswered this long: open the TCP stream too (happy eyeballs), and
    # register over whichever answers first; a stream that fails is tried again with backoff
    stream_after: float = 0.5
    # registering and no answer yet this long: also register with a broker address of the
    # other family (IPv4 / IPv6, RFC 8305's connection attempt delay); the first to answer wins
    family_race_after: float = 0.25
    stream_retry_max: float = 30.0
    udp_recheck_interval: float = 30.0  # registered over TCP: does the broker's UDP answer now?
    # introduction and hole punching
    connect_timeout: float = 10.0
    punch_interval: float = 0.075
    punch_timeout: float = 5.0
    handshake_timeout: float = 8.0
    nat_probe_wait: float = 3.0  # how long a first connect waits for our NAT type
    # a new tunnel's punch has this long to answer before its QUIC handshake starts on the
    # relay (where the broker offers one); the punch goes on, and a direct path that answers
    # later takes the tunnel over (a working punch answers in a round trip or two; 0: at once)
    relay_head_start: float = 0.2
    # against a symmetric NAT (birthday method): sockets on the hard side, probes on the easy
    hard_nat_sockets: int = 256
    spray_probes: int = 2048  # 255 mappings x 2048 probes: about 99.97% (1024: 98%)
    # while relayed, punch again this often; a direct path takes over (0: never)
    upgrade_interval: float = 45.0
    # a tunnel whose pings go unanswered this long asks the broker where it sees us; this
    # long, its client punches again and falls back to the relay if nothing answers
    path_silence: float = 2.0
    path_dead: float = 4.0
    # pings: this often while the tunnel moves bytes, ping_interval while idle (NAT mappings)
    repair_attempts: int = 4  # re-punches of a dead tunnel with no relay, before it is closed
    path_check_interval: float = 1.0
    ping_interval: float = 15.0
    idle_check_floor: float = 0.3  # an idle tunnel's check when a connection starts: 4 RTT, at least this
    path_settle: float = 1.0  # datagrams on a path left less than this ago are stragglers
    endpoint_check_interval: float = 5.0  # at most one "where do you see us" this often


DEFAULTS = AgentSettings()
