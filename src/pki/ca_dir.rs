//! A CA directory as `joinery pki` keeps it: `ca.pem` (0644) and `ca.key`
//! (0600), the CRL `ca.crl` (PEM, 0644) and the index of issued certificates
//! `issued.tsv` (0644, see [`super::index`]).
//!
//! Invariants:
//! - Every command that changes the directory holds an exclusive `flock` on it,
//!   so two operators (or an operator and cron) cannot interleave and lose an
//!   index line or a CRL number.
//! - A certificate is recorded in the index before its files are written, so no
//!   certificate exists that `revoke` cannot find.
//! - Revocation writes the index first and the CRL second; because `revoke` of
//!   an already revoked serial re-signs the CRL, running it again repairs a CRL
//!   write that failed half way.
//! - The CRL number only goes up: each CRL is numbered one above the one it
//!   replaces.
//! - Nothing is overwritten silently: `init` refuses an existing CA, `issue`
//!   refuses existing output files unless forced.

use std::fs::{DirBuilder, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::crl::{parse_crl, RevocationReason};
use super::index::{CertKind, CertStatus, Index, IndexEntry};
use super::{exists, read, validate_agency_id, write_pem, CertificateAuthority, PkiError};

/// How long a CRL is valid for when nothing else says: 30 days.
pub const DEFAULT_CRL_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

/// A certificate `issue` or `issue-server` wrote.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    /// Lowercase hex serial, as [`super::IssuedCert::serial`].
    pub serial: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after: SystemTime,
    /// The serial of the certificate these files held before (`--force`), if
    /// it could be read. It stays valid until it expires or is revoked.
    pub replaced_serial: Option<String>,
}

/// The CRL a command wrote.
#[derive(Debug, Clone)]
pub struct CrlSummary {
    pub path: PathBuf,
    pub number: u64,
    pub this_update: SystemTime,
    pub next_update: SystemTime,
    /// How many certificates it lists.
    pub revoked: usize,
}

/// The outcome of `revoke`.
#[derive(Debug, Clone)]
pub struct Revocation {
    pub serial: String,
    pub kind: CertKind,
    /// Agency id, or the server's names.
    pub subject: String,
    /// When it was revoked (the first time, if it already was).
    pub revoked_at: SystemTime,
    pub reason: RevocationReason,
    /// Whether it was already revoked before this command.
    pub already_revoked: bool,
    pub crl: CrlSummary,
}

/// A CA directory (see the module docs for its files).
#[derive(Debug, Clone)]
pub struct CaDir {
    dir: PathBuf,
}

