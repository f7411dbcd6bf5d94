"""Writes natter-dashboard.json (Grafana, Prometheus data source) from the panels below.

    .venv/bin/python deploy/grafana/build_dashboard.py

The JSON is checked in; a test checks that every metric it names is one a running broker
or agent exports.
"""

from __future__ import annotations

import json
from pathlib import Path

REDIS_BUCKETS = "sum by (le, op) (rate(natter_broker_redis_latency_seconds_bucket[5m]))"

PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    # (title, unit, [(expr, legend)], kind)
    (
        "Replicas ready",
        "none",
        [("sum(natter_broker_ready)", "ready"), ("count(natter_broker_ready)", "replicas")],
        "stat",
    ),
    (
        "Agents registered",
        "none",
        [("sum by (instance) (natter_broker_active_peers)", "{{instance}}")],
        "timeseries",
    ),
    (
        "Keepalives /s",
        "ops",
        [("sum by (result) (rate(natter_broker_keepalives_total[5m]))", "{{result}}")],
        "timeseries",
    ),
    (
        "Registrations /s and refusals by code",
        "ops",
        [
            ("sum(rate(natter_broker_registrations_total[5m]))", "accepted"),
            ("sum by (code) (rate(natter_broker_registrations_refused_total[5m]))", "refused {{code}}"),
        ],
        "timeseries",
    ),
    (
        "Connect requests by outcome",
        "ops",
        [("sum by (outcome) (rate(natter_broker_connect_requests_total[5m]))", "{{outcome}}")],
        "timeseries",
    ),
    (
        "Frames dropped by reason",
        "ops",
        [("sum by (reason) (rate(natter_broker_frames_dropped_total[5m]))", "{{reason}}")],
        "timeseries",
    ),
    (
        "Relayed bytes /s",
        "Bps",
        [("sum by (instance) (rate(natter_broker_relayed_bytes_total[5m]))", "{{instance}}")],
        "timeseries",
    ),
    (
        "Redis p50 / p99 latency",
        "s",
        [
            (
                f"histogram_quantile(0.5, {REDIS_BUCKETS})",
                "p50 {{op}}",
            ),
            (
                f"histogram_quantile(0.99, {REDIS_BUCKETS})",
                "p99 {{op}}",
            ),
        ],
        "timeseries",
    ),
    (
        "Redis errors and deliveries to no one",
        "ops",
        [
            ("sum by (op) (rate(natter_broker_redis_errors_total[5m]))", "error {{op}}"),
            ("sum(rate(natter_broker_redis_no_receiver_total[5m]))", "published to no replica"),
            ("sum by (kind) (rate(natter_broker_redis_received_total[5m]))", "received {{kind}}"),
        ],
        "timeseries",
    ),
    (
        "Agents on TCP (TLS, WebSocket)",
        "none",
        [
            ("sum(natter_broker_tcp_connections)", "open"),
            ("sum by (reason) (rate(natter_broker_tcp_closed_total[5m]))", "closed {{reason}}"),
        ],
        "timeseries",
    ),
    (
        "Agent tunnels and RTT",
        "s",
        [
            ("natter_agent_tunnel_rtt_seconds", "{{instance}} -> {{peer}} ({{path}})"),
        ],
        "timeseries",
    ),
    (
        "Agent tunnel throughput",
        "Bps",
        [
            ("sum by (instance) (rate(natter_agent_tunnel_sent_bytes_total[5m]))", "{{instance}} sent"),
            (
                "sum by (instance) (rate(natter_agent_tunnel_received_bytes_total[5m]))",
                "{{instance}} received",
            ),
        ],
        "timeseries",
    ),
    (
        "Agent datagrams and streams refused",
        "ops",
        [
            ("sum by (outcome) (rate(natter_agent_datagrams_total[5m]))", "{{outcome}}"),
            (
                "sum by (side, reason) (rate(natter_agent_streams_refused_total[5m]))",
                "refused {{side}} {{reason}}",
            ),
        ],
        "timeseries",
    ),
    (
        "UDP forwards: flows, datagrams, drops",
        "ops",
        [
            ("sum by (instance) (natter_agent_udp_flows)", "{{instance}} flows"),
            ("sum by (direction) (rate(natter_agent_udp_datagrams_total[5m]))", "datagrams {{direction}}"),
            ("sum by (reason) (rate(natter_agent_udp_dropped_total[5m]))", "dropped {{reason}}"),
        ],
        "timeseries",
    ),
    ("Live tunnels per agent", "none", [("natter_agent_tunnels", "{{instance}}")], "timeseries"),
]


def dashboard() -> dict[str, object]:
    panels = []
    for i, (title, unit, targets, kind) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": kind,
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend}
                    for n, (expr, legend) in enumerate(targets)
                ],
            }
        )
    return {
        "title": "natter",
        "uid": "natter-fleet",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "tags": ["natter"],
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("natter-dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
