//! TLS for the connections capy makes to target clusters with tokio-postgres: libpq's
//! `sslmode` (`disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full`) read
//! from the URL, a cluster's CA certificate (PEM, registered with the cluster) as the
//! trust root, rustls underneath. The control database goes through sqlx, whose own
//! rustls support reads the same parameters (`sslrootcert` there is a file).
//!
//! Whatever the mode, the server's certificate is checked against the roots and the
//! outcome recorded, so a report can say whether it verified; the mode decides only
//! whether a failed check ends the connection.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as WireSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`. `allow` is taken as `prefer`: TLS is tried first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const ALL: [SslMode; 6] = [
        Self::Disable,
        Self::Allow,
        Self::Prefer,
        Self::Require,
        Self::VerifyCa,
        Self::VerifyFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate must verify (chain, and for `verify-full` name).
    pub fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }

    fn wire(self) -> WireSslMode {
        match self {
            Self::Disable => WireSslMode::Disable,
            Self::Allow | Self::Prefer => WireSslMode::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => WireSslMode::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsConfigError {
    #[error("sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full")]
    UnknownSslMode,
    #[error("the URL is not a valid PostgreSQL URL")]
    InvalidUrl,
    #[error(
        "sslrootcert names a file, which workers do not share: register the CA certificate \
         with the cluster (ca_pem) instead"
    )]
    RootCertFile,
    #[error("{0} (client certificates) is not supported")]
    ClientCertificate(&'static str),
    #[error("ca_pem holds no PEM certificate")]
    NoCertificate,
    #[error("ca_pem must hold certificates only, not a {0} (it is served publicly)")]
    NotACertificate(String),
    #[error("sslmode=verify-ca needs the cluster's CA certificate (ca_pem): against the public web roots it would accept any host's certificate")]
    VerifyCaWithoutCa,
    #[error("ca_pem is not valid PEM: {0}")]
    InvalidPem(String),
    #[error("ca_pem holds a certificate that is not a valid CA certificate: {0}")]
    InvalidCertificate(String),
}

impl FromStr for SslMode {
    type Err = TlsConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str() == text)
            .ok_or(TlsConfigError::UnknownSslMode)
    }
}

/// The certificates of a PEM bundle, checked to be usable as trust roots. A bundle
/// holding anything but certificates (a private key pasted with its certificate) is
/// refused: the PEM is served to anyone as the cluster's CA.
pub fn parse_ca_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    if pem.contains('\0') {
        return Err(TlsConfigError::InvalidPem("it holds a NUL byte".into()));
    }
    if let Some(label) = pem
        .lines()
        .filter_map(|line| line.trim().strip_prefix("-----BEGIN "))
        .find(|label| *label != "CERTIFICATE-----")
    {
        return Err(TlsConfigError::NotACertificate(
            label.trim_end_matches('-').to_string(),
        ));
    }
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::InvalidPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate);
    }
    let mut store = RootCertStore::empty();
    for cert in &certs {
        store
            .add(cert.clone())
            .map_err(|e| TlsConfigError::InvalidCertificate(e.to_string()))?;
    }
    Ok(certs)
}

/// A cluster URL split into what tokio-postgres reads and the TLS settings it does
/// not (`verify-ca`, `verify-full`).
pub struct ClusterUrl {
    pub config: tokio_postgres::Config,
    pub ssl_mode: SslMode,
}

/// Parses a `postgres://` URL; `default_mode` applies when it has no `sslmode`.
pub fn parse_url(url: &str, default_mode: SslMode) -> Result<ClusterUrl, TlsConfigError> {
    let mut parsed = url::Url::parse(url).map_err(|_| TlsConfigError::InvalidUrl)?;
    // libpq reads '+' in a URL literally; form decoding (query_pairs) would make it a
    // space.
    let literal_plus = parsed.query().map(|q| q.replace('+', "%2B"));
    parsed.set_query(literal_plus.as_deref());
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(TlsConfigError::InvalidUrl);
    }
    let mut ssl_mode = default_mode;
    let mut kept = Vec::new();
    for (key, value) in parsed.query_pairs() {
        match key.as_ref() {
            "sslmode" => ssl_mode = value.parse()?,
            "sslrootcert" => return Err(TlsConfigError::RootCertFile),
            "sslcert" => return Err(TlsConfigError::ClientCertificate("sslcert")),
            "sslkey" => return Err(TlsConfigError::ClientCertificate("sslkey")),
            _ => kept.push((key.into_owned(), value.into_owned())),
        }
    }
    parsed.set_query(None);
    if !kept.is_empty() {
        parsed.query_pairs_mut().extend_pairs(kept);
        // Form encoding writes a space as '+', which libpq's URL syntax (and
        // tokio-postgres) reads as a plus; a literal '+' is already '%2B'.
        let query = parsed.query().map(|q| q.replace('+', "%20"));
        parsed.set_query(query.as_deref());
    }
    let mut config: tokio_postgres::Config = parsed
        .as_str()
        .parse()
        .map_err(|_| TlsConfigError::InvalidUrl)?;
    config.ssl_mode(ssl_mode.wire());
    Ok(ClusterUrl { config, ssl_mode })
}

