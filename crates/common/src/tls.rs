//! TLS for gpuq, on rustls with the ring provider: the HTTPS listener's certificate
//! ([`server_acceptor`], served by `http::serve`) and the [`Trust`] of every outgoing TLS
//! connection — `amqps://`, `rediss://`, MongoDB with `tls=true`, `https://` — which is the
//! system's roots plus the CA file `GPUQ_TLS_CA_FILE` names. A process sets its trust once at
//! start (`config::startup`, the CLI); the connection code reads it with [`trust`], and every
//! HTTP client starts from [`http_client_builder`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
pub use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// The one crypto provider gpuq uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default provider, for the libraries that build their own rustls
/// configuration (the Redis client). Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every certificate of a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The acceptor of an HTTPS listener: the certificate chain of `cert_file` (the server's first,
/// then its intermediates) with the private key of `key_file`, both PEM; HTTP/1.1 by ALPN.
pub fn server_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| file_error(key_file, format!("no PEM private key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| file_error(cert_file, format!("does not go with {key_file:?}: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Which servers outgoing TLS connections accept: the system's roots, plus the certificates of
/// a CA file (a private CA that signs the broker's, Redis's, MongoDB's and the services'
/// certificates). `rediss://` is the exception: with a CA file, Redis trusts only it.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    ca_file: Option<PathBuf>,
    ca_pem: Option<String>,
    ca_certs: Vec<CertificateDer<'static>>,
}

impl Trust {
    /// The system's roots and those of `ca_file` (PEM, one or more certificates).
    pub fn with_ca_file(ca_file: &Path) -> Result<Self, TlsError> {
        let ca_certs = read_certs(ca_file)?;
        let ca_pem = std::fs::read_to_string(ca_file).map_err(|e| file_error(ca_file, e))?;
        Ok(Self {
            ca_file: Some(ca_file.to_path_buf()),
            ca_pem: Some(ca_pem),
            ca_certs,
        })
    }

    /// [`Trust::with_ca_file`] when a file is named, else the system's roots only.
    pub fn load(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        ca_file.map_or_else(|| Ok(Self::default()), Self::with_ca_file)
    }

    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The CA file's text (what lapin and the Redis client take).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// A rustls client configuration with these roots (what reqwest takes).
    pub fn client_config(&self) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        // Unreadable system certificates are skipped: the CA file may be all that is needed.
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        roots.add_parsable_certificates(self.ca_certs.iter().cloned());
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports rustls's default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}

/// The start of every gpuq HTTP client: reqwest with the process's trust ([`trust`]) for
/// `https://`. (reqwest's own default would panic: it has no crypto provider in this build.)
pub fn http_client_builder() -> reqwest::ClientBuilder {
    http_client_builder_trusting(trust())
}

/// [`http_client_builder`] with an explicit trust.
#[allow(clippy::disallowed_methods)]
pub fn http_client_builder_trusting(trust: &Trust) -> reqwest::ClientBuilder {
    reqwest::Client::builder().tls_backend_preconfigured(trust.client_config())
}

static TRUST: OnceLock<Trust> = OnceLock::new();

/// Sets the process's trust, once, at start (before any connection reads it); answers false
/// if it was already set or read.
pub fn set_trust(trust: Trust) -> bool {
    install_provider();
    TRUST.set(trust).is_ok()
}

/// The process's trust: what [`set_trust`] set, else the system's roots.
pub fn trust() -> &'static Trust {
    TRUST.get_or_init(|| {
        install_provider();
        Trust::default()
    })
}

/// A throwaway CA and a server certificate it signs (for `localhost` and 127.0.0.1), made
/// with the `openssl` command in `dir`: `(ca.pem, server.pem, server.key)`.
#[cfg(test)]
pub(crate) fn test_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_and_a_server_certificate_it_signs_load() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = test_certs(dir.path());
        let t = Trust::with_ca_file(&ca).unwrap();
        assert_eq!(t.ca_file(), Some(ca.as_path()));
        assert!(t.ca_pem().unwrap().contains("BEGIN CERTIFICATE"));
        server_acceptor(&cert, &key).unwrap();
        // A key that does not go with the certificate is refused.
        let e = server_acceptor(&ca, &key).err().unwrap().to_string();
        assert!(e.contains("does not go with"), "{e}");
    }

    #[test]
    fn a_file_without_a_certificate_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = Trust::with_ca_file(&empty).unwrap_err().to_string();
        assert!(
            e.contains("ca.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = Trust::with_ca_file(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let e = server_acceptor(&empty, &empty).err().unwrap().to_string();
        assert!(e.contains("ca.pem"), "{e}");
    }

    #[test]
    fn no_ca_file_means_the_system_roots_only() {
        let t = Trust::load(None).unwrap();
        assert!(t.ca_file().is_none() && t.ca_pem().is_none());
        // Builds without a CA file (and without any system roots, as in a bare container).
        let _ = t.client_config();
    }
}
