"""Stateless address validation, like QUIC Retry: the broker hands out a cookie bound to
the sender's address and the time, and keeps no state until it comes back.

A cookie is 4 bytes of issue time (seconds) and 16 bytes of HMAC-SHA256 over the time and
the address. It is accepted for ``window`` seconds, from that address only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from .endpoints import Endpoint

COOKIE_SIZE = 20


class CookieJar:
    def __init__(self, secret: bytes | None = None, window: float = 120.0) -> None:
        self.secret = secret or secrets.token_bytes(32)
        self.window = window

    def _mac(self, issued: int, addr: Endpoint) -> bytes:
        message = struct.pack("!I", issued) + f"{addr.host}|{addr.port}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).digest()[:16]

    def issue(self, addr: Endpoint, now: float) -> bytes:
        issued = int(now) & 0xFFFFFFFF
        return struct.pack("!I", issued) + self._mac(issued, addr)

    def valid(self, cookie: bytes | None, addr: Endpoint, now: float) -> bool:
        if cookie is None or len(cookie) != COOKIE_SIZE:
            return False
        (issued,) = struct.unpack("!I", cookie[:4])
        age = (int(now) & 0xFFFFFFFF) - issued
        if not 0 <= age <= self.window:
            return False
        return hmac.compare_digest(cookie[4:], self._mac(issued, addr))
