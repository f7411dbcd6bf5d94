"""The start-up handshake each agent runs in memory: it completes with both engines."""

from __future__ import annotations

import pytest

from natter_agent.engines import TunnelConnection, make_engine, warm_up
from natter_agent.tls import credentials_for
from natter_proto.identity import Identity


@pytest.mark.parametrize("name", ["aioquic", "qh3"])
def test_warm_up_completes_a_handshake(name: str) -> None:
    engine = make_engine(name, credentials=credentials_for(Identity.generate(), "warm"))
    made: list[TunnelConnection] = []
    original = engine.client_connection

    def recording() -> TunnelConnection:
        made.append(original())
        return made[-1]

    engine.client_connection = recording  # type: ignore[method-assign]
    warm_up(engine)
    assert len(made) == 1 and made[0].handshake_confirmed()
