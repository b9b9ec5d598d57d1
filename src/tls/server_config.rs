//! The rustls `ServerConfig` for the broker's listener, built from PEM files.
//!
//! Built here rather than with tonic's `ServerTlsConfig`, which cannot take CRLs.
//! Invariants: ring is the only crypto provider; TLS 1.2 and 1.3 only; ALPN `h2`
//! (strict gRPC clients refuse a connection without it); client certificates must
//! chain to the configured CA bundle and, when CRLs are configured, must not be
//! revoked, and their issuer's CRL must be current (stale CRLs fail closed); a
//! client may present no certificate and is then refused per request (see
//! [`super::PeerInfo`]). Sessions are never resumed, so every connection's
//! certificate is checked in full against the CRLs and validity dates of the
//! moment.
//!
//! Once any CRL is configured, revocation is checked for the whole client
//! chain: every CA that issues client certificates (and every intermediate's
//! issuer) needs a current CRL in `[tls] crl`, or its certificates are refused
//! as "revocation status unknown" — failing closed rather than open.

use std::io::{self, BufReader};
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};

use super::crl::{load_crls, RevokedSerials};
use super::TlsError;
use crate::config::TlsConfig;

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

/// Builds the server configuration from the files `tls` names: trust anchors
/// for client certificates from the CA bundle `ca` (one or more certificates),
/// the server chain from `cert` (leaf first), its private key from `key`, and
/// the CRLs of every file in `crl`.
///
/// Errors name the file and what is wrong with it: missing, no certificate in it,
/// no private key, a key that does not match the certificate, an unusable CRL.
pub fn load_server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    load(tls).map(|loaded| loaded.server)
}

/// What one load of the `[tls]` files yields.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub server: Arc<ServerConfig>,
    pub revoked: RevokedSerials,
    pub crls: usize,
}

pub(crate) fn load(tls: &TlsConfig) -> Result<Loaded, TlsError> {
    let (ca, cert, key) = (&tls.ca, &tls.cert, &tls.key);
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
    let crls = load_crls(&tls.crl)?;
    let crl_count = crls.ders.len();
    let verifier = client_verifier(roots, crls.ders, &provider).map_err(|source| {
        TlsError::ClientVerifier {
            ca: ca.to_path_buf(),
            source,
        }
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
    // A resumed session skips client certificate verification: a certificate
    // revoked or expired since, or a CRL gone stale, would go unnoticed.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Loaded {
        server: Arc::new(config),
        revoked: crls.revoked,
        crls: crl_count,
    })
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

pub(crate) fn open(path: &Path) -> Result<BufReader<std::fs::File>, TlsError> {
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
    use crate::tls::crl::tests::crl_pem;
    use rustls::pki_types::UnixTime;
    use std::path::PathBuf;

    struct Files {
        _tmp: tempfile::TempDir,
        ca: CertificateAuthority,
        tls: TlsConfig,
    }

    fn files() -> Files {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let server = ca.issue_server(&["localhost".to_string()]).unwrap();
        let tls = TlsConfig {
            ca: tmp.path().join("ca.pem"),
            cert: tmp.path().join("server.pem"),
            key: tmp.path().join("server.key"),
            ..TlsConfig::default()
        };
        write_pem(&tls.ca, &ca.cert_pem(), false).unwrap();
        write_pem(&tls.cert, &server.cert_pem, false).unwrap();
        write_pem(&tls.key, &server.key_pem, true).unwrap();
        Files { _tmp: tmp, ca, tls }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    fn with_crl(f: &Files, pem: &str) -> TlsConfig {
        let path: PathBuf = f.tls.ca.with_file_name("ca.crl");
        std::fs::write(&path, pem).unwrap();
        TlsConfig {
            crl: vec![path],
            ..f.tls.clone()
        }
    }

    #[test]
    fn loads_a_config_that_offers_h2_and_never_resumes() {
        let f = files();
        let config = load_server_config(&f.tls).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(!config.session_storage.can_cache());
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let f = files();
        let missing = f.tls.ca.with_file_name("nope.pem");
        let tls = |ca: &Path, cert: &Path, key: &Path| TlsConfig {
            ca: ca.to_path_buf(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ..TlsConfig::default()
        };
        let (ca, cert, key) = (&f.tls.ca, &f.tls.cert, &f.tls.key);
        let err = load_server_config(&tls(&missing, cert, key)).unwrap_err();
        assert!(
            matches!(err, TlsError::Missing { ref path } if *path == missing),
            "{err}"
        );

        // A key file in place of the CA bundle holds no certificate.
        let err = load_server_config(&tls(key, cert, key)).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("server.key"));

        let err = load_server_config(&tls(ca, cert, cert)).unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");

        let err = load_server_config(&TlsConfig {
            crl: vec![missing.clone()],
            ..f.tls.clone()
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::Missing { .. }), "{err}");

        let other = CertificateAuthority::generate("other").unwrap();
        write_pem(key, &other.key_pem(), true).unwrap();
        let err = load_server_config(&tls(ca, cert, key)).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn client_verifier_checks_the_crl() {
        let f = files();
        let revoked = f.ca.issue_agency("police").unwrap();
        let good = f.ca.issue_agency("council").unwrap();
        let tls = with_crl(&f, &crl_pem(&f.ca, "test CA", &[&revoked.serial], 3600));
        let loaded = load(&tls).unwrap();
        assert_eq!((loaded.crls, loaded.revoked.len()), (1, 1));
        let verifier = client_verifier_of(&tls);
        let now = UnixTime::now();
        assert!(verifier
            .verify_client_cert(&der(&good.cert_pem), &[], now)
            .is_ok());
        assert_eq!(
            verifier
                .verify_client_cert(&der(&revoked.cert_pem), &[], now)
                .unwrap_err(),
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        );
    }

    #[test]
    fn a_stale_crl_fails_closed() {
        let f = files();
        let good = f.ca.issue_agency("council").unwrap();
        let tls = with_crl(&f, &crl_pem(&f.ca, "test CA", &[], -60));
        let err = client_verifier_of(&tls)
            .verify_client_cert(&der(&good.cert_pem), &[], UnixTime::now())
            .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ExpiredRevocationList
                        | rustls::CertificateError::ExpiredRevocationListContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    /// The verifier `load` builds, rebuilt the same way for direct checks.
    fn client_verifier_of(tls: &TlsConfig) -> Arc<dyn ClientCertVerifier> {
        let mut roots = RootCertStore::empty();
        for c in read_certs(&tls.ca).unwrap() {
            roots.add(c).unwrap();
        }
        let crls = load_crls(&tls.crl).unwrap();
        client_verifier(roots, crls.ders, &crypto_provider()).unwrap()
    }
}
