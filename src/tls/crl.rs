//! Certificate revocation lists from the `[tls] crl` PEM files.
//!
//! Each file is read twice over: as DER for rustls, which checks every client
//! certificate against it during the handshake (and refuses all certificates of
//! an issuer whose CRL is past its next update), and parsed with x509-parser
//! into [`RevokedSerials`], the (issuer, serial) pairs used to close
//! connections that were opened before their certificate was revoked.
//!
//! Invariants: every configured file must hold at least one CRL and every CRL
//! must parse, or loading fails (and a reload keeps the previous set). A CRL
//! that is already stale is loaded, so handshakes fail closed, and a warning
//! names it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateRevocationListDer;
use tracing::warn;

use super::server_config::open;
use super::TlsError;

/// Serials revoked by the loaded CRLs, keyed by the DER of their issuer's name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RevokedSerials {
    /// (issuer name DER, serial number DER content bytes).
    revoked: HashSet<(Vec<u8>, Vec<u8>)>,
}

impl RevokedSerials {
    /// Whether the certificate with this issuer name (DER) and serial (DER
    /// content bytes, as x509-parser's `raw_serial`) is revoked.
    pub fn contains(&self, issuer: &[u8], serial: &[u8]) -> bool {
        // Borrowed lookup without allocating would need a custom key type; the
        // set is consulted once per live connection per reload, so clone.
        self.revoked.contains(&(issuer.to_vec(), serial.to_vec()))
    }

    /// Number of revoked (issuer, serial) pairs.
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    /// Whether no certificate is revoked.
    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn from_pairs(pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Self {
        Self {
            revoked: pairs.into_iter().collect(),
        }
    }
}

/// The CRLs of all configured files.
#[derive(Debug, Default)]
pub(crate) struct LoadedCrls {
    /// DER of every CRL, for the rustls client verifier.
    pub ders: Vec<CertificateRevocationListDer<'static>>,
    /// What they revoke.
    pub revoked: RevokedSerials,
}

/// Reads every CRL in every file of `paths` (PEM, `BEGIN X509 CRL` blocks).
pub(crate) fn load_crls(paths: &[PathBuf]) -> Result<LoadedCrls, TlsError> {
    let mut loaded = LoadedCrls::default();
    let now = unix_now();
    for path in paths {
        let ders = rustls_pemfile::crls(&mut open(path)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                path: path.clone(),
                source,
            })?;
        if ders.is_empty() {
            return Err(TlsError::NoCrl { path: path.clone() });
        }
        for (index, der) in ders.into_iter().enumerate() {
            let next_update =
                add_revoked(&der, &mut loaded.revoked).map_err(|reason| TlsError::BadCrl {
                    path: path.clone(),
                    index: index + 1,
                    reason,
                })?;
            if next_update.is_some_and(|next| next <= now) {
                warn!(
                    crl = %path.display(),
                    next_update = next_update.unwrap_or_default(),
                    "CRL is past its next update; client certificates of its issuer are refused \
                     until a current CRL is installed"
                );
            }
            loaded.ders.push(der);
        }
    }
    Ok(loaded)
}

/// Adds the serials one CRL revokes; returns its next update (Unix seconds).
fn add_revoked(der: &[u8], into: &mut RevokedSerials) -> Result<Option<i64>, String> {
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| e.to_string())?;
    let issuer = crl.issuer().as_raw().to_vec();
    for revoked in crl.iter_revoked_certificates() {
        into.revoked
            .insert((issuer.clone(), revoked.raw_serial().to_vec()));
    }
    Ok(crl.next_update().map(|t| t.timestamp()))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;
    use rcgen::{
        CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType, Issuer,
        KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };
    use std::time::Duration;

    /// A PEM CRL signed by `ca` (made by `CertificateAuthority::generate(cn)`)
    /// revoking `serials` (lowercase hex), next update `next_update_in` from
    /// now (negative: in the past).
    pub(crate) fn crl_pem(
        ca: &CertificateAuthority,
        cn: &str,
        serials: &[&str],
        next_update_in: i64,
    ) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = Issuer::new(params, KeyPair::from_pem(&ca.key_pem()).unwrap());
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let this_update = epoch + now - Duration::from_secs(7200);
        let next_update = if next_update_in >= 0 {
            epoch + now + Duration::from_secs(next_update_in.unsigned_abs())
        } else {
            epoch + now - Duration::from_secs(next_update_in.unsigned_abs())
        };
        let crl = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(s)),
                    revocation_time: this_update,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        crl.signed_by(&issuer).unwrap().pem().unwrap()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn ca_issuer_der(ca: &CertificateAuthority) -> Vec<u8> {
        let der = rustls_pemfile::certs(&mut ca.cert_pem().as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.subject().as_raw().to_vec()
    }

    #[test]
    fn reads_revoked_serials_with_their_issuer() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let a = ca.issue_agency("police").unwrap();
        let b = ca.issue_agency("council").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crl");
        std::fs::write(&path, crl_pem(&ca, "test CA", &[&a.serial], 3600)).unwrap();

        let loaded = load_crls(std::slice::from_ref(&path)).unwrap();
        assert_eq!(loaded.ders.len(), 1);
        assert_eq!(loaded.revoked.len(), 1);
        let issuer = ca_issuer_der(&ca);
        assert!(loaded.revoked.contains(&issuer, &unhex(&a.serial)));
        assert!(!loaded.revoked.contains(&issuer, &unhex(&b.serial)));
        assert!(!loaded
            .revoked
            .contains(b"another issuer", &unhex(&a.serial)));
    }

    #[test]
    fn several_files_and_an_empty_crl() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let other = CertificateAuthority::generate("other CA").unwrap();
        let a = ca.issue_agency("police").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one.crl"), dir.path().join("two.crl"));
        std::fs::write(&one, crl_pem(&ca, "test CA", &[&a.serial], 3600)).unwrap();
        std::fs::write(&two, crl_pem(&other, "other CA", &[], 3600)).unwrap();
        let loaded = load_crls(&[one, two]).unwrap();
        assert_eq!(loaded.ders.len(), 2);
        assert_eq!(loaded.revoked.len(), 1);
    }

    #[test]
    fn a_stale_crl_still_loads() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.crl");
        std::fs::write(&path, crl_pem(&ca, "test CA", &[], -60)).unwrap();
        assert_eq!(load_crls(&[path]).unwrap().ders.len(), 1);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.crl");
        assert!(matches!(
            load_crls(std::slice::from_ref(&missing)),
            Err(TlsError::Missing { path }) if path == missing
        ));

        let ca = CertificateAuthority::generate("test CA").unwrap();
        let not_crl = dir.path().join("ca.pem");
        std::fs::write(&not_crl, ca.cert_pem()).unwrap();
        let err = load_crls(std::slice::from_ref(&not_crl)).unwrap_err();
        assert!(matches!(err, TlsError::NoCrl { .. }), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");

        let garbage = dir.path().join("garbage.crl");
        std::fs::write(
            &garbage,
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .unwrap();
        let err = load_crls(std::slice::from_ref(&garbage)).unwrap_err();
        assert!(matches!(err, TlsError::BadCrl { index: 1, .. }), "{err}");
    }
}
