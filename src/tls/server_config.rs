//! The rustls `ServerConfig` for the broker's listener, built from PEM files.
//!
//! Built here rather than with tonic's `ServerTlsConfig`, which cannot take CRLs.
//! Invariants: ring is the only crypto provider; TLS 1.2 and 1.3 only; ALPN `h2`
//! (strict gRPC clients refuse a connection without it); client certificates must
//! chain to the configured CA bundle, but a client may present none and is then
//! refused per request (see [`super::PeerInfo`]).

use std::io::{self, BufReader};
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::TlsError;

/// The process's one crypto provider: ring.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default provider, for code that asks rustls
/// for the default. Calling it again (or after another install) is harmless.
pub fn install_crypto_provider() {
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
}

/// Builds the server configuration: trust anchors for client certificates from
/// the CA bundle at `ca` (one or more certificates), the server chain from `cert`
/// (leaf first) and its private key from `key`.
///
/// Errors name the file and what is wrong with it: missing, no certificate in it,
/// no private key, a key that does not match the certificate.
pub fn load_server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();

    let mut roots = RootCertStore::empty();
    for (index, ca_cert) in read_certs(ca)?.into_iter().enumerate() {
        roots
            .add(ca_cert)
            .map_err(|source| TlsError::BadCaCertificate {
                path: ca.to_path_buf(),
                index: index + 1,
                source,
            })?;
    }
    // CRL seam: once `[tls] crl` files are configured, load them here and pass them
    // in; `client_verifier` applies `with_crls` and `enforce_revocation_expiration`.
    let crls: Vec<CertificateRevocationListDer<'static>> = Vec::new();
    let verifier =
        client_verifier(roots, crls, &provider).map_err(|source| TlsError::ClientVerifier {
            ca: ca.to_path_buf(),
            source,
        })?;

    let chain = read_certs(cert)?;
    let private_key = read_private_key(key)?;
    // Load the key on its own first so a bad key is blamed on the key file.
    provider
        .key_provider
        .load_private_key(private_key.clone_key())
        .map_err(|source| TlsError::BadPrivateKey {
            path: key.to_path_buf(),
            source,
        })?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::ProtocolVersions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private_key)
        .map_err(|source| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                }
            }
            source => TlsError::BadServerCertificate {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            },
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client certificate verifier: chains to `roots`, allows clients without a
/// certificate (refused later, per request), and checks revocation when CRLs are
/// given, treating an expired CRL as an error.
fn client_verifier(
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::server::VerifierBuilderError> {
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated();
    if !crls.is_empty() {
        builder = builder.with_crls(crls).enforce_revocation_expiration();
    }
    builder.build()
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>, TlsError> {
    match std::fs::File::open(path) {
        Ok(file) => Ok(BufReader::new(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(TlsError::Missing {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(TlsError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// All certificates in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{write_pem, CertificateAuthority};

    struct Files {
        _tmp: tempfile::TempDir,
        ca: std::path::PathBuf,
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
    }

    fn files() -> Files {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let server = ca.issue_server(&["localhost".to_string()]).unwrap();
        let files = Files {
            ca: tmp.path().join("ca.pem"),
            cert: tmp.path().join("server.pem"),
            key: tmp.path().join("server.key"),
            _tmp: tmp,
        };
        write_pem(&files.ca, &ca.cert_pem(), false).unwrap();
        write_pem(&files.cert, &server.cert_pem, false).unwrap();
        write_pem(&files.key, &server.key_pem, true).unwrap();
        files
    }

    #[test]
    fn loads_a_config_that_offers_h2() {
        let f = files();
        let config = load_server_config(&f.ca, &f.cert, &f.key).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let f = files();
        let missing = f.ca.with_file_name("nope.pem");
        let err = load_server_config(&missing, &f.cert, &f.key).unwrap_err();
        assert!(
            matches!(err, TlsError::Missing { ref path } if *path == missing),
            "{err}"
        );

        // A key file in place of the CA bundle holds no certificate.
        let err = load_server_config(&f.key, &f.cert, &f.key).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("server.key"));

        let err = load_server_config(&f.ca, &f.cert, &f.cert).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");

        let other = CertificateAuthority::generate("other").unwrap();
        write_pem(&f.key, &other.key_pem(), true).unwrap();
        let err = load_server_config(&f.ca, &f.cert, &f.key).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }
}
