"""Registrations in Redis, shared by a fleet of stateless broker replicas.

Keys (all soft state, rebuilt by the next keepalives):
- ``natter:peer:{name}``  hash: public endpoint, local candidates, listening, last_seen,
  the replica that last heard it; its TTL is refreshed by every keepalive.
- ``natter:owner:{name}``  the key that registered a name first; it binds the name for
  ``OWNER_TTL`` after its last registration, across broker and Redis-replica restarts
  (with persistence enabled).
- ``natter:replica:{id}``  liveness of one replica, refreshed every few seconds; its value
  is the replica's relay mesh address (``-``: none).
- ``natter:req:{peer}:{request_id}``  the session id of one connect request (SET NX), so a
  retried request gets the same session whichever replica it lands on.
Channel ``natter:bus:{id}`` carries introductions to the replica that owns a peer.

Under Redis Cluster every key of one peer shares its slot (the ``{name}`` hash tag), so a
registration touches one slot; a batch of keepalives or registrations runs its script
once per slot among the batch's peers, all at once (one round trip, spread over the
masters). The bus is sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7): each replica
subscribes to its own channel only, on the master that owns the channel's slot.

Costs: a batch of keepalives is one round trip (one EVALSHA for the whole batch, or one
per slot on a cluster); a connect request is one pipelined round trip, plus one PUBLISH
when the target is on another replica, plus that replica's PUBLISH of the acknowledgement.
Every heartbeat also publishes an empty message to the replica's own channel: no
receiver means its subscription was lost (a slot moved, a node failed), and it subscribes
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import structlog
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from natter_proto import bus
from natter_proto.backoff import Backoff
from natter_proto.bus import BusMessage
from natter_proto.endpoints import AddressError, Endpoint, endpoint
from natter_proto.identity import fingerprint
from natter_proto.names import NAME_GRACE
from natter_proto.registry import PeerRecord

from .metrics import BrokerMetrics
from .redisclient import RedisClient, open_client
from .registry import BusHandler, ConnectFound, ConnectLookup

log = structlog.get_logger("natter.redis")

# Refresh every peer in KEYS whose stored endpoint is the one it was heard from now.
# ARGV: now, replica, ttl, then one endpoint per key. Returns one 0/1 per key.
TOUCH_LUA = """
local now, replica, ttl = ARGV[1], ARGV[2], ARGV[3]
local known = {}
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'public') == ARGV[i + 3] then
    redis.call('HSET', key, 'last_seen', now, 'replica', replica)
    redis.call('EXPIRE', key, ttl)
    known[i] = 1
  else
    known[i] = 0
  end
end
return known
"""

# Register a batch. Per record: KEYS peer, owner; ARGV key, public, locals, listening,
# last_seen, replica, nat (after the two globals: peer ttl, owner ttl). Returns per record ""
# when stored, or the owner's key when the name belongs to another key.
REGISTER_LUA = """
local ttl, owner_ttl = ARGV[1], ARGV[2]
local out = {}
for i = 1, #KEYS / 2 do
  local peer, owner_key = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 2 + (i - 1) * 7
  local key = ARGV[a + 1]
  local owner = redis.call('GET', owner_key)
  if owner and owner ~= key then
    out[i] = owner
  else
    redis.call('SET', owner_key, key, 'EX', owner_ttl)
    redis.call('DEL', peer)
    redis.call('HSET', peer, 'key', key, 'public', ARGV[a + 2], 'locals', ARGV[a + 3],
               'listening', ARGV[a + 4], 'last_seen', ARGV[a + 5], 'replica', ARGV[a + 6],
               'nat', ARGV[a + 7])
    redis.call('EXPIRE', peer, ttl)
    out[i] = ''
  end
