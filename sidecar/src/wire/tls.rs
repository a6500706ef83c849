//! Mutual TLS for the QUIC links between sidecars: loads the CA, certificate and key, checks that
//! they belong together, and keeps them live.
//!
//! Certificates rotate under a running sidecar (cert-manager renews them, the kubelet swaps the
//! Secret volume's `..data` symlink). [`LiveTls`] holds the current set; the rustls configurations
//! built from it look the set up at every handshake (a certificate resolver and verifiers that
//! delegate to the current CA), so [`watch`] swapping the set makes the next handshake, in both
//! roles, use it. A bad new set is refused whole and the old one stays.
//!
//! Identities: a peer's SPIFFE ID is the first `spiffe://` URI SAN of its leaf certificate
//! ([`spiffe_id`]); the inbound side authorizes callers by it and the outbound side checks that
//! an upstream presents the one it expects.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::sync::watch as tokio_watch;

use crate::config::TlsPaths;
use crate::metrics::{metrics, ResultLabels};

pub const ALPN_H3: &[u8] = b"h3";
/// HTTP/3 between two sidecars that both imply gRPC's usual fields on the hop (see
/// [`crate::wire::grpc::imply_grpc_defaults`]). Offered and preferred before plain `h3`,
/// so two sidecars of this version agree on it in the handshake, before any call, while a
/// sidecar of an older version (or any other HTTP/3 peer) only knows `h3` and gets the
/// request and response headers unchanged.
pub const ALPN_H3_SIDECAR: &[u8] = b"locality-sidecar-h3/1";
/// [`ALPN_H3_SIDECAR`], and both ends also remember each request's path and user-agent per
/// connection (see [`crate::wire::field_memory`]). A sidecar of the version before only knows
/// `/1` and agrees on that.
pub const ALPN_H3_SIDECAR_MEMORY: &[u8] = b"locality-sidecar-h3/2";
/// What the QUIC side offers and accepts, in order of preference.
const QUIC_ALPNS: [&[u8]; 3] = [ALPN_H3_SIDECAR_MEMORY, ALPN_H3_SIDECAR, ALPN_H3];

/// How often the certificate files are read for changes. Reading three small files a second
/// costs nothing, sees the kubelet's symlink swap as surely as a file event would (inotify
/// watches on a symlinked Secret volume miss swaps unless the directory is watched), and keeps
/// a new set within the 5 s promise.
pub const POLL: Duration = Duration::from_secs(1);
/// Warn once a leaf has less than this share of its lifetime left (cert-manager renews at 2/3).
const WARN_REMAINING_SHARE: f64 = 1.0 / 3.0;

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

