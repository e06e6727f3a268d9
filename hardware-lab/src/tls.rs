//! The lab's certificate authority and the BMCs' certificates.
//!
//! Overview: real BMCs are reached by IP with certificates nobody's browser trusts. The lab makes
//! one CA per run and a certificate per BMC for `127.0.0.1` and `localhost`, so vigil can be
//! configured either way a production site would: pin the CA (`ca_file`) or the leaf
//! (`fingerprint_sha256`). Keys never leave the lab's memory; only the CA certificate is written.
//!
//! Key types: [`LabCa`], [`BmcCert`].

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use sha2::{Digest, Sha256};

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen refused.
    #[error("lab certificate cannot be generated")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("lab TLS configuration is invalid")]
    Config(#[from] rustls::Error),
}

/// The lab CA.
#[derive(Debug)]
pub struct LabCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A BMC's certificate and key, ready for a TLS server.
#[derive(Debug, Clone)]
pub struct BmcCert {
    /// The rustls server configuration.
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate (DER), as `AB:CD:...`.
    pub fingerprint: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl LabCa {
    /// A new CA.
    pub fn new(lab_name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("vigil hardware lab CA ({lab_name})"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A certificate for the BMC of `server`.
    pub fn issue(&self, server: &str) -> Result<BmcCert, TlsError> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("bmc-{server}"));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let der = cert.der().clone();
        let fingerprint = Sha256::digest(der.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![der], key_der)?;
        Ok(BmcCert {
            config: Arc::new(config),
            fingerprint,
        })
    }
}
