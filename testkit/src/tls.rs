//! A private CA and a server certificate for the test cluster (and its pooler), made
//! with rcgen when the cluster starts: `localhost` and `127.0.0.1` are the names it
//! holds, so `sslmode=verify-full` works against the cluster's address and a URL
//! naming any other host fails verification.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// Files of a private CA and of one server certificate it signed.
#[derive(Debug, Clone)]
pub struct TestCertificates {
    pub ca_pem: String,
    pub ca_path: PathBuf,
    pub server_cert_path: PathBuf,
    pub server_key_path: PathBuf,
}

impl TestCertificates {
    /// Writes `ca.crt`, `server.crt` and `server.key` (0600) into `dir`.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "capy test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().context("generating the test CA's key")?;
        let ca = ca_params.self_signed(&ca_key)?;

        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_key = KeyPair::generate().context("generating the server's key")?;
        let server = server_params.signed_by(&server_key, &ca, &ca_key)?;

        let certificates = Self {
            ca_pem: ca.pem(),
            ca_path: dir.join("ca.crt"),
            server_cert_path: dir.join("server.crt"),
            server_key_path: dir.join("server.key"),
        };
        std::fs::write(&certificates.ca_path, &certificates.ca_pem)?;
        std::fs::write(&certificates.server_cert_path, server.pem())?;
        write_key(&certificates.server_key_path, &server_key.serialize_pem())?;
        Ok(certificates)
    }
}

/// PostgreSQL refuses a key file others may read.
fn write_key(path: &Path, pem: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    Ok(())
}