/// The mode of a cluster URL when it names none: verify when a CA was registered (the
/// operator gave something to verify against), else libpq's `prefer`.
pub fn default_mode(ca_pem: Option<&str>) -> SslMode {
    if ca_pem.is_some() {
        SslMode::VerifyFull
    } else {
        SslMode::Prefer
    }
}

/// What the server's certificate check found, when a TLS handshake happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    Verified,
    /// Signed by the roots but for another host name.
    NameMismatch,
    /// Not signed by the roots (or self-signed).
    Untrusted,
    /// Expired, not yet valid, revoked or otherwise unusable.
    Invalid(String),
}

impl Verification {
    /// The `error_kind` a refused connection reports.
    pub fn error_kind(&self) -> &'static str {
        match self {
            Self::Verified => "tls",
            Self::NameMismatch => "tls_name_mismatch",
            Self::Untrusted => "tls_untrusted_certificate",
            Self::Invalid(_) => "tls_invalid_certificate",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Verified => "the server's certificate verified".into(),
            Self::NameMismatch => {
                "the server's certificate is not valid for the host connected to".into()
            }
            Self::Untrusted => {
                "the server's certificate is not signed by the cluster's CA certificate".into()
            }
            Self::Invalid(reason) => format!("the server's certificate is not valid: {reason}"),
        }
    }

    fn of(result: &Result<ServerCertVerified, rustls::Error>) -> Self {
        match result {
            Ok(_) => Self::Verified,
            Err(rustls::Error::InvalidCertificate(error)) => match error {
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Self::NameMismatch,
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::Untrusted,
                other => Self::Invalid(format!("{other:?}")),
            },
            Err(other) => Self::Invalid(other.to_string()),
        }
    }
}

/// A connector for one connection attempt, and what its handshake found.
pub struct Connector {
    pub tls: MakeRustlsConnect,
    outcome: Arc<Mutex<Option<Verification>>>,
}

impl Connector {
    /// `ca` are the trust roots; none means the public web roots (Mozilla's).
    pub fn new(mode: SslMode, ca: &[CertificateDer<'static>]) -> Result<Self, TlsConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        if ca.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for cert in ca {
            roots
                .add(cert.clone())
                .map_err(|e| TlsConfigError::InvalidCertificate(e.to_string()))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsConfigError::InvalidCertificate(e.to_string()))?;
        let outcome = Arc::new(Mutex::new(None));
        let verifier = RecordingVerifier {
            webpki,
            mode,
            provider: provider.clone(),
            outcome: outcome.clone(),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError::InvalidCertificate(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Self {
            tls: MakeRustlsConnect::new(config),
            outcome,
        })
    }

    /// The certificate check of the handshake; None when no TLS handshake took place.
    pub fn verification(&self) -> Option<Verification> {
        self.outcome.lock().ok().and_then(|guard| guard.clone())
    }
}

/// Checks the certificate as `verify-full` would, records the outcome, and fails the
/// handshake only where the mode asks.
struct RecordingVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    mode: SslMode,
    provider: Arc<CryptoProvider>,
    outcome: Arc<Mutex<Option<Verification>>>,
}

impl fmt::Debug for RecordingVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingVerifier")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let verification = Verification::of(&result);
        if let Ok(mut slot) = self.outcome.lock() {
            *slot = Some(verification.clone());
        }
        match (self.mode, verification) {
            (SslMode::VerifyFull, _) => result,
            (SslMode::VerifyCa, Verification::NameMismatch) => Ok(ServerCertVerified::assertion()),
            (SslMode::VerifyCa, _) => result,
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// A cluster's admin URL and CA certificate, ready to connect with.
pub struct ClusterTarget {
    pub config: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    pub ca: Vec<CertificateDer<'static>>,
}

impl ClusterTarget {
    pub fn new(admin_url: &str, ca_pem: Option<&str>) -> Result<Self, TlsConfigError> {
        let ClusterUrl { config, ssl_mode } = parse_url(admin_url, default_mode(ca_pem))?;
        let ca = ca_pem.map(parse_ca_pem).transpose()?.unwrap_or_default();
        if ssl_mode == SslMode::VerifyCa && ca.is_empty() {
            return Err(TlsConfigError::VerifyCaWithoutCa);
        }
        Ok(Self {
            config,
            ssl_mode,
            ca,
        })
    }

    /// Connects with `config` (this target's, adjusted by the caller) and spawns the
    /// connection's task. Answers what the certificate check found, None when the
    /// session is not encrypted.
    pub async fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, Option<Verification>), ConnectFailure> {
        let connector = Connector::new(self.ssl_mode, &self.ca).map_err(ConnectFailure::Config)?;
        match config.connect(connector.tls.clone()).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok((client, connector.verification()))
            }
            Err(error) => {
                let tls = failure(&error, self.ssl_mode, connector.verification().as_ref());
                Err(ConnectFailure::Postgres { error, tls })
            }
        }
    }
}

