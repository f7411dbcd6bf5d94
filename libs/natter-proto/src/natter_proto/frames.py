"""Control frames: one prefix byte, then a msgpack map that names its version and type.

The prefix byte is below 0x40, so a frame is never mistaken for QUIC (whose first byte
always has bit 0x40 set) and above 0x03, so it is never a STUN message (RFC 7983/9443).
Every field of every message is type- and size-checked on the way in; the decoder raises
nothing but ``FrameError``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, ClassVar, Union

import msgpack

from .endpoints import AddressError, Endpoint, endpoint

PREFIX = 0x1E
VERSION = 1
MAX_FRAME_SIZE = 1200
MAX_NAME_LEN = 64
MAX_TEXT_LEN = 512
MAX_ID_LEN = 64
MAX_BYTES_LEN = 256
MAX_ENDPOINTS = 16

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class FrameError(ValueError):
    """A datagram is not a valid natter frame. ``code`` says why, ``reason`` says it in words."""

    def __init__(self, code: str, reason: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.request_id = request_id


def is_control_datagram(data: bytes) -> bool:
    """True when the first byte says "natter frame" rather than QUIC (RFC 9443 demultiplexing)."""
    return bool(data) and data[0] < 0x40


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name))


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of all frames; subclasses set TYPE and declare typed fields."""

    TYPE: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class Register(Message):
    """Agent -> broker: I am NAME; these are my own interface endpoints."""

    TYPE: ClassVar[str] = "register"
    name: str
    locals: tuple[Endpoint, ...] = ()
    listening: bool = False
    public_key: bytes | None = None  # Ed25519; the first key to register a name owns it
    cookie: bytes | None = None  # the broker's address-validation cookie
    token: str | None = None  # for brokers that restrict who may register
    nat: str | None = None  # "easy" / "hard" / "unknown": how the agent's NAT maps (natmap.py)
    signature: bytes | None = None  # by public_key over all other fields (identity.py)


@dataclasses.dataclass(frozen=True)
class Registered(Message):
    """Broker -> agent: you are registered; this is the endpoint I saw you at."""

    TYPE: ClassVar[str] = "registered"
    name: str
    public: Endpoint
    keepalive_s: int
    broker_id: str
    listening: bool | None = None  # echoes a Register (absent in keepalive answers)
    cookie: bytes | None = None  # a fresh address-validation cookie for the next frames
    probe_port: int | None = None  # where to ask for a second view of our mapping


@dataclasses.dataclass(frozen=True)
class Keepalive(Message):
    """Agent -> broker: still here (and keep my NAT mapping to the broker open)."""

    TYPE: ClassVar[str] = "keepalive"
    name: str
    cookie: bytes | None = None


@dataclasses.dataclass(frozen=True)
class ConnectRequest(Message):
    """Agent -> broker: introduce me to peer_to; I will tunnel to target on its side."""

    TYPE: ClassVar[str] = "connect"
    request_id: str
    peer_from: str
    peer_to: str
    target: str
    cookie: bytes | None = None


@dataclasses.dataclass(frozen=True)
class ConnectOffer(Message):
    """Broker -> target agent: peer_from asks for a tunnel (sent together with Punch)."""

    TYPE: ClassVar[str] = "offer"
    request_id: str
    session_id: str
    peer_from: str
    target: str


@dataclasses.dataclass(frozen=True)
class Punch(Message):
    """Broker -> both agents at once: probe these endpoints of your peer now."""

    TYPE: ClassVar[str] = "punch"
    request_id: str
    session_id: str
    peer: str
    peer_public: Endpoint
    peer_locals: tuple[Endpoint, ...]
    role: str  # "client" (opens QUIC) or "server" (accepts it)
    delay_ms: int = 0
    peer_key: bytes | None = None  # the key the broker vouches for; QUIC must present it
    peer_nat: str | None = None  # how the peer's NAT maps, as it reported
    relay: bool = False  # the broker will relay this session if no direct path answers


