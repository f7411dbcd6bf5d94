"""Agent identity: an Ed25519 key pair, its short fingerprint, and register-frame proofs.

Pure: keys come in as bytes and signatures go out as bytes; storing keys is the agent's
business (``natter_agent.keystore``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .frames import Register

KEY_SIZE = 32
SIGNATURE_SIZE = 64
FINGERPRINT_PREFIX = "nt1-"
_SIGNING_DOMAIN = b"natter register v1"


def fingerprint(public_key: bytes) -> str:
    """A short, copyable name for a public key: ``nt1-`` and 26 base32 characters (130 bits)."""
    digest = hashlib.sha256(public_key).digest()
    return FINGERPRINT_PREFIX + base64.b32encode(digest).decode().lower().rstrip("=")[:26]


def valid_fingerprint(text: str) -> bool:
    body = text[len(FINGERPRINT_PREFIX) :]
    alphabet = set("abcdefghijklmnopqrstuvwxyz234567")
    return text.startswith(FINGERPRINT_PREFIX) and len(body) == 26 and set(body) <= alphabet


def same_fingerprint(a: str, b: str) -> bool:
    return hmac.compare_digest(a.lower(), b.lower())


class Identity:
    """A private key held in memory, able to sign."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.fingerprint = fingerprint(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def sign_register(self, message: Register) -> bytes:
        return self.sign(register_signing_bytes(message))


def register_signing_bytes(message: Register) -> bytes:
    """What a register signature covers: every field but the signature, the broker's cookie
    included (so a captured frame is worthless once its cookie has expired)."""
    body = [
        message.name,
        [[e.host, e.port] for e in message.locals],
        message.listening,
        message.public_key,
        message.cookie,
        message.token,
        message.nat,
    ]
    return _SIGNING_DOMAIN + bytes(msgpack.packb(body, use_bin_type=True))


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    if len(public_key) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_register(message: Register) -> bool:
    if message.public_key is None or message.signature is None:
        return False
    return verify(message.public_key, message.signature, register_signing_bytes(message))
