//! TLS 1.3 with natter's keys: each side presents a self-signed certificate around its
//! Ed25519 key. Nobody chain-verifies it; the verifiers check that the handshake signature
//! was made by the key inside the certificate (proof of possession) and the agent then
//! compares that key with the one it expects, in Python.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

/// natter/2: natter/1 plus the server's acceptance on a unidirectional stream (native
/// agents between themselves); natter/1: mutual TLS, as natter's aioquic engine speaks it.
pub const ALPN_ACCEPTING: &[u8] = b"natter/2";
pub const ALPN: &[u8] = b"natter/1";
pub const ACCEPTED: &[u8] = b"\x01"; // the whole of natter/2's acceptance stream

/// The fixed DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), then 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// The Ed25519 key in a certificate. Safe against a crafted certificate because the same
/// function picks the key that the handshake signature is verified with: whatever bytes
/// are found, the peer proved it holds the private half of exactly those.
pub fn ed25519_key(certificate: &[u8]) -> Option<[u8; 32]> {
    let at = certificate.windows(ED25519_SPKI_PREFIX.len()).position(|w| w == ED25519_SPKI_PREFIX)?;
    let start = at + ED25519_SPKI_PREFIX.len();
    certificate.get(start..start + 32)?.try_into().ok()
}

fn verify_signature(message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(Error::PeerIncompatible(rustls::PeerIncompatible::NoSignatureSchemesInCommon));
    }
    let key = ed25519_key(cert.as_ref()).ok_or(Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(message, dss.signature())
        .map_err(|_| Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

fn require_key(cert: &CertificateDer<'_>) -> Result<(), Error> {
    ed25519_key(cert.as_ref()).map(|_| ()).ok_or(Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
}

#[derive(Debug)]
pub struct NatterKeyVerifier;

impl ServerCertVerifier for NatterKeyVerifier {
    fn verify_server_cert(&self, end_entity: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, Error> {
        require_key(end_entity).map(|_| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for NatterKeyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: UnixTime) -> Result<ClientCertVerified, Error> {
        require_key(end_entity).map(|_| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        verify_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn client_config(cert: &[u8], key: &[u8]) -> Result<rustls::ClientConfig, Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NatterKeyVerifier))
        .with_client_auth_cert(vec![CertificateDer::from(cert.to_vec())], PrivateKeyDer::try_from(key.to_vec()).map_err(|e| Error::General(e.into()))?)?;
    config.alpn_protocols = vec![ALPN_ACCEPTING.to_vec(), ALPN.to_vec()];
    Ok(config)
}

pub fn server_config(cert: &[u8], key: &[u8]) -> Result<rustls::ServerConfig, Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(NatterKeyVerifier))
        .with_single_cert(vec![CertificateDer::from(cert.to_vec())], PrivateKeyDer::try_from(key.to_vec()).map_err(|e| Error::General(e.into()))?)?;
    config.alpn_protocols = vec![ALPN_ACCEPTING.to_vec(), ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_key_behind_the_spki_prefix() {
        let mut cert = vec![0u8; 10];
        cert.extend_from_slice(&ED25519_SPKI_PREFIX);
        cert.extend((0..32).map(|i| i as u8));
        cert.extend([9, 9]);
        assert_eq!(ed25519_key(&cert).unwrap()[31], 31);
    }

    #[test]
    fn a_truncated_key_is_no_key() {
        let mut cert = ED25519_SPKI_PREFIX.to_vec();
        cert.extend([1u8; 31]);
        assert!(ed25519_key(&cert).is_none());
    }
}