/// The three files' contents, read together.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl TlsFiles {
    pub fn read(paths: &TlsPaths) -> Result<TlsFiles, TlsError> {
        let read = |field: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::File {
                field,
                path: path.to_path_buf(),
                reason: format!("cannot read: {e}"),
            })
        };
        Ok(TlsFiles {
            ca: read("ca", &paths.ca)?,
            cert: read("cert", &paths.cert)?,
            key: read("key", &paths.key)?,
        })
    }

    /// Reads until two reads in a row agree: the three files are read one by one, and a swap
    /// between two reads would pair an old certificate with a new key.
    fn read_stable(paths: &TlsPaths) -> Result<TlsFiles, TlsError> {
        let mut previous = TlsFiles::read(paths)?;
        for _ in 0..3 {
            let next = TlsFiles::read(paths)?;
            if next == previous {
                return Ok(next);
            }
            previous = next;
        }
        Ok(previous)
    }

    fn fingerprint(&self) -> [u8; 32] {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [&self.ca, &self.cert, &self.key] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(context.finish().as_ref());
        out
    }
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
        TlsMaterial::parse(&TlsFiles::read(paths)?, paths)
    }

    /// [`TlsMaterial::load`] from contents already read; `paths` name them in errors.
    pub fn parse(files: &TlsFiles, paths: &TlsPaths) -> Result<TlsMaterial, TlsError> {
        let ca_certs = parse_certs("ca", &paths.ca, &files.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in ca_certs {
            roots.add(cert).map_err(|e| TlsError::File {
                field: "ca",
                path: paths.ca.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let chain = parse_certs("cert", &paths.cert, &files.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| TlsError::File {
            field: "key",
            path: paths.key.clone(),
            reason: format!("expected a PEM private key: {e}"),
        })?;
        let material = TlsMaterial {
            roots: Arc::new(roots),
            chain,
            key,
        };
        material.certified_key(paths)?;
        material.check_signed_by_ca(paths)?;
        Ok(material)
    }

    fn certified_key(&self, paths: &TlsPaths) -> Result<Arc<CertifiedKey>, TlsError> {
        let signing_key = provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| TlsError::File {
                field: "key",
                path: paths.key.clone(),
                reason: format!("unsupported private key: {e}"),
            })?;
        let certified = CertifiedKey::new(self.chain.clone(), signing_key);
        certified.keys_match().map_err(|_| TlsError::KeyMismatch {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
        })?;
        Ok(Arc::new(certified))
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

    fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Build(e.to_string()))
    }

    /// The private key's DER bytes (see [`LiveTls::reset_secret`]).
    pub fn private_key_der(&self) -> &[u8] {
        self.key.secret_der()
    }

    /// The leaf certificate's SPIFFE ID, if it carries one.
    pub fn identity(&self) -> Option<String> {
        spiffe_id(&self.chain)
    }
}

fn parse_certs(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        field,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(format!("expected PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            "expected PEM certificates, found none".to_string(),
        ));
    }
    Ok(certs)
}

/// The URI SANs of a DER certificate (empty when it cannot be parsed or has none).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

