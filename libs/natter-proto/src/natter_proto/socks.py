"""The server side of SOCKS5 (RFC 1928) with username/password (RFC 1929), sans-IO.

A ``SocksHandshake`` takes the client's bytes as they arrive and says what to send back,
and, once the client asked to CONNECT, where to. Everything a client sends is bounded
(a greeting, an authentication and a request are each a few hundred bytes at most), so a
hostile client gets a clear reply and a closed connection, never a traceback.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import struct
from dataclasses import dataclass

from .streamhdr import Refusal

VERSION = 5
AUTH_VERSION = 1
MAX_BUFFER = 1024  # more than any one message: a client that sends more is cut off


class Method(enum.IntEnum):
    NO_AUTH = 0x00
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    """RFC 1928 section 6."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Stage(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    CONNECTING = "connecting"  # the request is out; the caller answers with ``reply``
    CLOSED = "closed"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True)
class Target:
    host: str  # an address as text, or a domain name (resolved on the peer's side)
    port: int

    @property
    def spec(self) -> str:
        """HOST:PORT as natter's stream header names a target (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class Step:
    """What one ``receive`` produced: bytes for the client, a request, or a failure (send
    ``send``, then close)."""

    send: bytes = b""
    target: Target | None = None
    failure: str = ""


def encode_reply(code: Reply) -> bytes:
    """A reply with an unspecified bound address (0.0.0.0:0): clients of CONNECT ignore it."""
    return bytes([VERSION, code, 0, AddressType.IPV4]) + b"\x00\x00\x00\x00" + b"\x00\x00"


class SocksHandshake:
    def __init__(self, credentials: Credentials | None = None) -> None:
        self.credentials = credentials
        self.stage = Stage.GREETING
        self._buffer = b""

    def receive(self, data: bytes) -> Step:
        """Feed what the client sent. Once a request is out (``Stage.CONNECTING``) the
        caller stops reading until it replied; what came with the request is ``rest``."""
        if self.stage not in (Stage.GREETING, Stage.AUTH, Stage.REQUEST):
            return Step()
        self._buffer += data
        step = Step()
        try:
            while self.stage in (Stage.GREETING, Stage.AUTH, Stage.REQUEST):
                produced = self._advance()
                if produced is None:
                    break
                step.send += produced.send
                step.target = produced.target
        except _Fail as fail:
            self.stage = Stage.CLOSED
            self._buffer = b""
            return Step(step.send + fail.send, None, fail.reason)
        if len(self._buffer) > MAX_BUFFER and self.stage in (Stage.GREETING, Stage.AUTH, Stage.REQUEST):
            self.stage = Stage.CLOSED
            self._buffer = b""
            return Step(step.send, None, "the client sent more than a SOCKS handshake holds")
        return step

    @property
    def rest(self) -> bytes:
        """Bytes the client sent after its request (payload it did not wait to send)."""
        return self._buffer if self.stage is Stage.CONNECTING else b""

    def reply(self, code: Reply) -> bytes:
        """The answer to the request: success lets bytes through, anything else ends it."""
        if self.stage is not Stage.CONNECTING:
            raise RuntimeError("no SOCKS request waits for a reply")
        self.stage = Stage.CLOSED if code is not Reply.SUCCEEDED else Stage.CONNECTING
        self._buffer = b""
        return encode_reply(code)

    # -- the three messages -----------------------------------------------------------
    def _advance(self) -> Step | None:
        if self.stage is Stage.GREETING:
            return self._greeting()
        if self.stage is Stage.AUTH:
            return self._auth()
        return self._request()

    def _greeting(self) -> Step | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        if buf[0] != VERSION:
            # a SOCKS4 client, or HTTP sent to the wrong port: there is no SOCKS5 way to
            # answer it, so say it the way SOCKS4 understands (request rejected) and close
            raise _Fail(b"\x00\x5b" + b"\x00" * 6, f"not a SOCKS5 greeting (first byte 0x{buf[0]:02x})")
        count = buf[1]
        if count == 0:
            raise _Fail(bytes([VERSION, Method.NO_ACCEPTABLE]), "the greeting offers no methods")
        if len(buf) < 2 + count:
            return None
        methods = set(buf[2 : 2 + count])
        self._buffer = buf[2 + count :]
        wanted = Method.USERNAME_PASSWORD if self.credentials is not None else Method.NO_AUTH
        if wanted not in methods:
            needs = "username and password" if self.credentials is not None else "no authentication"
            raise _Fail(bytes([VERSION, Method.NO_ACCEPTABLE]), f"the client does not offer {needs}")
        self.stage = Stage.AUTH if self.credentials is not None else Stage.REQUEST
        return Step(bytes([VERSION, wanted]))

    def _auth(self) -> Step | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        if buf[0] != AUTH_VERSION:
            raise _Fail(bytes([AUTH_VERSION, 0x01]), "bad username/password version")
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return None
        username = buf[2 : 2 + ulen]
        password = buf[3 + ulen : 3 + ulen + plen]
        self._buffer = buf[3 + ulen + plen :]
        assert self.credentials is not None
        good = hmac.compare_digest(username, self.credentials.username.encode()) & hmac.compare_digest(
            password, self.credentials.password.encode()
        )
        if not good:
            raise _Fail(bytes([AUTH_VERSION, 0x01]), "wrong username or password")
        self.stage = Stage.REQUEST
        return Step(bytes([AUTH_VERSION, 0x00]))

    def _request(self) -> Step | None:
        buf = self._buffer
        if len(buf) < 5:
            return None
        if buf[0] != VERSION:
            raise _Fail(encode_reply(Reply.GENERAL_FAILURE), f"bad request version 0x{buf[0]:02x}")
        command, atyp = buf[1], buf[3]
        if atyp == AddressType.IPV4:
            end = 4 + 4
        elif atyp == AddressType.IPV6:
            end = 4 + 16
        elif atyp == AddressType.DOMAIN:
            end = 5 + buf[4]
        else:
            raise _Fail(encode_reply(Reply.ADDRESS_TYPE_NOT_SUPPORTED), f"address type 0x{atyp:02x}")
        if len(buf) < end + 2:
            return None
        raw, (port,) = buf[4:end], struct.unpack("!H", buf[end : end + 2])
        self._buffer = buf[end + 2 :]
        if command != Command.CONNECT:
            known = {c.value: c.name for c in Command}
            name = known.get(command, f"0x{command:02x}")
            raise _Fail(encode_reply(Reply.COMMAND_NOT_SUPPORTED), f"command {name} is not supported")
        host = _host(atyp, raw)
        if port == 0:
            raise _Fail(encode_reply(Reply.GENERAL_FAILURE), "port 0")
        self.stage = Stage.CONNECTING
        return Step(target=Target(host, port))


def _host(atyp: int, raw: bytes) -> str:
    if atyp == AddressType.IPV4:
        return str(ipaddress.IPv4Address(raw))
    if atyp == AddressType.IPV6:
        return str(ipaddress.IPv6Address(raw))
    name = raw[1:]
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        raise _Fail(encode_reply(Reply.HOST_UNREACHABLE), "the domain name is not ASCII") from None
    if not text or not all(c.isalnum() or c in "-._" for c in text):
        raise _Fail(encode_reply(Reply.HOST_UNREACHABLE), f"{text!r} is not a domain name")
    return text


class _Fail(Exception):
    def __init__(self, send: bytes, reason: str) -> None:
        super().__init__(reason)
        self.send = send
        self.reason = reason


_REPLY_OF_REFUSAL = {
    Refusal.DENIED: Reply.NOT_ALLOWED,
    Refusal.NO_HOST: Reply.HOST_UNREACHABLE,
    Refusal.REFUSED: Reply.CONNECTION_REFUSED,
    Refusal.UNREACHABLE: Reply.HOST_UNREACHABLE,
    Refusal.NO_NETWORK: Reply.NETWORK_UNREACHABLE,
    Refusal.FAILED: Reply.GENERAL_FAILURE,
}


def reply_for(refusal: Refusal) -> Reply:
    """The SOCKS code for why the peer did not connect a stream."""
    return _REPLY_OF_REFUSAL[refusal]