impl CaDir {
    pub fn new(dir: impl Into<PathBuf>) -> CaDir {
        CaDir { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ca.pem`, the CA certificate agencies and brokers trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `ca.key`, the CA private key (0600).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// `ca.crl`, the current CRL (PEM) for `[tls] crl`.
    pub fn crl(&self) -> PathBuf {
        self.dir.join("ca.crl")
    }

    /// `issued.tsv`, the index of issued certificates.
    pub fn index(&self) -> PathBuf {
        self.dir.join("issued.tsv")
    }

    /// Creates a CA named `name`, an empty CRL valid for `crl_validity` (number
    /// 1) and an empty index. Refuses if any of those files already exist.
    pub fn init(&self, name: &str, crl_validity: Duration) -> Result<CrlSummary, PkiError> {
        if name.trim().is_empty() {
            return Err(PkiError::InvalidName);
        }
        check_crl_validity(crl_validity)?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| PkiError::Io {
                action: "create directory",
                path: self.dir.clone(),
                source,
            })?;
        let _lock = self.lock()?;
        for path in [self.ca_cert(), self.ca_key(), self.crl(), self.index()] {
            if exists(&path)? {
                return Err(PkiError::CaExists {
                    dir: self.dir.clone(),
                    path,
                });
            }
        }
        let ca = CertificateAuthority::generate(name)?;
        write_pem(&self.ca_key(), &ca.key_pem(), true)?;
        write_pem(&self.ca_cert(), &ca.cert_pem(), false)?;
        write_pem(&self.index(), &Index::default().to_text(), false)?;
        self.write_crl(&ca, &Index::default(), 1, crl_validity)
    }

    /// Issues an agency client certificate valid for `validity`, written to
    /// `<out>/<id>.pem` and `<out>/<id>.key` and recorded in the index.
    pub fn issue_agency(
        &self,
        agency_id: &str,
        validity: Duration,
        out: &Path,
        force: bool,
    ) -> Result<IssuedFiles, PkiError> {
        validate_agency_id(agency_id)?;
        let files = (
            out.join(format!("{agency_id}.pem")),
            out.join(format!("{agency_id}.key")),
        );
        self.issue(CertKind::Agency, agency_id, validity, files, force, |ca| {
            ca.issue_agency_valid_for(agency_id, validity)
        })
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses)
    /// valid for `validity`, written to `<out>/server.pem` and `<out>/server.key`.
    pub fn issue_server(
        &self,
        names: &[String],
        validity: Duration,
        out: &Path,
        force: bool,
    ) -> Result<IssuedFiles, PkiError> {
        if names.is_empty() {
            return Err(PkiError::NoServerNames);
        }
        let files = (out.join("server.pem"), out.join("server.key"));
        let subject = names.join(" ");
        self.issue(CertKind::Server, &subject, validity, files, force, |ca| {
            ca.issue_server_valid_for(names, validity)
        })
    }

    /// Issues with `make` and writes the certificate and key to `(cert, key)`.
    fn issue(
        &self,
        kind: CertKind,
        subject: &str,
        validity: Duration,
        (cert, key): (PathBuf, PathBuf),
        force: bool,
        make: impl FnOnce(&CertificateAuthority) -> Result<super::IssuedCert, PkiError>,
    ) -> Result<IssuedFiles, PkiError> {
        if validity.is_zero() {
            return Err(PkiError::InvalidDays {
                what: "certificate",
                reason: "it must be valid for at least one day".into(),
            });
        }
        let _lock = self.lock_existing()?;
        let ca = self.load_ca()?;
        let ca_not_after = ca.not_after()?;
        let not_after = SystemTime::now() + validity;
        if not_after > ca_not_after {
            let days_left = ca_not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs()
                / 86_400;
            return Err(PkiError::InvalidDays {
                what: "certificate",
                reason: format!(
                    "it would outlive the CA, which expires at {}; use --days {days_left} or fewer",
                    humantime::format_rfc3339_seconds(ca_not_after)
                ),
            });
        }
        let mut replaced_serial = None;
        for path in [&cert, &key] {
            if exists(path)? {
                if !force {
                    return Err(PkiError::OutputExists { path: path.clone() });
                }
                if path == &cert {
                    replaced_serial = read(path).ok().and_then(|pem| cert_serial(&pem));
                }
            }
        }
        let mut index = self.load_index()?;
        let issued = make(&ca)?;
        let serial = super::crl::normalize_serial(&issued.serial)?;
        let not_after = cert_not_after(&issued.cert_pem).unwrap_or(not_after);
        index.entries.push(IndexEntry {
            serial,
            kind,
            subject: subject.to_owned(),
            not_after,
            status: CertStatus::Valid,
        });
        // Recorded before written: no certificate escapes the index.
        write_pem(&self.index(), &index.to_text(), false)?;
        write_pem(&key, &issued.key_pem, true)?;
        write_pem(&cert, &issued.cert_pem, false)?;
        Ok(IssuedFiles {
            serial: issued.serial,
            cert,
            key,
            not_after,
            replaced_serial,
        })
    }

    /// Revokes the certificate with `serial` (any form
    /// [`super::crl::normalize_serial`] accepts) and re-signs the CRL with every
    /// revoked serial. Revoking a revoked certificate keeps its first date and
    /// reason and re-signs the CRL all the same.
    ///
    /// The new CRL is valid for `crl_validity`, or as long as the current one
    /// was, or [`DEFAULT_CRL_VALIDITY`].
    pub fn revoke(
        &self,
        serial: &str,
        reason: RevocationReason,
        crl_validity: Option<Duration>,
    ) -> Result<Revocation, PkiError> {
        let normalized = super::crl::normalize_serial(serial)?;
        let _lock = self.lock_existing()?;
        let ca = self.load_ca()?;
        let mut index = self.load_index()?;
        let entry = index
            .find_mut(&normalized)
            .ok_or_else(|| PkiError::UnknownSerial {
                serial: serial.trim().to_owned(),
                index: self.index(),
            })?;
        let (revoked_at, reason, already_revoked) = match entry.status {
            CertStatus::Revoked { at, reason } => (at, reason, true),
            CertStatus::Valid => {
                let at = UNIX_EPOCH
                    + Duration::from_secs(
                        SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs(),
                    );
                entry.status = CertStatus::Revoked { at, reason };
                (at, reason, false)
            }
        };
        let (kind, subject, serial) = (entry.kind, entry.subject.clone(), entry.serial.clone());
        if !already_revoked {
            write_pem(&self.index(), &index.to_text(), false)?;
        }
        let (number, validity) = self.next_crl(crl_validity)?;
        let crl = self.write_crl(&ca, &index, number, validity)?;
        Ok(Revocation {
            serial,
            kind,
            subject,
            revoked_at,
            reason,
            already_revoked,
            crl,
        })
    }

    /// Re-signs the CRL with the same revoked serials, a higher number, and a
    /// fresh validity (`crl_validity`, or as long as the current one was, or
    /// [`DEFAULT_CRL_VALIDITY`]). Run it from cron well before `next_update`.
    pub fn refresh_crl(&self, crl_validity: Option<Duration>) -> Result<CrlSummary, PkiError> {
        let _lock = self.lock_existing()?;
        let ca = self.load_ca()?;
        let index = self.load_index()?;
        let (number, validity) = self.next_crl(crl_validity)?;
        self.write_crl(&ca, &index, number, validity)
    }

    /// The next CRL's number and validity, from the current CRL if there is one.
    fn next_crl(&self, crl_validity: Option<Duration>) -> Result<(u64, Duration), PkiError> {
        if let Some(v) = crl_validity {
            check_crl_validity(v)?;
        }
        let path = self.crl();
        let current = if exists(&path)? {
            Some(parse_crl(&read(&path)?, &path.display().to_string())?)
        } else {
            None
        };
        let number = match &current {
            Some(c) => c.number.checked_add(1).ok_or_else(|| PkiError::BadCrl {
                what: path.display().to_string(),
                reason: "its CRL number cannot be increased".into(),
            })?,
            None => 1,
        };
        let validity = crl_validity
            .or_else(|| {
                current
                    .as_ref()
                    .and_then(|c| c.next_update.duration_since(c.this_update).ok())
                    .filter(|d| !d.is_zero())
            })
            .unwrap_or(DEFAULT_CRL_VALIDITY);
        Ok((number, validity))
    }

    fn write_crl(
        &self,
        ca: &CertificateAuthority,
        index: &Index,
        number: u64,
        validity: Duration,
    ) -> Result<CrlSummary, PkiError> {
        let this_update = SystemTime::now();
        let next_update = this_update + validity;
        let revoked = index.revoked();
        let pem = ca.sign_crl(number, this_update, next_update, &revoked)?;
        write_pem(&self.crl(), &pem, false)?;
        Ok(CrlSummary {
            path: self.crl(),
            number,
            this_update,
            next_update,
            revoked: revoked.len(),
        })
    }

    fn load_ca(&self) -> Result<CertificateAuthority, PkiError> {
        let (cert, key) = (self.ca_cert(), self.ca_key());
        match (exists(&cert)?, exists(&key)?) {
            (true, true) => CertificateAuthority::load(&read(&cert)?, &read(&key)?),
            (false, false) => Err(PkiError::NoCa {
                dir: self.dir.clone(),
            }),
            (true, false) => Err(PkiError::IncompletePair {
                present: cert,
                missing: key,
            }),
            (false, true) => Err(PkiError::IncompletePair {
                present: key,
                missing: cert,
            }),
        }
    }

    /// The index; a CA without one (e.g. the development PKI) has issued
    /// nothing `revoke` knows about yet.
    fn load_index(&self) -> Result<Index, PkiError> {
        let path = self.index();
        if !exists(&path)? {
            return Ok(Index::default());
        }
        Index::parse(&read(&path)?, &path)
    }

    /// Locks the directory, which must already hold a CA.
    fn lock_existing(&self) -> Result<DirLock, PkiError> {
        if !exists(&self.dir)? {
            return Err(PkiError::NoCa {
                dir: self.dir.clone(),
            });
        }
        self.lock()
    }

    /// An exclusive advisory lock on the directory, held until dropped.
    fn lock(&self) -> Result<DirLock, PkiError> {
        let io_err = |source| PkiError::Io {
            action: "lock",
            path: self.dir.clone(),
            source,
        };
        let file = File::open(&self.dir).map_err(io_err)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(e.into()))?;
        Ok(DirLock { _file: file })
    }
}

/// Holds a directory's `flock`; closing the descriptor releases it.
struct DirLock {
    _file: File,
}

/// A CRL is valid for one day to ten years (one valid for less would fail every
/// handshake soon after a single missed refresh).
fn check_crl_validity(validity: Duration) -> Result<(), PkiError> {
    if validity < Duration::from_secs(86_400) {
        return Err(PkiError::InvalidDays {
            what: "CRL",
            reason: "it must be valid for at least one day".into(),
        });
    }
    if validity > Duration::from_secs(3650 * 86_400) {
        return Err(PkiError::InvalidDays {
            what: "CRL",
            reason: "it may be valid for at most 3650 days".into(),
        });
    }
    Ok(())
}

/// The serial of the certificate in `pem`, if it parses.
fn cert_serial(pem: &str) -> Option<String> {
    let der = super::single_cert_der(pem).ok()?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(super::hex(x509.raw_serial()))
}

/// The `not_after` of the certificate in `pem`, if it parses.
pub(super) fn cert_not_after(pem: &str) -> Option<SystemTime> {
    let der = super::single_cert_der(pem).ok()?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der).ok()?;
    let secs = u64::try_from(x509.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    const DAY: Duration = Duration::from_secs(86_400);

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_issue_revoke_and_refresh_keep_index_and_crl_in_step() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(tmp.path().join("ca"));
        let first = ca.init("Leeds City Council CA", 7 * DAY).unwrap();
        assert_eq!((first.number, first.revoked), (1, 0));
        assert_eq!(mode(&ca.ca_key()), 0o600);
        assert_eq!(mode(&ca.ca_cert()), 0o644);
        assert_eq!(mode(&ca.crl()), 0o644);
        assert!(matches!(
            ca.init("again", 7 * DAY),
            Err(PkiError::CaExists { .. })
        ));

        let out = tmp.path().join("out");
        let police = ca.issue_agency("police", 30 * DAY, &out, false).unwrap();
        assert_eq!(mode(&police.key), 0o600);
        assert!(matches!(
            ca.issue_agency("police", 30 * DAY, &out, false),
            Err(PkiError::OutputExists { .. })
        ));
        let police2 = ca.issue_agency("police", 30 * DAY, &out, true).unwrap();
        assert_eq!(police2.replaced_serial.as_deref(), Some(&*police.serial));
        let server = ca
            .issue_server(&["localhost".into()], DAY, &out, false)
            .unwrap();

        let r = ca
            .revoke(&police.serial, RevocationReason::Superseded, None)
            .unwrap();
        assert!(!r.already_revoked);
        assert_eq!((r.crl.number, r.crl.revoked), (2, 1));
        // The validity carries over from the current CRL.
        assert_eq!(
            r.crl.next_update.duration_since(r.crl.this_update).unwrap(),
            7 * DAY
        );
        let again = ca
            .revoke(
                &police.serial.to_uppercase(),
                RevocationReason::KeyCompromise,
                None,
            )
            .unwrap();
        assert!(again.already_revoked);
        assert_eq!(again.reason, RevocationReason::Superseded);
        assert_eq!((again.crl.number, again.crl.revoked), (3, 1));

        let crl = parse_crl(&fs::read_to_string(ca.crl()).unwrap(), "ca.crl").unwrap();
        assert_eq!(crl.revoked, vec![police.serial.clone()]);
        assert!(matches!(
            ca.revoke("abcdef", RevocationReason::Unspecified, None),
            Err(PkiError::UnknownSerial { .. })
        ));

        let refreshed = ca.refresh_crl(Some(2 * DAY)).unwrap();
        assert_eq!((refreshed.number, refreshed.revoked), (4, 1));
        let index = fs::read_to_string(ca.index()).unwrap();
        assert_eq!(index.lines().count(), 4, "{index}");
        assert!(index.contains(&server.serial));

        // Without a CRL (lost, or a development PKI) numbering starts again.
        fs::remove_file(ca.crl()).unwrap();
        assert_eq!(ca.refresh_crl(None).unwrap().number, 1);
    }

    #[test]
    fn commands_without_a_ca_say_how_to_make_one() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(tmp.path().join("none"));
        let err = ca
            .issue_agency("police", DAY, tmp.path(), false)
            .unwrap_err();
        assert!(matches!(err, PkiError::NoCa { .. }));
        assert!(err.to_string().contains("joinery pki init"), "{err}");
        assert!(matches!(ca.refresh_crl(None), Err(PkiError::NoCa { .. })));
    }

    #[test]
    fn certificates_may_not_outlive_their_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(tmp.path());
        ca.init("test", DAY).unwrap();
        let err = ca
            .issue_agency("police", 20 * 365 * DAY, tmp.path(), false)
            .unwrap_err();
        assert!(err.to_string().contains("outlive the CA"), "{err}");
    }
}