/// A chain's SPIFFE ID: the leaf's first `spiffe://` URI SAN (X.509-SVIDs carry exactly one).
pub fn spiffe_id(chain: &[CertificateDer<'_>]) -> Option<String> {
    let leaf = chain.first()?;
    uri_sans(leaf.as_ref())
        .into_iter()
        .find(|uri| uri.starts_with("spiffe://"))
}

/// A leaf's validity period, as Unix seconds.
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let validity = cert.validity();
    Some((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// What the operator should hear about a leaf's expiry at `now` (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryNotice {
    Fine,
    /// Less than a third of the lifetime is left: renewal should have happened.
    Soon,
    Expired,
}

/// Judges a leaf valid from `not_before` to `not_after` at `now` (all Unix seconds).
pub fn expiry_notice(not_before: i64, not_after: i64, now: i64) -> ExpiryNotice {
    if now >= not_after {
        return ExpiryNotice::Expired;
    }
    let lifetime = (not_after - not_before).max(1) as f64;
    if ((not_after - now) as f64) < lifetime * WARN_REMAINING_SHARE {
        ExpiryNotice::Soon
    } else {
        ExpiryNotice::Fine
    }
}

/// One validated set, ready for handshakes.
struct Active {
    certified: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
    /// The leaf's validity, when it parses.
    validity: Option<(i64, i64)>,
    identity: Option<String>,
    fingerprint: [u8; 32],
}

impl Active {
    fn new(files: &TlsFiles, paths: &TlsPaths) -> Result<Active, TlsError> {
        let material = TlsMaterial::parse(files, paths)?;
        Ok(Active {
            certified: material.certified_key(paths)?,
            client_verifier: material.client_verifier()?,
            server_verifier: material.server_verifier()?,
            validity: material.chain.first().and_then(|leaf| validity(leaf)),
            identity: material.identity(),
            fingerprint: files.fingerprint(),
        })
    }
}

/// The live certificate set: what every new handshake, inbound or outbound, presents and trusts.
pub struct LiveTls {
    paths: TlsPaths,
    active: RwLock<Arc<Active>>,
    /// The private key loaded at start, kept for the process lifetime (see [`Self::reset_secret`]).
    reset_secret: Vec<u8>,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// What one look at the files found.
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    Applied,
    /// The same bad set as last time: already logged and counted.
    StillRejected,
    Rejected(TlsError),
}

impl LiveTls {
    /// Loads the set at start-up; a bad set is an error here (nothing to fall back to).
    pub fn load(paths: &TlsPaths) -> Result<Arc<LiveTls>, TlsError> {
        let files = TlsFiles::read_stable(paths)?;
        let material = TlsMaterial::parse(&files, paths)?;
        let reset_secret = material.private_key_der().to_vec();
        let live = LiveTls {
            paths: paths.clone(),
            active: RwLock::new(Arc::new(Active::new(&files, paths)?)),
            reset_secret,
        };
        live.publish_expiry(unix_now());
        Ok(Arc::new(live))
    }

    fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The secret the inbound side's QUIC stateless-reset key is derived from: the private key
    /// on disk when this process started, for its whole lifetime. Resets must be provable by a
    /// restarted sidecar at the same address, and only a secret it shares with its predecessor
    /// can do that; the key on disk at its start is the same one unless the key itself was
    /// rotated in between (cert-manager's `rotationPolicy: Never` keeps it across renewals).
    /// When it was, the peers' dead-connection detection takes over (half a second).
    pub fn reset_secret(&self) -> &[u8] {
        &self.reset_secret
    }

    /// Our own SPIFFE ID (the current leaf's).
    pub fn identity(&self) -> Option<String> {
        self.active().identity.clone()
    }

    /// Reads the files and swaps in a changed set when it is valid. `rejected` remembers the
    /// last refused set, so a bad set is reported once, not once a second.
    pub fn reload(&self, rejected: &mut Option<[u8; 32]>) -> Reload {
        let files = match TlsFiles::read_stable(&self.paths) {
            Ok(files) => files,
            Err(error) => {
                // Unreadable: fingerprinted by the error, so the same failure is told once.
                let marker =
                    ring::digest::digest(&ring::digest::SHA256, error.to_string().as_bytes());
                let mut fingerprint = [0u8; 32];
                fingerprint.copy_from_slice(marker.as_ref());
                return self.refuse(fingerprint, error, rejected);
            }
        };
        let fingerprint = files.fingerprint();
        if fingerprint == self.active().fingerprint {
            *rejected = None;
            return Reload::Unchanged;
        }
        match Active::new(&files, &self.paths) {
            Ok(active) => {
                *self
                    .active
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(active);
                *rejected = None;
                Reload::Applied
            }
            Err(error) => self.refuse(fingerprint, error, rejected),
        }
    }

    fn refuse(
        &self,
        fingerprint: [u8; 32],
        error: TlsError,
        rejected: &mut Option<[u8; 32]>,
    ) -> Reload {
        if *rejected == Some(fingerprint) {
            return Reload::StillRejected;
        }
        *rejected = Some(fingerprint);
        Reload::Rejected(error)
    }

    /// Sets the expiry gauge; returns what to tell the operator.
    fn publish_expiry(&self, now: i64) -> Option<(ExpiryNotice, i64)> {
        let (not_before, not_after) = self.active().validity?;
        metrics().tls_cert_expiry.set((not_after - now) as f64);
        Some((expiry_notice(not_before, not_after, now), not_after - now))
    }

    /// The inbound side: requires a client certificate from the current CA and presents the
    /// current certificate.
    fn server_config(self: &Arc<Self>, alpns: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Build(e.to_string()))?
            .with_client_cert_verifier(Arc::new(LiveClientVerifier(self.clone())))
            .with_cert_resolver(Arc::new(LiveResolver(self.clone())));
        config.alpn_protocols = alpns.iter().map(|alpn| alpn.to_vec()).collect();
        Ok(config)
    }

    /// The outbound side: verifies the upstream against the current CA and presents the
    /// current certificate.
    fn client_config(self: &Arc<Self>, alpns: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Build(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LiveServerVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(LiveResolver(self.clone())));
        config.alpn_protocols = alpns.iter().map(|alpn| alpn.to_vec()).collect();
        Ok(config)
    }

    pub fn quic_server_config(self: &Arc<Self>) -> Result<QuicServerConfig, TlsError> {
        QuicServerConfig::try_from(self.server_config(&QUIC_ALPNS)?)
            .map_err(|e| TlsError::Build(e.to_string()))
    }

    pub fn quic_client_config(self: &Arc<Self>) -> Result<QuicClientConfig, TlsError> {
        QuicClientConfig::try_from(self.client_config(&QUIC_ALPNS)?)
            .map_err(|e| TlsError::Build(e.to_string()))
    }

    /// The inbound side of the HTTP/2 fallback over TCP (see [`crate::wire::h2_peer`]).
    pub fn tcp_server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        Ok(Arc::new(
            self.server_config(&[crate::wire::h2_peer::ALPN_H2])?,
        ))
    }

    /// The outbound side of the HTTP/2 fallback over TCP.
    pub fn tcp_client_config(self: &Arc<Self>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        Ok(Arc::new(
            self.client_config(&[crate::wire::h2_peer::ALPN_H2])?,
        ))
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0)
}