end
return out
"""

OWNER_TTL = int(NAME_GRACE)  # as long as a lone broker keeps a released name for its key
REQUEST_TTL = 30
REPLICA_TTL = 10
HEARTBEAT = 3.0
REDELIVERY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)  # a live replica resubscribes within these


def peer_key(name: str) -> str:
    return f"natter:peer:{{{name}}}"


def replica_key(broker_id: str) -> str:
    return f"natter:replica:{broker_id}"


def bus_channel(broker_id: str) -> str:
    return f"natter:bus:{broker_id}"


def _public_text(public: Endpoint) -> str:
    return f"{public.host}|{public.port}"


def _record_args(record: PeerRecord) -> list[bytes | str]:
    return [
        record.public_key or b"",
        _public_text(record.public),
        bytes(msgpack.packb([[e.host, e.port] for e in record.locals])),
        "1" if record.listening else "0",
        repr(record.last_seen),
        record.broker_id,
        record.nat or "",
    ]


def _parse_record(name: str, raw: dict[bytes, bytes]) -> PeerRecord | None:
    """Rebuild a record from its hash; a damaged one counts as absent."""
    if not raw:
        return None
    try:
        host, port = raw[b"public"].decode().rsplit("|", 1)
        locals_raw = msgpack.unpackb(raw[b"locals"], max_array_len=32, max_str_len=64)
        return PeerRecord(
            name=name,
            public=endpoint(host, int(port)),
            locals=tuple(endpoint(str(h), int(p)) for h, p in locals_raw),
            listening=raw[b"listening"] == b"1",
            last_seen=float(raw[b"last_seen"]),
            broker_id=raw[b"replica"].decode(),
            public_key=raw.get(b"key") or None,
            nat=raw.get(b"nat", b"").decode() or None,
        )
    except (KeyError, ValueError, TypeError, AddressError, msgpack.ExtraData):
        return None


# one peer's keys and arguments in a batched script: (KEYS, per-peer ARGV)
BatchItem = tuple[list[str], list[bytes | str | int]]


class RedisRegistry:
    def __init__(self, url: str, *, forget_after: float, metrics: BrokerMetrics | None = None) -> None:
        self.url = url
        self.forget_after = int(max(1, forget_after))
        self.metrics = metrics or BrokerMetrics()
        self.redis: RedisClient | None = None  # found at start, or once Redis answers
        self._scripts: dict[str, str] = {}  # source -> sha, loaded on first use
        self._broker_id = ""
        self._handler: BusHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = False
        self._reachable = False
        self._lost_subscription = asyncio.Event()  # the heartbeat's probe found no subscriber
        self._heard_probe = False  # our own empty message came back: the subscription works
        self._mesh = "-"  # the relay mesh address announced with our liveness ("-": none)
        self.drop_incoming = 0  # fault injection for tests: lose this many bus messages

    # -- lifecycle ------------------------------------------------------------------
    async def start(self, broker_id: str, on_bus_message: BusHandler) -> None:
        self._broker_id = broker_id
        self._handler = on_bus_message
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeat()), loop.create_task(self._subscribe())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.client.delete(replica_key(self._broker_id))
            await self.redis.client.aclose()

    @property
    def client(self) -> Any:
        """The Redis client; until Redis first answered, every call fails as unreachable."""
        if self.redis is None:
            raise RedisConnectionError("Redis has not answered yet")
        return self.redis.client

    @property
    def kind(self) -> str:
        return self.redis.kind.value if self.redis is not None else "unknown"

    async def _discover(self) -> None:
        if self.redis is None:
            self.redis = await open_client(self.url)
            log.info("redis found", url=self._safe_url(), kind=self.redis.kind.value)

    def is_ready(self) -> bool:
        return self._reachable and self._subscribed and self._heard_probe

    async def _heartbeat(self) -> None:
        """Refresh this replica's liveness key; it doubles as the readiness probe of Redis."""
        while True:
            try:
                await self._discover()
                await self._timed(
                    "heartbeat",
                    self.client.set(replica_key(self._broker_id), self._mesh, ex=REPLICA_TTL),
                )
                if not self._reachable:
                    log.info("redis reachable", url=self._safe_url())
                self._reachable = True
                await self._probe_subscription()
            except (RedisError, OSError) as exc:
                if self._reachable:
                    log.warning("redis unreachable", url=self._safe_url(), error=str(exc))
                self._reachable = False
            await asyncio.sleep(HEARTBEAT if self._reachable else 1.0)

    async def _probe_subscription(self) -> None:
        """An empty message to our own channel: nobody receiving it means our subscription
        is gone without an error (its slot moved, its node was replaced)."""
        if self._subscribed and await self._publish_raw(bus_channel(self._broker_id), b"") == 0:
            self._lose_subscription("no subscriber on this replica's channel")

    def _lose_subscription(self, why: str) -> None:
        log.warning("redis subscription lost", error=why)
        self._subscribed = self._heard_probe = False
        self._lost_subscription.set()

    async def _subscribe(self) -> None:
        """Listen on this replica's channel, resubscribing with backoff after any failure."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        channel = bus_channel(self._broker_id)
        while True:
            pubsub: Any = None
            try:
                await self._discover()
                sharded = self.redis is not None and self.redis.cluster
                if sharded and self._lost_subscription.is_set():
                    await self.client.nodes_manager.initialize()  # where the channel's slot is now
                pubsub = self.client.pubsub()
                await (pubsub.ssubscribe(channel) if sharded else pubsub.subscribe(channel))
                receive = pubsub.get_sharded_message if sharded else pubsub.get_message
                self._lost_subscription.clear()
                self._subscribed = True
                await self._publish_raw(channel, b"")  # ready once it comes back
                backoff.reset()
                while not self._lost_subscription.is_set():
                    message = await receive(ignore_subscribe_messages=False, timeout=1.0)
                    kind = message.get("type") if message is not None else None
                    if kind in ("message", "smessage"):
                        await self._deliver(message.get("data"))
                    elif kind in ("unsubscribe", "sunsubscribe"):  # the slot left that node
                        self._lose_subscription("the channel's slot moved")
            except (RedisError, OSError) as exc:
                if self._subscribed:
                    log.warning("redis subscription lost", error=str(exc))
                self._subscribed = self._heard_probe = False
                self._lost_subscription.set()
                self.metrics.redis_errors.labels("subscribe").inc()
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            await asyncio.sleep(backoff.next_delay())

    async def _deliver(self, data: object) -> None:
        if not data:
            self._heard_probe = True  # the heartbeat's probe, or the one after subscribing
            return
        try:
            message = bus.decode(data)  # type: ignore[arg-type]
        except bus.BusError:
            self.metrics.redis_received.labels("invalid").inc()
            return
        if self.drop_incoming > 0:
            self.drop_incoming -= 1
            self.metrics.redis_received.labels("dropped_by_test").inc()
            return
        self.metrics.redis_received.labels(message.KIND).inc()
        if self._handler is not None:
            await self._handler(message)

    # -- registry ---------------------------------------------------------------------
    async def register(self, records: Sequence[PeerRecord]) -> list[str | None]:
        """Bind names to keys and store records, the whole batch in one EVALSHA."""
        items: list[BatchItem] = [
            ([peer_key(r.name), f"natter:owner:{{{r.name}}}"], list(_record_args(r))) for r in records
        ]
        results = await self._batched("register", REGISTER_LUA, [self.forget_after, OWNER_TTL], items)
        return [fingerprint(bytes(r)) if r else None for r in results]

    async def touch(
        self, items: Sequence[tuple[str, Endpoint]], now: float, broker_id: str
    ) -> list[bool | None]:
        """One EVALSHA for the whole batch of keepalives (one per slot on a cluster): one
        round trip. A slot whose master is failing over answers None for its peers, and
        the rest of the batch is answered."""
        batch: list[BatchItem] = [([peer_key(name)], [_public_text(public)]) for name, public in items]
        fixed: list[bytes | str | int] = [repr(now), broker_id, self.forget_after]
        results = await self._batched("keepalive", TOUCH_LUA, fixed, batch, partial=True)
        return [None if r is None else bool(r) for r in results]

    async def _batched(
        self,
        op: str,
        source: str,
        fixed: list[bytes | str | int],
        items: Sequence[BatchItem],
        *,
        partial: bool = False,
    ) -> list[Any]:
        """Run a batch script over items (each its KEYS and ARGV after ``fixed``), once, or
        on a cluster once per slot among them, all at once; results in the items' order.
        With ``partial``, a group that fails gives None for its items (the others stand);
        without, the failure is raised."""
        if self.redis is None or not self.redis.cluster:
            keys = [key for item_keys, _ in items for key in item_keys]
            args = fixed + [arg for _, item_args in items for arg in item_args]
            try:
                return list(await self._script(op, source, keys, args))
            except (RedisError, OSError):
                if not partial:
                    raise
                return [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (item_keys, _) in enumerate(items):
            groups.setdefault(key_slot(item_keys[0].encode()), []).append(i)
        return await self._per_slot(op, source, fixed, items, list(groups.values()), partial)

    async def _per_slot(
        self,
        op: str,
        source: str,
        fixed: list[bytes | str | int],
        items: Sequence[BatchItem],
        groups: list[list[int]],
        partial: bool,
    ) -> list[Any]:
        """A cluster's batch: one EVALSHA per slot, all in one pipeline (one round trip and
        one connection per master). redis-py refuses ``pipe.evalsha`` on a cluster because
        it cannot know a script's keys share a slot; ours do (one group, one slot), so the
        command goes in by name. (One call per slot at once, as asyncio tasks, costs three
        times the CPU and runs out of connections in a registration storm.)"""
        results: list[Any] = []
        for attempt in (1, 2):
            sha = await self._sha(source)
            pipe = self.client.pipeline(transaction=False)
            for group in groups:
                keys = [key for i in group for key in items[i][0]]
                args = fixed + [arg for i in group for arg in items[i][1]]
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            results = await self._timed(op, pipe.execute(raise_on_error=False))
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                self._scripts.clear()  # a promoted replica without our scripts: load them again
                continue
            break
        out: list[Any] = [None] * len(items)
        for group, result in zip(groups, results, strict=True):
            if isinstance(result, Exception):
                if not partial or not isinstance(result, RedisError | OSError):
                    raise result
                self.metrics.redis_errors.labels(op).inc()
                continue  # these items stay None
            for i, value in zip(group, result, strict=True):
                out[i] = value
        return out

    async def _sha(self, source: str) -> str:
        sha = self._scripts.get(source)
        if sha is None:
            sha = str(await self._timed("script_load", self.client.script_load(source)))
            self._scripts[source] = sha
        return sha

    async def _script(self, op: str, source: str, keys: list[str], args: list[bytes | str | int]) -> Any:
        for attempt in (1, 2):
            sha = await self._sha(source)
            try:
                return await self._timed(op, self.client.evalsha(sha, len(keys), *keys, *args))
            except NoScriptError:
                self._scripts.clear()  # Redis restarted and forgot its scripts: load them again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def lookup_connects(self, requests: Sequence[ConnectLookup], now: float) -> list[ConnectFound]:
        """Both records and a session claim (SET NX GET) per request, all in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for peer_from, peer_to, request_id, candidate in requests:
            pipe.hgetall(peer_key(peer_from))
            pipe.hgetall(peer_key(peer_to))
            pipe.set(f"natter:req:{{{peer_from}}}:{request_id}", candidate, nx=True, get=True, ex=REQUEST_TTL)
        replies = await self._timed("connect", pipe.execute())
        found: list[ConnectFound] = []
        for i, (peer_from, peer_to, _, candidate) in enumerate(requests):
            raw_from, raw_to, previous = replies[3 * i : 3 * i + 3]
            session = previous.decode() if isinstance(previous, bytes) else candidate
            found.append((_parse_record(peer_from, raw_from), _parse_record(peer_to, raw_to), session))
        return found

    async def expire(self, now: float) -> list[str]:
        return []  # Redis expires peer keys by their TTL

    async def publish(self, broker_id: str, message: BusMessage) -> int:
        """Publish to a replica's channel. Nobody receiving it while the replica's liveness
        key says it runs means it is between subscriptions (its channel's slot moved, a
        master failed over): published again for up to 1.5 s before it counts as gone."""
        channel, data = bus_channel(broker_id), bus.encode(message)
        receivers = await self._publish_raw(channel, data)
        self.metrics.redis_published.inc()
        if receivers == 0 and await self._timed("replica_alive", self.client.exists(replica_key(broker_id))):
            for delay in REDELIVERY_DELAYS:
                await asyncio.sleep(delay)
                receivers = await self._publish_raw(channel, data)
                if receivers:
                    break
            self.metrics.redis_redelivered.labels("healed" if receivers else "lost").inc()
        if receivers == 0:
            self.metrics.redis_no_receiver.inc()
        return receivers

    def announce_mesh(self, address: str) -> None:
        self._mesh = address  # the next heartbeat says it

    async def mesh_address(self, broker_id: str) -> str | None:
        raw = await self._timed("mesh_address", self.client.get(replica_key(broker_id)))
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else ""
        return text if ":" in text else None  # older replicas store a time here

    async def _publish_raw(self, channel: str, data: bytes) -> int:
        """PUBLISH, or SPUBLISH on a cluster (to the master owning the channel's slot)."""
        sharded = self.redis is not None and self.redis.cluster
        send = self.client.spublish if sharded else self.client.publish
        return int(await self._timed("publish", send(channel, data)))

    # -- helpers ----------------------------------------------------------------------
    async def _timed(self, op: str, awaitable: Any) -> Any:
        start = time.perf_counter()
        try:
            result = await awaitable
        except (RedisError, OSError):
            self.metrics.redis_errors.labels(op).inc()
            raise
        self.metrics.redis_latency.labels(op).observe(time.perf_counter() - start)
        return result

    def _safe_url(self) -> str:
        """The URL without a password, for logs."""
        if "@" in self.url:
            scheme, rest = self.url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return self.url
