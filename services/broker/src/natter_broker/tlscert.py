"""The broker's TLS certificate for its TCP way in.

Given files (``--tls-cert``/``--tls-key``: PEM, as cert-manager writes a Kubernetes TLS
Secret's ``tls.crt`` and ``tls.key``), it uses those. Without them it makes a self-signed
ECDSA P-256 pair once and keeps it in the state dir (``broker-tls.crt``, ``broker-tls.key``,
the key readable by its owner only), so agents that remember its key on first use see the
same key after a restart; a library broker without a state dir makes one per run.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from natter_proto.endpoints import AddressError

CERT_FILE = "broker-tls.crt"
KEY_FILE = "broker-tls.key"


def server_context(cert: str, key: str, state_dir: str) -> tuple[ssl.SSLContext, bytes, str]:
    """A TLS server context, the certificate it presents (DER, for logging its key), and
    a warning to log, or "" (a state dir that cannot keep the pair: one for this run)."""
    if bool(cert) != bool(key):
        raise AddressError("--tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        try:
            ctx.load_cert_chain(cert, key)
            pem = Path(cert).read_bytes()
        except (OSError, ssl.SSLError) as exc:
            raise AddressError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
        return ctx, x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER), ""
    warning = ""
    try:
        cert_pem, key_pem = _kept_pair(Path(state_dir).expanduser()) if state_dir else self_signed_pair()
    except AddressError as exc:
        cert_pem, key_pem = self_signed_pair()
        warning = f"{exc}: a new TLS key for this run only (agents that remember it will warn)"
    with tempfile.TemporaryDirectory() as tmp:  # ssl loads from files only
        cert_path, key_path = Path(tmp) / CERT_FILE, Path(tmp) / KEY_FILE
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx, x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER), warning


def _kept_pair(directory: Path) -> tuple[bytes, bytes]:
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    try:
        if cert_path.exists() and key_path.exists():
            return cert_path.read_bytes(), key_path.read_bytes()
        cert_pem, key_pem = self_signed_pair()
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key_pem)
        cert_path.write_bytes(cert_pem)
    except OSError as exc:
        raise AddressError(f"cannot keep the broker's TLS pair in {directory}: {exc.strerror}") from None
    return cert_pem, key_pem


def self_signed_pair() -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for this host, valid ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"natter broker {host}")])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(host), x509.DNSName("localhost")]
    alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem
