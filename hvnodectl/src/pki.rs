//! The manager's certificates: a self-signed CA (ECDSA P-256) and the client and server
//! certificates it signs.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to build or sign a certificate.
    #[error("Cannot create certificate for {0:?}")]
    Generate(String, #[source] rcgen::Error),
    /// The stored CA could not be loaded.
    #[error("Cannot load the manager CA; run `hvnodectl init` in a new state directory")]
    LoadCa(#[source] rcgen::Error),
}

/// A key and its certificate, both PEM.
#[derive(Debug, Clone)]
pub struct KeyAndCert {
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    /// Certificate, PEM.
    pub cert_pem: String,
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS client (mutual TLS to nodes).
    Client,
    /// TLS server (`hvnodectl serve`).
    Server,
}

/// Creates the self-signed manager CA; its common name is the manager name.
pub fn new_ca(name: &str) -> Result<KeyAndCert, PkiError> {
    let err = |e| PkiError::Generate(name.to_owned(), e);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "hvnode manager");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(KeyAndCert {
        key_pem: key.serialize_pem(),
        cert_pem: cert.pem(),
    })
}

/// Issues a leaf certificate signed by the CA. `sans` are DNS names or IP addresses.
pub fn issue(
    ca: &KeyAndCert,
    common_name: &str,
    sans: &[String],
    usage: Usage,
) -> Result<KeyAndCert, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(PkiError::LoadCa)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(PkiError::LoadCa)?;
    let err = |e| PkiError::Generate(common_name.to_owned(), e);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = CertificateParams::new(sans.to_vec()).map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match usage {
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
    }];
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    Ok(KeyAndCert {
        key_pem: key.serialize_pem(),
        cert_pem: cert.pem(),
    })
}

/// How long a node certificate the manager signs is valid.
pub const NODE_CERT_DAYS: i64 = 365;
/// The organizational unit that marks a node certificate (the agent's `tls::NODE_OU`).
pub const NODE_OU: &str = "hvnode node";

/// Signs a node's certificate request (PEM) with the CA: a certificate for the node's own key,
/// for TLS client and server use between nodes, marked as a node's ([`NODE_OU`]), valid for
/// [`NODE_CERT_DAYS`] days. Only the request's key and common name are taken from it.
pub fn sign_node(ca: &KeyAndCert, csr_pem: &str) -> Result<String, PkiError> {
    let err = |e| PkiError::Generate("node certificate".into(), e);
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(PkiError::LoadCa)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(PkiError::LoadCa)?;
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(err)?;
    let cn = csr
        .params
        .distinguished_name
        .get(&DnType::CommonName)
        .and_then(|v| match v {
            rcgen::DnValue::Utf8String(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "hvnode node".into());
    let p = &mut csr.params;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationalUnitName, NODE_OU);
    p.is_ca = IsCa::ExplicitNoCa;
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::days(NODE_CERT_DAYS);
    Ok(csr.signed_by(&issuer).map_err(err)?.pem())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    use std::sync::Arc;

    #[test]
    fn client_certificate_verifies_against_the_ca() {
        let ca = new_ca("test manager").unwrap();
        let client = issue(&ca, "test manager client", &[], Usage::Client).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let leaf = CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap();
        verifier
            .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
            .unwrap();

        let other_ca = new_ca("other").unwrap();
        let foreign = issue(&other_ca, "x", &[], Usage::Client).unwrap();
        let leaf = CertificateDer::from_pem_slice(foreign.cert_pem.as_bytes()).unwrap();
        assert!(verifier
            .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
            .is_err());
    }
}
