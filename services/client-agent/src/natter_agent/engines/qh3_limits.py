"""qh3 with a stream limit of natter's choosing.

qh3 2.1 asks every peer for at most 100 bidirectional streams at once and has no setting
for it: the number is written twice, once in the transport parameters it sends
(``QuicTlsBridge.serialize_transport_parameters``) and once in the native core it builds
(``QuicConnection._create_core``). Here both functions are taken as they are and run with
one name in their globals swapped for a wrapper that puts natter's limit in (nothing of
qh3 is copied, and nobody else's qh3 changes). The core raises the limit again as the
peer's streams end, so the limit is on streams open at once.

If a qh3 release moves these values, the wrappers raise at the first connection (the
agent's warm-up handshake at start), loudly.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable
from typing import Any

from qh3._hazmat import QuicConnectionCore
from qh3.quic import connection as qh3_connection
from qh3.quic import tls_bridge as qh3_tls_bridge
from qh3.quic.packet import QuicTransportParameters, push_quic_transport_parameters

QH3_DEFAULT_STREAMS = 100  # what qh3 2.1 asks for, in both places
# where the core's constructor takes local_max_streams_bidi (from its text signature)
_CORE_INDEX = list(inspect.signature(QuicConnectionCore).parameters).index("local_max_streams_bidi")


def _with_globals(function: Callable[..., Any], **replacements: Any) -> Callable[..., Any]:
    """The same code with some of the names it looks up globally bound to something else."""
    scope = {**function.__globals__, **replacements}
    rebound = types.FunctionType(
        function.__code__, scope, function.__name__, function.__defaults__, function.__closure__
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    return rebound


def core_factory(max_streams: int) -> Callable[..., Any]:
    """``_create_core`` with ``QuicConnectionCore`` built with ``max_streams``."""
    index = _CORE_INDEX

    def build_core(*args: Any) -> QuicConnectionCore:
        values = list(args)
        if values[index] != QH3_DEFAULT_STREAMS:
            raise RuntimeError("this qh3 builds its core differently: natter cannot set its stream limit")
        values[index] = max_streams
        return QuicConnectionCore(*values)

    return _with_globals(qh3_connection.QuicConnection._create_core, QuicConnectionCore=build_core)


def tls_bridge_class(max_streams: int) -> type[qh3_tls_bridge.QuicTlsBridge]:
    """A ``QuicTlsBridge`` that announces ``max_streams`` in its transport parameters."""

    def push_with_limit(buf: Any, parameters: QuicTransportParameters) -> None:
        if parameters.initial_max_streams_bidi != QH3_DEFAULT_STREAMS:
            raise RuntimeError("this qh3 announces another stream limit: natter cannot set its own")
        push_quic_transport_parameters(
            buf, dataclasses.replace(parameters, initial_max_streams_bidi=max_streams)
        )

    serialize = _with_globals(
        qh3_tls_bridge.QuicTlsBridge.serialize_transport_parameters,
        push_quic_transport_parameters=push_with_limit,
    )
    methods = {"serialize_transport_parameters": serialize}
    return type("NatterTlsBridge", (qh3_tls_bridge.QuicTlsBridge,), methods)


def create_tls_factory(max_streams: int) -> Callable[..., Any]:
    """``_create_tls`` building the bridge above."""
    bridge = tls_bridge_class(max_streams)
    return _with_globals(qh3_connection.QuicConnection._create_tls, QuicTlsBridge=bridge)