/// Follows the `tls` files every [`POLL`] until `shutdown` turns true: applies valid new sets,
/// refuses bad ones (logged once, counted, the old set stays), keeps the expiry gauge current
/// and warns once per leaf as it nears expiry.
pub async fn watch(live: Arc<LiveTls>, mut shutdown: tokio_watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rejected = None;
    // The leaf (by fingerprint) and notice last told, so each is told once.
    let mut told: Option<([u8; 32], ExpiryNotice)> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        // Small files, but still blocking reads: off the runtime's threads.
        let reader = live.clone();
        let (outcome, rejected_now) = match tokio::task::spawn_blocking(move || {
            let outcome = reader.reload(&mut rejected);
            (outcome, rejected)
        })
        .await
        {
            Ok(result) => result,
            Err(_) => return,
        };
        rejected = rejected_now;
        let result = match &outcome {
            Reload::Applied => {
                let active = live.active();
                tracing::info!(
                    identity = active.identity.as_deref().unwrap_or("-"),
                    expires_in_s = active.validity.map(|(_, after)| after - unix_now()),
                    "new TLS certificate set applied; new handshakes use it"
                );
                Some("applied")
            }
            Reload::Rejected(error) => {
                tracing::error!(%error, "new TLS certificate set rejected; the previous set stays in use");
                Some("rejected")
            }
            Reload::Unchanged | Reload::StillRejected => None,
        };
        if let Some(result) = result {
            metrics()
                .tls_reloads
                .get_or_create(&ResultLabels { result })
                .inc();
        }
        let fingerprint = live.active().fingerprint;
        if let Some((notice, remaining)) = live.publish_expiry(unix_now()) {
            let key = (fingerprint, notice);
            if notice != ExpiryNotice::Fine && told != Some(key) {
                told = Some(key);
                match notice {
                    ExpiryNotice::Soon => tracing::warn!(
                        expires_in_s = remaining,
                        "TLS certificate expires soon and has not been renewed"
                    ),
                    _ => tracing::error!(
                        expired_s_ago = -remaining,
                        "TLS certificate has expired; peers will refuse new handshakes"
                    ),
                }
            }
        }
    }
}

/// Presents the current certificate, as server and as client.
#[derive(Debug)]
struct LiveResolver(Arc<LiveTls>);

impl ResolvesServerCert for LiveResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.active().certified.clone())
    }
}

impl ResolvesClientCert for LiveResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.active().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates against the current CA.
#[derive(Debug)]
struct LiveClientVerifier(Arc<LiveTls>);

impl ClientCertVerifier for LiveClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional in TLS 1.3, and every peer has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .active()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .active()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .active()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.active().client_verifier.supported_verify_schemes()
    }
}

/// Verifies upstream certificates against the current CA.
#[derive(Debug)]
struct LiveServerVerifier(Arc<LiveTls>);

