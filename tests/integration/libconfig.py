"""Settings for library tests on loopback: quick keepalives and timeouts, and a state
directory of its own for every Config (each agent its own key and known peers)."""

from __future__ import annotations

import tempfile

from natter import Config


def config(**kw: object) -> Config:
    base: dict[str, object] = dict(
        keepalive_interval=2.0, registration_ttl=6.0, connect_timeout=5.0, punch_timeout=3.0
    )
    base.update(kw)
    base.setdefault("state_dir", tempfile.mkdtemp(prefix="natter-state-"))
    return Config(**base)  # type: ignore[arg-type]
