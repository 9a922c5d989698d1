//! The node's TLS identity and the server configurations built from the registration.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Errors of the TLS layer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Key or certificate generation failed.
    #[error("Generating the node certificate failed")]
    Generate(#[from] rcgen::Error),
    /// Reading or writing the key material failed.
    #[error("Node TLS material in {0}")]
    Io(String, #[source] std::io::Error),
    /// A PEM could not be parsed.
    #[error("Invalid PEM: {0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the manager CA.
    #[error("Manager CA cannot verify clients: {0}")]
    Verifier(String),
    /// A manager-signed certificate was refused.
    #[error("The signed certificate was refused: {0}")]
    Signed(String),
}

/// The node's key and self-signed certificate.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Certificate, DER.
    pub cert_der: Vec<u8>,
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

fn write_private(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    hvnode_base::fs::write_atomic(path, data.as_bytes(), mode)
        .map_err(|e| TlsError::Io(path.display().to_string(), e))
}

/// Loads the identity from `dir`, or creates it there on first start.
pub fn load_or_create(dir: &Path, hostname: &str) -> Result<Identity, TlsError> {
    let key_path = dir.join("node.key");
    let cert_path = dir.join("node.pem");
    if let (Ok(key_pem), Ok(cert_pem)) = (
        std::fs::read_to_string(&key_path),
        std::fs::read_to_string(&cert_path),
    ) {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| TlsError::Pem(e.to_string()))?
            .to_vec();
        return Ok(Identity {
            cert_der,
            cert_pem,
            key_pem,
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Io(dir.display().to_string(), e))?;
    let key = rcgen::KeyPair::generate()?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if !hostname.is_empty() {
        names.insert(0, hostname.to_owned());
    }
    let mut params = rcgen::CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("hvnode {hostname}"));
    let cert = params.self_signed(&key)?;
    let id = Identity {
        cert_der: cert.der().to_vec(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    write_private(&key_path, &id.key_pem, 0o600)?;
    write_private(&cert_path, &id.cert_pem, 0o644)?;
    Ok(id)
}

/// A server configuration: without a manager CA no client certificate is asked for; with one,
/// clients may present a certificate, which rustls verifies against that CA (anonymous clients
/// are still admitted, for the registration routes).
pub fn server_config(
    id: &Identity,
    manager_ca_pem: Option<&str>,
) -> Result<ServerConfig, TlsError> {
    let provider = hvnode_tls::provider();
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let chain = vec![CertificateDer::from(id.cert_der.clone())];
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match manager_ca_pem {
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| TlsError::Pem(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Resumption tickets spare a manager that reconnects often the full handshake. A new
    // configuration (a registration change) has a new ticket key, so tickets issued under the
    // old trust do not resume.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(config)
}

/// The organizational unit of a node certificate the manager signed: a client presenting one
/// is another node of the same manager, allowed only the node-to-node routes.
pub const NODE_OU: &str = "hvnode node";
/// The manager-signed certificate of this node, next to `node.key`.
const SIGNED_FILE: &str = "node-signed.pem";

/// A certificate request for the node's own key, for the manager to sign (PEM).
pub fn csr_pem(id: &Identity, hostname: &str) -> Result<String, TlsError> {
    let key = rcgen::KeyPair::from_pem(&id.key_pem)?;
    let name = if hostname.is_empty() {
        "hvnode"
    } else {
        hostname
    };
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("hvnode node {name}"));
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, NODE_OU);
    Ok(params.serialize_request(&key)?.pem()?)
}

/// Whether a certificate (DER) is a node certificate: its subject carries [`NODE_OU`].
pub fn is_node_certificate(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, cert)| {
        cert.subject()
            .iter_organizational_unit()
            .any(|ou| ou.as_str() == Ok(NODE_OU))
    })
}

/// Checks a certificate the manager signed for this node (it must be for the node's key, a
/// node certificate, and verify against `ca_pem` as a client certificate) and keeps it in
/// `dir`; its fingerprint and expiry.
pub fn install_signed(
    dir: &Path,
    id: &Identity,
    cert_pem: &str,
    ca_pem: &str,
) -> Result<hvnode_api::node::SignedCertificate, TlsError> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| TlsError::Pem(format!("cert_pem: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| TlsError::Pem(format!("cert_pem: {e}")))?;
    let key = rcgen::KeyPair::from_pem(&id.key_pem)?;
    if cert.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&key) {
        return Err(TlsError::Signed(
            "the certificate is not for this node's key: sign the request from GET /v1/node/certificate".into(),
        ));
    }
    if !is_node_certificate(&der) {
        return Err(TlsError::Signed(format!(
            "the certificate's subject has no OU={NODE_OU:?}: it is not a node certificate"
        )));
    }
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| TlsError::Pem(e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), hvnode_tls::provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    verifier
        .verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now())
        .map_err(|e| {
            TlsError::Signed(format!(
                "the certificate does not verify against the registered manager's CA: {e}"
            ))
        })?;
    write_private(&dir.join(SIGNED_FILE), cert_pem, 0o644)?;
    Ok(signed_info(&der))
}

fn signed_info(der: &[u8]) -> hvnode_api::node::SignedCertificate {
    let not_after_unix = x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .unwrap_or(0);
    hvnode_api::node::SignedCertificate {
        fingerprint: hvnode_api::fingerprint::of_der(der),
        not_after_unix,
    }
}

/// The manager-signed certificate kept in `dir`, PEM, with what the API reports of it.
pub fn load_signed(dir: &Path) -> Option<(String, hvnode_api::node::SignedCertificate)> {
    let pem = std::fs::read_to_string(dir.join(SIGNED_FILE)).ok()?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let info = signed_info(&der);
    Some((pem, info))
}

/// A client configuration for connecting to another node: this node's manager-signed
/// certificate as its client certificate, and the other node's certificate pinned by its
/// fingerprint (given by the manager).
pub fn peer_client_config(
    id: &Identity,
    signed_pem: &str,
    peer_fingerprint: &str,
) -> Result<rustls::ClientConfig, TlsError> {
    let chain = CertificateDer::pem_slice_iter(signed_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let verifier = Arc::new(hvnode_tls::PinnedServerVerifier::new(Some(
        peer_fingerprint.to_owned(),
    )));
    let mut config = hvnode_tls::pinned_client_config(verifier, Some((chain, key)))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Checks that a PEM holds at least one certificate usable as a CA for client verification.
pub fn validate_ca(pem: &str) -> Result<String, TlsError> {
    let mut first = None;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::Pem(e.to_string()))?;
        first.get_or_insert_with(|| hvnode_api::fingerprint::of_der(&cert));
        roots
            .add(cert)
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    }
    first.ok_or_else(|| TlsError::Pem("no certificate in ca_pem".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_the_same_identity() {
        let dir = std::env::temp_dir().join(format!("hvnode-agent-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_create(&dir, "node1").unwrap();
        let b = load_or_create(&dir, "other").unwrap();
        assert_eq!(
            hvnode_api::fingerprint::of_der(&a.cert_der),
            hvnode_api::fingerprint::of_der(&b.cert_der)
        );
        assert_eq!(
            hvnode_api::fingerprint::of_der(&a.cert_der).len(),
            32 * 3 - 1
        );
        server_config(&a, None).unwrap();
        server_config(&a, Some(&a.cert_pem)).unwrap();
        assert!(validate_ca("not a pem").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
