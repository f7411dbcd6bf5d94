"""The Python side of libnatter, the C API (see lib/natter.h and docs/c-api.md).

C calls arrive on any thread. Each becomes a coroutine on one asyncio loop that runs in a
background thread for the life of the process; the calling thread waits for its result.
Brokers, clients and forwards are named by integer handles, so a stale or doubled close
is an error code, never a use-after-free. Errors never raise into C: every entry point
returns 0 or a negative code and leaves a message for ``natter_last_error``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from natter_agent import Client, ForwardKind, ForwardRequest, NatterError
from natter_agent.forwards import AnyForward
from natter_broker import Broker
from natter_proto import AddressError, Config
from natter_proto.config import DEFAULT_ENGINE

from . import __version__, logs

OK = 0
E_INVALID = -1  # bad argument: NULL, malformed address or name
E_HANDLE = -2  # unknown or already closed handle
E_FAILED = -3  # the operation failed (port taken, broker unreachable, ...)
E_TIMEOUT = -4

CALL_TIMEOUT = 30.0


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Runtime:
    """One event loop thread and the table of live objects."""

    def __init__(self) -> None:
        level = os.environ.get("NATTER_LOG_LEVEL", "warning")
        logs.configure("console", level if level in logs.LEVELS else "warning")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="natter-loop", daemon=True)
        self.thread.start()
        self.lock = threading.Lock()
        self.next_handle = 1
        self.objects: dict[int, Any] = {}
        self.errors = threading.local()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = CALL_TIMEOUT) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise ApiError(E_TIMEOUT, f"timed out after {timeout:g} s") from None

    def add(self, obj: Any) -> int:
        with self.lock:
            handle = self.next_handle
            self.next_handle += 1
            self.objects[handle] = obj
            return handle

    def get(self, handle: int, kind: type | tuple[type, ...]) -> Any:
        with self.lock:
            obj = self.objects.get(handle)
        if not isinstance(obj, kind):
            raise ApiError(E_HANDLE, f"{handle} is not an open {_kind_name(kind)} handle")
        return obj

    def take(self, handle: int, kind: type | tuple[type, ...]) -> Any:
        with self.lock:
            obj = self.objects.get(handle)
            if not isinstance(obj, kind):
                raise ApiError(E_HANDLE, f"{handle} is not an open {_kind_name(kind)} handle")
            del self.objects[handle]
            return obj

    def fail(self, code: int, message: str) -> int:
        self.errors.message = message
        return code

    def last_error(self) -> str:
        return str(getattr(self.errors, "message", ""))


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime()
        return _runtime


def guarded(work: Any) -> int:
    """Run one API call: 0 or a handle on success, a negative code (and a message) on error."""
    rt = runtime()
    try:
        result = work(rt)
    except ApiError as exc:
        return rt.fail(exc.code, str(exc))
    except (AddressError, NatterError, ValueError) as exc:
        return rt.fail(E_INVALID if isinstance(exc, AddressError | ValueError) else E_FAILED, str(exc))
    except Exception as exc:  # nothing may escape into C
        return rt.fail(E_FAILED, f"{type(exc).__name__}: {exc}")
    rt.errors.message = ""
    return int(result or 0)


def text(value: str | None, what: str) -> str:
    if value is None:
        raise ApiError(E_INVALID, f"{what} is NULL")
    return value


# -- the API, one function per C entry point -----------------------------------------------
def broker_listen(addr: str | None) -> int:
    def work(rt: Runtime) -> int:
        broker = Broker(Config(broker_addr=text(addr, "listen address")))
        rt.call(broker.start())
        return rt.add(broker)

    return guarded(work)


def broker_port(handle: int) -> int:
    def work(rt: Runtime) -> int:
        broker = rt.get(handle, Broker)
        return int(broker.address.port) if broker.address else 0

    return guarded(work)


def broker_close(handle: int) -> int:
    return guarded(lambda rt: rt.call(rt.take(handle, Broker).close()))


def client_new(name: str | None, broker_addr: str | None, state_dir: str | None) -> int:
    def work(rt: Runtime) -> int:
        config = Config(
            client_user=text(name, "name"),
            broker_addr=text(broker_addr, "broker address"),
            state_dir=state_dir or "",
            quic_engine=os.environ.get("NATTER_QUIC_ENGINE") or DEFAULT_ENGINE,
        )

        async def create() -> Client:
            client = Client(config)
            await client.start()
            return client

        return rt.add(rt.call(create()))

    return guarded(work)


def client_listen(handle: int) -> int:
    return guarded(lambda rt: rt.call(rt.get(handle, Client).listen()))


FORWARD_TYPES = AnyForward.__args__  # the union as a tuple, for isinstance


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return "forward" if isinstance(kind, tuple) else kind.__name__.lower()


def forward_request(local: str, peer: str, remote: str) -> ForwardRequest:
    """The C library's remote forms: HOST:PORT (TCP), HOST:PORT/udp, or "socks"."""
    if remote == "socks":
        return ForwardRequest(local, peer, kind=ForwardKind.SOCKS)
    if remote.endswith("/udp"):
        return ForwardRequest(local, peer, remote.removesuffix("/udp"), ForwardKind.UDP)
    return ForwardRequest(local, peer, remote.removesuffix("/tcp"))


def client_forward(handle: int, local: str | None, peer: str | None, remote: str | None) -> int:
    def work(rt: Runtime) -> int:
        client = rt.get(handle, Client)
        request = forward_request(text(local, "local address"), text(peer, "peer"), text(remote, "remote"))
        (forward,) = rt.call(client.forward_all([request]))
        return rt.add(forward)

    return guarded(work)


def client_connect(handle: int, peer: str | None, timeout: float) -> int:
    """Wait until the tunnel to peer is up (or fail with the reason)."""

    def work(rt: Runtime) -> None:
        client = rt.get(handle, Client)
        rt.call(asyncio.wait_for(client.connect(text(peer, "peer")), timeout), timeout + 5)

    return guarded(work)


def forward_port(handle: int) -> int:
    def work(rt: Runtime) -> int:
        forward = rt.get(handle, FORWARD_TYPES)
        return int(forward.local.port) if forward.local else 0

    return guarded(work)


def forward_close(handle: int) -> int:
    return guarded(lambda rt: rt.call(rt.take(handle, FORWARD_TYPES).close()))


def client_close(handle: int) -> int:
    return guarded(lambda rt: rt.call(rt.take(handle, Client).close()))


def last_error() -> str:
    return runtime().last_error()


def version() -> str:
    return __version__