#[derive(Debug)]
pub enum ConnectFailure {
    Config(TlsConfigError),
    /// `tls` is `(error_kind, message)` when TLS was the reason.
    Postgres {
        error: tokio_postgres::Error,
        tls: Option<(&'static str, String)>,
    },
}

/// Why a connection failed, when TLS was the reason: `(error_kind, message)`.
pub fn failure(
    error: &tokio_postgres::Error,
    mode: SslMode,
    verification: Option<&Verification>,
) -> Option<(&'static str, String)> {
    // verify-ca takes a certificate for another name: the check passed.
    let accepted = |v: &Verification| {
        *v == Verification::Verified
            || (mode == SslMode::VerifyCa && *v == Verification::NameMismatch)
    };
    if let Some(found) = verification.filter(|v| !accepted(v)) {
        if mode.verifies() {
            return Some((
                found.error_kind(),
                format!("{} (sslmode={mode})", found.describe()),
            ));
        }
    }
    let text = error.to_string();
    if text.contains("server does not support TLS") {
        return Some((
            "tls_unsupported",
            format!("the server does not offer TLS, which sslmode={mode} requires"),
        ));
    }
    // tokio-postgres's error for a failed handshake.
    if text.contains("error performing TLS handshake") {
        return Some(("tls_handshake", format!("the TLS handshake failed: {text}")));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_unknown_is_refused() {
        for mode in SslMode::ALL {
            assert_eq!(mode.as_str().parse::<SslMode>(), Ok(mode));
        }
        assert_eq!(
            "verify_full".parse::<SslMode>(),
            Err(TlsConfigError::UnknownSslMode)
        );
    }

    #[test]
    fn url_keeps_other_parameters_and_reads_the_mode() {
        let url = parse_url(
            "postgres://u:p@db.example:6000/x?sslmode=verify-full&application_name=a&options=-c%20x%3Dy%2B1",
            SslMode::Prefer,
        )
        .expect("parses");
        assert_eq!(url.ssl_mode, SslMode::VerifyFull);
        assert_eq!(url.config.get_application_name(), Some("a"));
        assert_eq!(url.config.get_options(), Some("-c x=y+1"));
        let plus =
            parse_url("postgres://u:p@h/x?options=-c%20a%3Db+c", SslMode::Prefer).expect("parses");
        assert_eq!(plus.config.get_options(), Some("-c a=b+c"));
        assert_eq!(url.config.get_ssl_mode(), WireSslMode::Require);
        let plain = parse_url("postgres://u:p@h/x", SslMode::Prefer).expect("parses");
        assert_eq!(plain.ssl_mode, SslMode::Prefer);
        assert_eq!(
            parse_url("postgres://u:p@h/x?sslrootcert=/tmp/ca", SslMode::Prefer).err(),
            Some(TlsConfigError::RootCertFile)
        );
        assert_eq!(
            parse_url("postgres://u:p@h/x?sslmode=bogus", SslMode::Prefer).err(),
            Some(TlsConfigError::UnknownSslMode)
        );
    }

    #[test]
    fn a_private_key_in_the_bundle_is_refused() {
        let bundle = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\
                      -----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            parse_ca_pem(bundle),
            Err(TlsConfigError::NotACertificate("PRIVATE KEY".into()))
        );
        assert!(matches!(
            ClusterTarget::new("postgres://u:p@h/x?sslmode=verify-ca", None),
            Err(TlsConfigError::VerifyCaWithoutCa)
        ));
    }

    #[test]
    fn malformed_pem_is_refused() {
        assert_eq!(parse_ca_pem("hello"), Err(TlsConfigError::NoCertificate));
        let broken = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse_ca_pem(broken),
            Err(TlsConfigError::InvalidPem(_) | TlsConfigError::InvalidCertificate(_))
        ));
    }
}
