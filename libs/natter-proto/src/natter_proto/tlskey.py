"""How a broker's TLS key is named: what it logs at start and what agents pin."""

from __future__ import annotations

import base64
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def key_fingerprint(der_certificate: bytes) -> str:
    """``SHA256:<base64>`` of the certificate's SubjectPublicKeyInfo (as HPKP named keys):
    it survives a renewed certificate around the same key."""
    certificate = x509.load_der_x509_certificate(der_certificate)
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode().rstrip("=")
