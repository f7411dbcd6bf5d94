"""The agent's TLS credentials for QUIC: a self-signed certificate around a fresh key.

The certificate only wraps the key (QUIC requires TLS 1.3 with a certificate); peers do
not chain-verify it. Binding keys to names and pinning them is a separate feature.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Credentials:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


def self_signed(common_name: str) -> Credentials:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"natter {common_name}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return Credentials(certificate, key)
