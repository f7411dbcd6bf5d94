"""The agent's TLS credentials for QUIC: a self-signed certificate around its natter key.

The certificate only wraps the Ed25519 identity key (QUIC requires TLS 1.3 with a
certificate). Peers never chain-verify it: after the handshake, which proved possession of
the key, each side compares the key itself with the one it expects (see ``verify.py``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from natter_proto.identity import Identity


@dataclass(frozen=True)
class Credentials:
    certificate: x509.Certificate
    private_key: Ed25519PrivateKey


def credentials_for(identity: Identity, name: str) -> Credentials:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"natter {name} {identity.fingerprint}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(identity.private_key, None)
    )
    return Credentials(certificate, identity.private_key)


def raw_public_key(certificate: x509.Certificate | None) -> bytes | None:
    """The Ed25519 key inside a peer's certificate, or None if there is none."""
    if certificate is None:
        return None
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)