impl ServerCertVerifier for LiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.active().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .active()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .active()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.active().server_verifier.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::certs::{write_dev_certs, CertRequest};

    fn dev_certs(dir: &Path, existing_ca: Option<PathBuf>) -> TlsPaths {
        dev_certs_with(dir, existing_ca, vec![])
    }

    fn dev_certs_with(
        dir: &Path,
        existing_ca: Option<PathBuf>,
        identities: Vec<String>,
    ) -> TlsPaths {
        write_dev_certs(&CertRequest {
            out: dir.to_path_buf(),
            extra_names: vec![],
            existing_ca,
            common_name: "test".to_string(),
            identities,
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
        let live = LiveTls::load(&dev_certs(dir.path(), None)).unwrap();
        live.quic_server_config().unwrap();
        live.quic_client_config().unwrap();
    }

    /// Real QUIC handshakes on loopback: two sidecars settle on their newest HTTP/3 convention,
    /// a sidecar of the version before on the one it knows, and a peer offering only plain
    /// `h3` is served plain HTTP/3.
    #[tokio::test]
    async fn sidecars_agree_on_their_h3_convention_and_a_plain_h3_peer_gets_plain_h3() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let live = LiveTls::load(&dev_certs(dir.path(), None)).unwrap();
        let server_crypto = Arc::new(live.quic_server_config().unwrap());
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(server_crypto),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let address = server.local_addr().unwrap();
        let offering = |alpns: &[&[u8]]| {
            QuicClientConfig::try_from(live.client_config(alpns).unwrap()).unwrap()
        };
        use crate::wire::quic::HopConvention;
        for (client_crypto, agreed) in [
            (
                live.quic_client_config().unwrap(),
                HopConvention::GrpcDefaultsAndFieldMemory,
            ),
            // The sidecar version before field memory.
            (
                offering(&[ALPN_H3_SIDECAR, ALPN_H3]),
                HopConvention::GrpcDefaults,
            ),
            (offering(&[ALPN_H3]), HopConvention::PlainH3),
        ] {
            let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            client.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_crypto)));
            let connecting = client
                .connect(address, crate::config::DEFAULT_SERVER_NAME)
                .unwrap();
            let accepting = async { server.accept().await.unwrap().await };
            let (ours, theirs) = tokio::join!(connecting, accepting);
            let (ours, theirs) = (ours.unwrap(), theirs.unwrap());
            assert_eq!(crate::wire::quic::hop_convention(&ours), agreed);
            assert_eq!(crate::wire::quic::hop_convention(&theirs), agreed);
            ours.close(0u32.into(), b"done");
        }
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

    #[test]
    fn identity_is_the_leafs_spiffe_uri() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let id = "spiffe://cluster.local/ns/default/sa/echo".to_string();
        let paths = dev_certs_with(dir.path(), None, vec![id.clone()]);
        assert_eq!(TlsMaterial::load(&paths).unwrap().identity(), Some(id));
        let plain = tempfile::tempdir().unwrap();
        assert_eq!(
            TlsMaterial::load(&dev_certs(plain.path(), None))
                .unwrap()
                .identity(),
            None
        );
    }

    #[test]
    fn a_good_new_set_applies_and_a_bad_one_is_refused_once_keeping_the_old() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let paths = dev_certs(dir.path(), None);
        let live = LiveTls::load(&paths).unwrap();
        let mut rejected = None;
        assert!(matches!(live.reload(&mut rejected), Reload::Unchanged));
        let before = live.active().fingerprint;
        // A key from elsewhere: refused, told once, the old set stays.
        let other = tempfile::tempdir().unwrap();
        std::fs::copy(dev_certs(other.path(), None).key, &paths.key).unwrap();
        assert!(matches!(
            live.reload(&mut rejected),
            Reload::Rejected(TlsError::KeyMismatch { .. })
        ));
        assert!(matches!(live.reload(&mut rejected), Reload::StillRejected));
        assert_eq!(live.active().fingerprint, before);
        // A whole new set from the same CA: applied.
        dev_certs(dir.path(), Some(dir.path().to_path_buf()));
        assert!(matches!(live.reload(&mut rejected), Reload::Applied));
        assert_ne!(live.active().fingerprint, before);
    }

    #[test]
    fn expiry_is_told_once_a_third_of_the_lifetime_is_left() {
        assert_eq!(expiry_notice(0, 90, 50), ExpiryNotice::Fine);
        assert_eq!(expiry_notice(0, 90, 61), ExpiryNotice::Soon);
        assert_eq!(expiry_notice(0, 90, 90), ExpiryNotice::Expired);
    }
}
