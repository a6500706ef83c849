//! Development certificates: a CA and peer identities with the file names of a cert-manager
//! Secret (`ca.crt`, `tls.crt`, `tls.key`), so the same mounts work in development and in a cluster.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::config::DEFAULT_SERVER_NAME;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: expected a PEM CA certificate and its key beside it (ca.key): {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("--identity {0:?}: expected a URI such as spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    BadIdentity(String),
}

/// What `certs` should write.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub out: PathBuf,
    /// DNS names the identity carries besides the default `locality-sidecar`.
    pub extra_names: Vec<String>,
    /// Directory holding an existing `ca.crt` + `ca.key` to sign with instead of a new CA.
    pub existing_ca: Option<PathBuf>,
    pub common_name: String,
    /// URI SANs, typically one SPIFFE ID (`spiffe://<trust-domain>/ns/<ns>/sa/<account>`).
    pub identities: Vec<String>,
}

/// Writes `ca.crt`, `ca.key`, `tls.crt` and `tls.key` into `out` and returns the file paths.
pub fn write_dev_certs(request: &CertRequest) -> Result<Vec<PathBuf>, CertsError> {
    std::fs::create_dir_all(&request.out).map_err(|source| CertsError::Io {
        path: request.out.clone(),
        source,
    })?;
    let (ca_pem, ca_key_pem, issuer) = match &request.existing_ca {
        Some(dir) => load_ca(dir)?,
        None => new_ca()?,
    };

    let mut names = vec![DEFAULT_SERVER_NAME.to_string()];
    for name in &request.extra_names {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let mut params = CertificateParams::new(names)?;
    for identity in &request.identities {
        if !identity.contains("://") || identity.chars().any(char::is_whitespace) {
            return Err(CertsError::BadIdentity(identity.clone()));
        }
        let uri = identity
            .as_str()
            .try_into()
            .map_err(|_| CertsError::BadIdentity(identity.clone()))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    params
        .distinguished_name
        .push(DnType::CommonName, request.common_name.clone());
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // One identity serves both directions: the sidecar is a QUIC server to its peers and a client to them.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    let files = [
        ("ca.crt", ca_pem),
        ("ca.key", ca_key_pem),
        ("tls.crt", cert.pem()),
        ("tls.key", key.serialize_pem()),
    ];
    let mut written = Vec::new();
    for (name, contents) in files {
        let path = request.out.join(name);
        write_file(&path, &contents, name.ends_with(".key"))?;
        written.push(path);
    }
    Ok(written)
}

type CaParts = (String, String, Issuer<'static, KeyPair>);

fn new_ca() -> Result<CaParts, CertsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "locality-sidecar development CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    let key_pem = key.serialize_pem();
    Ok((cert.pem(), key_pem, Issuer::new(params, key)))
}

fn load_ca(dir: &Path) -> Result<CaParts, CertsError> {
    let cert_path = dir.join("ca.crt");
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CertsError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let ca_pem = read(&cert_path)?;
    let key_pem = read(&dir.join("ca.key"))?;
    let bad = |reason: String| CertsError::BadCa {
        path: cert_path.clone(),
        reason,
    };
    let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| bad(e.to_string()))?;
    Ok((ca_pem, key_pem, issuer))
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
}
