//! Mutual TLS for the QUIC links between sidecars: loads the CA, certificate and key, checks that
//! they belong together, and builds the rustls configurations quinn needs (TLS 1.3, ALPN `h3`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::config::TlsPaths;

pub const ALPN_H3: &[u8] = b"h3";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{field} {path}: {reason}")]
    File {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("tls.key {key} does not belong to the certificate tls.cert {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("tls.cert {cert} is not signed by tls.ca {ca}: {reason}")]
    NotSignedByCa {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Build(String),
}

/// The process-wide crypto provider. kube, quinn and rustls all reach for rustls' default
/// provider; installing one explicitly at start-up avoids a panic on first use when more than one
/// provider is compiled in.
pub fn install_crypto_provider() {
    // Err means one is already installed (a test harness calling twice): that one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A validated set of CA, certificate chain and key.
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl TlsMaterial {
    /// Loads and cross-checks the three files: parseable, key matches certificate, certificate
    /// signed by the CA. Failing here gives the operator one precise line at start-up instead of
    /// handshake failures later.
    pub fn load(paths: &TlsPaths) -> Result<TlsMaterial, TlsError> {
        let ca_certs = read_certs("ca", &paths.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in ca_certs {
            roots.add(cert).map_err(|e| TlsError::File {
                field: "ca",
                path: paths.ca.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let chain = read_certs("cert", &paths.cert)?;
        let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| TlsError::File {
            field: "key",
            path: paths.key.clone(),
            reason: format!("expected a PEM private key: {e}"),
        })?;
        let material = TlsMaterial {
            roots: Arc::new(roots),
            chain,
            key,
        };
        material.check_key_matches(paths)?;
        material.check_signed_by_ca(paths)?;
        Ok(material)
    }

    fn check_key_matches(&self, paths: &TlsPaths) -> Result<(), TlsError> {
        let signing_key = provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| TlsError::File {
                field: "key",
                path: paths.key.clone(),
                reason: format!("unsupported private key: {e}"),
            })?;
        let certified = rustls::sign::CertifiedKey::new(self.chain.clone(), signing_key);
        certified.keys_match().map_err(|_| TlsError::KeyMismatch {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
        })
    }

    fn check_signed_by_ca(&self, paths: &TlsPaths) -> Result<(), TlsError> {
        let verifier = self.client_verifier()?;
        let (end_entity, intermediates) = self
            .chain
            .split_first()
            .ok_or_else(|| TlsError::Build("empty certificate chain".to_string()))?;
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| TlsError::NotSignedByCa {
                cert: paths.cert.clone(),
                ca: paths.ca.clone(),
                reason: e.to_string(),
            })
    }

    fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Build(e.to_string()))
    }

    /// The inbound side: requires a client certificate from the CA.
    /// The private key's DER bytes: the secret the inbound's stateless-reset key is derived
    /// from, so a restarted sidecar with the same key can reset its predecessor's connections.
    pub fn private_key_der(&self) -> &[u8] {
        self.key.secret_der()
    }

    pub fn quic_server_config(&self) -> Result<QuicServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Build(e.to_string()))?
            .with_client_cert_verifier(self.client_verifier()?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Build(e.to_string()))?;
        config.alpn_protocols = vec![ALPN_H3.to_vec()];
        QuicServerConfig::try_from(config).map_err(|e| TlsError::Build(e.to_string()))
    }

    /// The outbound side: verifies the upstream against the CA and presents our certificate.
    pub fn quic_client_config(&self) -> Result<QuicClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Build(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Build(e.to_string()))?;
        config.alpn_protocols = vec![ALPN_H3.to_vec()];
        QuicClientConfig::try_from(config).map_err(|e| TlsError::Build(e.to_string()))
    }
}

fn read_certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        field,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(format!("expected PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            "expected PEM certificates, found none".to_string(),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::certs::{write_dev_certs, CertRequest};

    fn dev_certs(dir: &Path, existing_ca: Option<PathBuf>) -> TlsPaths {
        write_dev_certs(&CertRequest {
            out: dir.to_path_buf(),
            extra_names: vec![],
            existing_ca,
            common_name: "test".to_string(),
        })
        .unwrap();
        TlsPaths {
            ca: dir.join("ca.crt"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }

    #[test]
    fn dev_certs_load_and_build_both_sides() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let material = TlsMaterial::load(&dev_certs(dir.path(), None)).unwrap();
        material.quic_server_config().unwrap();
        material.quic_client_config().unwrap();
    }

    #[test]
    fn second_identity_from_existing_ca_verifies() {
        install_crypto_provider();
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        dev_certs(first.path(), None);
        let paths = dev_certs(second.path(), Some(first.path().to_path_buf()));
        TlsMaterial::load(&paths).unwrap();
    }

    #[test]
    fn certificate_from_another_ca_is_rejected() {
        install_crypto_provider();
        let first = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let mut paths = dev_certs(first.path(), None);
        paths.ca = dev_certs(other.path(), None).ca;
        let err = TlsMaterial::load(&paths).err().unwrap().to_string();
        assert!(err.contains("not signed by tls.ca"), "{err}");
    }

    #[test]
    fn key_of_another_certificate_is_rejected() {
        install_crypto_provider();
        let first = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let mut paths = dev_certs(first.path(), None);
        paths.key = dev_certs(other.path(), None).key;
        let err = TlsMaterial::load(&paths).err().unwrap().to_string();
        assert!(err.contains("does not belong"), "{err}");
    }

    #[test]
    fn missing_file_names_field_and_path() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let mut paths = dev_certs(dir.path(), None);
        paths.ca = dir.path().join("nope.crt");
        let err = TlsMaterial::load(&paths).err().unwrap().to_string();
        assert!(
            err.starts_with("tls.ca") && err.contains("nope.crt"),
            "{err}"
        );
    }
}
