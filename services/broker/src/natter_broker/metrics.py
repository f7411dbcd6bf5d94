"""The broker's Prometheus metrics, one registry per broker (several may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class BrokerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.registrations = Counter("natter_broker_registrations", "Register frames accepted", registry=r)
        self.keepalives = Counter(
            "natter_broker_keepalives", "Keepalive frames by result", ["result"], registry=r
        )
        self.active_peers = Gauge(
            "natter_broker_active_peers",
            "Agents this broker heard within the registration TTL",
            registry=r,
        )
        self.connects = Counter(
            "natter_broker_connect_requests", "Connect requests by outcome", ["outcome"], registry=r
        )
        self.punches = Counter(
            "natter_broker_punch_instructions", "Punch instructions sent to agents", registry=r
        )
        self.dropped = Counter(
            "natter_broker_frames_dropped", "Frames dropped, by reason", ["reason"], registry=r
        )
        self.accepted = Counter(
            "natter_broker_frames_accepted", "Frames that passed validation and rate limits", registry=r
        )
        self.refused = Counter(
            "natter_broker_registrations_refused", "Registrations refused, by code", ["code"], registry=r
        )
        self.probes = Counter(
            "natter_broker_mapping_probes", "Mapping queries answered on the probe port", registry=r
        )
        self.relayed_bytes = Counter(
            "natter_broker_relayed_bytes", "Payload bytes relayed between peers", registry=r
        )
        self.goaways = Counter("natter_broker_goaways", "Goaway frames sent at shutdown", registry=r)
        self.redis_published = Counter(
            "natter_broker_redis_published", "Messages published to other replicas", registry=r
        )
        self.redis_received = Counter(
            "natter_broker_redis_received",
            "Messages received from other replicas",
            ["kind"],
            registry=r,
        )
        self.redis_no_receiver = Counter(
            "natter_broker_redis_no_receiver", "Publishes that reached no replica", registry=r
        )
        self.mesh_packets = Counter(
            "natter_broker_mesh_packets",
            "Relayed packets sent to or received from other replicas over the mesh",
            ["direction"],
            registry=r,
        )
        self.redis_redelivered = Counter(
            "natter_broker_redis_redelivered",
            "Publishes that found a live replica between subscriptions and were sent again: healed or lost",
            ["outcome"],
            registry=r,
        )
        self.redis_errors = Counter(
            "natter_broker_redis_errors", "Redis operations that failed", ["op"], registry=r
        )
        self.redis_latency = Histogram(
            "natter_broker_redis_latency_seconds",
            "Redis round-trip latency by operation",
            ["op"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.ready = Gauge("natter_broker_ready", "1 when the broker can serve", registry=r)
        self.tcp_connections = Gauge(
            "natter_broker_tcp_connections", "Agents' TCP (TLS, WebSocket) connections open", registry=r
        )
        self.tcp_closed = Counter(
            "natter_broker_tcp_closed",
            "TCP connections refused or closed, by reason",
            ["reason"],
            registry=r,
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def sample(self, name: str, **labels: str) -> float:
        """Current value of one sample (for tests and status output); 0 if absent."""
        value = self.registry.get_sample_value(name, labels)
        return float(value) if value is not None else 0.0

    def dropped_total(self) -> float:
        total = 0.0
        for metric in self.registry.collect():
            if metric.name == "natter_broker_frames_dropped":
                total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        return total
