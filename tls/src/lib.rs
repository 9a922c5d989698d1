//! The rustls pieces both sides of the API share. Nodes carry self-signed certificates that
//! are trusted by fingerprint, not by a public PKI, so the usual WebPKI verifiers do not fit the
//! first contact: [`PinnedServerVerifier`] accepts exactly one fingerprint (or, on first contact,
//! any certificate, recording what it saw for an admin to compare), and [`AnyClientCert`] lets a
//! server ask for a client certificate whose fingerprint the request handler then checks.
//! Handshake signatures are always verified, so a peer must hold its certificate's key.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use hvnode_api::fingerprint;

/// The crypto provider everything uses (ring: no C library beyond cc, builds static).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The handshake-signature checks every verifier here shares: the certificate itself is
/// judged by fingerprint, but the peer must still prove it holds the certificate's key.
#[derive(Debug)]
struct Signatures(Arc<CryptoProvider>);

impl Signatures {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Accepts exactly the server certificate with the expected SHA-256 fingerprint (or, with no
/// expectation, any certificate: used once to show the admin a peer's fingerprint) and records
/// the fingerprint it saw.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    expected: Option<String>,
    seen: Mutex<Option<String>>,
    sigs: Signatures,
}

impl PinnedServerVerifier {
    /// Pins `expected` (canonical fingerprint); `None` accepts any certificate.
    pub fn new(expected: Option<String>) -> Self {
        Self {
            expected,
            seen: Mutex::new(None),
            sigs: Signatures(provider()),
        }
    }

    /// The fingerprint of the last certificate the server presented.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The pinned fingerprint.
    pub fn expected(&self) -> Option<&str> {
        self.expected.as_deref()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint::of_der(end_entity);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp.clone());
        match &self.expected {
            Some(expected) if *expected != fp => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.sigs.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.sigs.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.sigs.schemes()
    }
}

/// Asks every client for a certificate without requiring one, and accepts any certificate
/// whose holder proves possession of its key: the request handler compares its fingerprint with
/// what it expects.
#[derive(Debug)]
pub struct AnyClientCert {
    sigs: Signatures,
}

impl Default for AnyClientCert {
    fn default() -> Self {
        AnyClientCert {
            sigs: Signatures(provider()),
        }
    }
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.sigs.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.sigs.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.sigs.schemes()
    }
}

/// A client configuration that checks the server with `verifier`, presenting a client
/// certificate chain and key if given.
pub fn pinned_client_config(
    verifier: Arc<PinnedServerVerifier>,
    client_auth: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match client_auth {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key),
        None => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_verifier_accepts_only_its_fingerprint_and_records_what_it_saw() {
        let cert = CertificateDer::from(b"not really DER, only hashed".to_vec());
        let name = ServerName::try_from("node").unwrap();
        let fp = fingerprint::of_der(&cert);
        let pinned = PinnedServerVerifier::new(Some(fp.clone()));
        assert!(pinned
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .is_ok());
        let other = PinnedServerVerifier::new(Some(fingerprint::of_der(b"other")));
        assert!(other
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .is_err());
        assert_eq!(other.seen(), Some(fp.clone()));
        let first = PinnedServerVerifier::new(None);
        assert!(first
            .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
            .is_ok());
        assert_eq!(first.seen(), Some(fp));
    }
}