@dataclasses.dataclass(frozen=True)
class Error(Message):
    """Either direction: a request failed; ``code`` is for programs, ``message`` for people."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    request_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Probe(Message):
    """Agent -> peer candidate endpoint: a hole-punch probe."""

    TYPE: ClassVar[str] = "probe"
    session_id: str
    sender: str
    nonce: int


@dataclasses.dataclass(frozen=True)
class ProbeAck(Message):
    """Peer -> agent: your probe arrived; this is where it came from."""

    TYPE: ClassVar[str] = "probe_ack"
    session_id: str
    sender: str
    nonce: int
    observed: Endpoint


@dataclasses.dataclass(frozen=True)
class NoTunnel(Message):
    """Listener -> agent, once per punch session: I have no tunnel with you (I restarted).
    An agent whose tunnel has gone quiet builds a new one at once instead of waiting for
    pings that can never be answered. Agents before it drop the unknown type."""

    TYPE: ClassVar[str] = "no_tunnel"
    session_id: str
    sender: str


@dataclasses.dataclass(frozen=True)
class MappingQuery(Message):
    """Agent -> the broker's probe port: where do you see me? Padded, so that the answer is
    never larger than the question."""

    TYPE: ClassVar[str] = "mapping_query"
    pad: bytes = b""


@dataclasses.dataclass(frozen=True)
class MappingReply(Message):
    """Broker probe port -> agent: this is the endpoint I saw you at."""

    TYPE: ClassVar[str] = "mapping_reply"
    observed: Endpoint


@dataclasses.dataclass(frozen=True)
class Challenge(Message):
    """Broker -> unvalidated source: echo this cookie to prove you receive at that address."""

    TYPE: ClassVar[str] = "challenge"
    cookie: bytes


@dataclasses.dataclass(frozen=True)
class Goaway(Message):
    """Broker -> agent: this broker is shutting down; register with another one now."""

    TYPE: ClassVar[str] = "goaway"
    reason: str


class ErrorCode:
    """The error codes natter sends; the text beside each is for humans and may change."""

    BAD_FRAME = "bad_frame"
    VERSION_MISMATCH = "version_mismatch"
    UNKNOWN_TYPE = "unknown_type"
    NOT_REGISTERED = "not_registered"
    UNKNOWN_PEER = "unknown_peer"
    PEER_OFFLINE = "peer_offline"
    NOT_LISTENING = "not_listening"
    SELF_CONNECT = "self_connect"
    PEER_UNREACHABLE = "peer_unreachable"  # known, but its broker replica is gone
    NAME_TAKEN = "name_taken"  # the name is bound to another key
    BAD_SIGNATURE = "bad_signature"
    NOT_AUTHORIZED = "not_authorized"  # the broker's token list does not admit this agent
    RATE_LIMITED = "rate_limited"


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        Registered,
        Keepalive,
        ConnectRequest,
        ConnectOffer,
        Punch,
        Error,
        Probe,
        ProbeAck,
        NoTunnel,
        Goaway,
        Challenge,
        MappingQuery,
        MappingReply,
    )
}


def encode(message: Message) -> bytes:
    """Serialise a message to a datagram."""
    body: dict[str, Any] = {"v": VERSION, "t": message.TYPE}
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        if value is None:
            continue
        body[field.name] = _to_wire(value)
    data = bytes([PREFIX]) + bytes(msgpack.packb(body, use_bin_type=True))
    if len(data) > MAX_FRAME_SIZE:
        raise FrameError("too_large", f"{message.TYPE} frame is {len(data)} bytes")
    return data


def _to_wire(value: Any) -> Any:
    if isinstance(value, Endpoint):
        return [value.host, value.port]
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def decode(data: bytes) -> Message:
    """Parse and validate one datagram; raise FrameError for anything malformed."""
    if len(data) > MAX_FRAME_SIZE:
        raise FrameError(ErrorCode.BAD_FRAME, f"frame of {len(data)} bytes exceeds {MAX_FRAME_SIZE}")
    if not data or data[0] != PREFIX:
        raise FrameError(ErrorCode.BAD_FRAME, "not a natter frame (bad prefix byte)")
    try:
        body = msgpack.unpackb(
            data[1:],
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_TEXT_LEN,
            max_bin_len=MAX_BYTES_LEN,
            max_array_len=MAX_ENDPOINTS,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types; none may escape
        raise FrameError(ErrorCode.BAD_FRAME, f"undecodable msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise FrameError(ErrorCode.BAD_FRAME, "frame body is not a map")
    request_id = body.get("request_id") if isinstance(body.get("request_id"), str) else None
    version = body.get("v")
    if version != VERSION:
        raise FrameError(
            ErrorCode.VERSION_MISMATCH,
            f"protocol version {version!r} is not supported (this side speaks {VERSION})",
            request_id,
        )
    kind = body.get("t")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FrameError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind!r}", request_id)
    return _build(cls, body, request_id)


def _build(cls: type[Message], body: dict[str, Any], request_id: str | None) -> Message:
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)} | {"v", "t"}
    extra = set(body) - known
    if extra:
        names = sorted(repr(key)[:40] for key in extra)  # keys may mix str and bytes: no crash
        raise FrameError(ErrorCode.BAD_FRAME, f"{cls.TYPE}: unknown fields {names[:8]}", request_id)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in body:
            if field.default is dataclasses.MISSING:
                raise FrameError(ErrorCode.BAD_FRAME, f"{cls.TYPE}: missing field {field.name!r}", request_id)
            continue
        try:
            kwargs[field.name] = _check(hints[field.name], body[field.name], field.name)
        except (TypeError, ValueError, AddressError) as exc:
            raise FrameError(ErrorCode.BAD_FRAME, f"{cls.TYPE}: {exc}", request_id) from None
    return cls(**kwargs)


_TYPE_CACHE: dict[type[Message], dict[str, Any]] = {}


def _field_types(cls: type[Message]) -> dict[str, Any]:
    if cls not in _TYPE_CACHE:
        _TYPE_CACHE[cls] = typing.get_type_hints(cls)
    return _TYPE_CACHE[cls]


def _check(expected: Any, value: Any, name: str) -> Any:
    """Check one wire value against a field annotation and convert it to the Python form."""
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(expected) if a is not type(None)]
        if value is None:
            return None
        return _check(options[0], value, name)
    if expected is Endpoint:
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
            raise TypeError(f"{name} must be [ip, port]")
        if isinstance(value[1], bool) or not isinstance(value[1], int):
            raise TypeError(f"{name} port must be an integer")
        return endpoint(value[0], value[1])
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"{name} must be a list")
        (item,) = typing.get_args(expected)[:1]
        return tuple(_check(item, v, name) for v in value)
    if expected is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a boolean")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer")
        if not 0 <= value < 2**63:
            raise ValueError(f"{name} out of range")
        return value
    if expected is bytes:
        if not isinstance(value, bytes):
            raise TypeError(f"{name} must be bytes")
        size = _BYTES_SIZES.get(name)
        if size is not None and len(value) != size:
            raise ValueError(f"{name} must be {size} bytes")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string")
        return _check_text(name, value)
    raise TypeError(f"{name}: unsupported field type")  # pragma: no cover - schema bug


NAT_KINDS = ("easy", "hard", "unknown")
_NAME_FIELDS = {"name", "peer_from", "peer_to", "peer", "sender"}
_BYTES_SIZES = {"public_key": 32, "peer_key": 32, "signature": 64, "cookie": 20}
_ID_FIELDS = {"request_id", "session_id", "broker_id"}


def _check_text(name: str, value: str) -> str:
    if name in _NAME_FIELDS and not valid_name(value):
        raise ValueError(f"{name} {value!r} is not a valid peer name")
    if name in _ID_FIELDS and not 0 < len(value) <= MAX_ID_LEN:
        raise ValueError(f"{name} must be 1-{MAX_ID_LEN} characters")
    if name == "token" and not 0 < len(value) <= 128:
        raise ValueError("token must be 1-128 characters")
    if name in ("nat", "peer_nat") and value not in NAT_KINDS:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(NAT_KINDS)}")
    if name == "role" and value not in ("client", "server"):
        raise ValueError(f"role {value!r} is not client or server")
    if "\x00" in value:
        raise ValueError(f"{name} contains NUL")
    return value
