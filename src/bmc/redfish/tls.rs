//! Per-BMC TLS trust: a pinned CA, a pinned leaf certificate, or (opt-in, warned) nothing.
//!
//! Overview: BMCs are reached by IP and carry self-signed or site-CA certificates. A pinned
//! leaf ([`PinnedLeaf`]) is accepted when the SHA-256 of the certificate the BMC presents is the
//! configured one, whatever its names and chain say: the pin *is* the trust. The handshake's
//! signature is still verified, so the BMC must hold the certificate's key. A CA uses rustls'
//! ordinary WebPKI verification against that one CA (IP SANs included).
//!
//! Key types: [`client_config`], [`PinnedLeaf`].

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::RedfishTrust;

/// Why a trust could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file cannot be read or holds no certificate.
    #[error("CA file {path} cannot be used: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts exactly one leaf certificate, by its SHA-256.
#[derive(Debug)]
pub struct PinnedLeaf {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// Skip even the pin (the explicit `insecure_skip_verify` opt-in).
    accept_any: bool,
}

impl ServerCertVerifier for PinnedLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.accept_any {
            return Ok(ServerCertVerified::assertion());
        }
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint {} is not the pinned one",
                crate::config::format_fingerprint(&got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client configuration for one BMC's trust.
pub fn client_config(trust: &RedfishTrust) -> Result<rustls::ClientConfig, TlsError> {
    let p = provider();
    let builder = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()?;
    let cfg = match trust {
        RedfishTrust::CaFile(path) => {
            let ca = |reason: String| TlsError::Ca {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca(e.kind().to_string()))?;
            let mut roots = rustls::RootCertStore::empty();
            let mut n = 0;
            for c in rustls_pemfile_certs(&pem) {
                roots
                    .add(c)
                    .map_err(|e| ca(format!("not a usable CA certificate: {e}")))?;
                n += 1;
            }
            if n == 0 {
                return Err(ca("no PEM certificate in it".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        RedfishTrust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedLeaf {
                pin: *pin,
                provider: p,
                accept_any: false,
            }))
            .with_no_client_auth(),
        RedfishTrust::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedLeaf {
                pin: [0; 32],
                provider: p,
                accept_any: true,
            }))
            .with_no_client_auth(),
    };
    let mut cfg = cfg;
    // One configuration talks to one BMC: rustls' default cache holds 256 servers' sessions
    // (14 KB allocated up front), which at 10,000 BMCs is 140 MB for nothing. Two entries keep
    // session resumption for the one server this is for.
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(2);
    Ok(cfg)
}

/// The certificates in a PEM file (no extra crate for a loop over base64 blocks).
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}
