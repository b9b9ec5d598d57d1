//! `issued.tsv`: the CA directory's record of every certificate it issued, so
//! `joinery pki revoke <serial>` can find one and the CRL can be rebuilt from it.
//!
//! One tab-separated line per certificate, after a `#` header line:
//! `serial  kind  subject  not_after  status  revoked_at  reason`, e.g.
//! `3f2a...  agency  police-west  2027-03-01T09:00:00Z  revoked  2025-06-01T12:00:00Z  keyCompromise`.
//! `kind` is `agency` or `server`; `subject` is the agency id or the server's
//! names separated by spaces; `revoked_at` and `reason` are `-` while valid.
//!
//! Invariants: serials are stored normalised ([`normalize_serial`]), unique, in
//! issue order; the file is plain text an operator can read (and `grep`), and a
//! line this code cannot parse is an error naming the line, never skipped.

use std::path::Path;
use std::time::SystemTime;

use super::crl::{normalize_serial, RevocationReason, RevokedSerial};
use super::PkiError;

const HEADER: &str =
    "# joinery pki index: serial\tkind\tsubject\tnot_after\tstatus\trevoked_at\treason";

/// What a certificate was issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// An agency client certificate (`joinery pki issue`).
    Agency,
    /// A broker server certificate (`joinery pki issue-server`).
    Server,
}

impl CertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CertKind::Agency => "agency",
            CertKind::Server => "server",
        }
    }
}

/// Whether a certificate is revoked, and when and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertStatus {
    Valid,
    Revoked {
        at: SystemTime,
        reason: RevocationReason,
    },
}

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Normalised serial (lowercase hex of the DER content bytes).
    pub serial: String,
    pub kind: CertKind,
    /// Agency id, or the server's names separated by spaces.
    pub subject: String,
    pub not_after: SystemTime,
    pub status: CertStatus,
}

/// Every certificate a CA directory issued, in issue order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    pub entries: Vec<IndexEntry>,
}

impl Index {
    /// Parses the file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Index, PkiError> {
        let mut entries: Vec<IndexEntry> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| PkiError::BadIndex {
                path: path.to_path_buf(),
                line: n + 1,
                reason,
            };
            let fields: Vec<&str> = line.split('\t').collect();
            let [serial, kind, subject, not_after, status, revoked_at, reason] = fields[..] else {
                return Err(bad(format!(
                    "expected 7 tab-separated fields, found {}",
                    fields.len()
                )));
            };
            let serial = normalize_serial(serial).map_err(|e| bad(e.to_string()))?;
            if entries.iter().any(|e| e.serial == serial) {
                return Err(bad(format!("serial {serial} is listed twice")));
            }
            let kind = match kind {
                "agency" => CertKind::Agency,
                "server" => CertKind::Server,
                other => return Err(bad(format!("unknown kind {other:?}"))),
            };
            let time = |what: &str, value: &str| {
                humantime::parse_rfc3339(value)
                    .map_err(|e| bad(format!("bad {what} time {value:?}: {e}")))
            };
            let status = match status {
                "valid" => CertStatus::Valid,
                "revoked" => CertStatus::Revoked {
                    at: time("revocation", revoked_at)?,
                    reason: RevocationReason::parse(reason)
                        .ok_or_else(|| bad(format!("unknown revocation reason {reason:?}")))?,
                },
                other => return Err(bad(format!("unknown status {other:?}"))),
            };
            entries.push(IndexEntry {
                serial,
                kind,
                subject: subject.to_owned(),
                not_after: time("not_after", not_after)?,
                status,
            });
        }
        Ok(Index { entries })
    }

    /// The file's text: the header line, then one line per entry.
    pub fn to_text(&self) -> String {
        let mut text = String::from(HEADER);
        text.push('\n');
        for e in &self.entries {
            let (status, at, reason) = match e.status {
                CertStatus::Valid => ("valid", "-".to_owned(), "-"),
                CertStatus::Revoked { at, reason } => (
                    "revoked",
                    humantime::format_rfc3339_seconds(at).to_string(),
                    reason.as_str(),
                ),
            };
            text.push_str(&format!(
                "{}\t{}\t{}\t{}\t{status}\t{at}\t{reason}\n",
                e.serial,
                e.kind.as_str(),
                e.subject,
                humantime::format_rfc3339_seconds(e.not_after),
            ));
        }
        text
    }

    /// The entry with `serial` (any form [`normalize_serial`] accepts).
    pub fn find_mut(&mut self, serial: &str) -> Option<&mut IndexEntry> {
        let serial = normalize_serial(serial).ok()?;
        self.entries.iter_mut().find(|e| e.serial == serial)
    }

    /// Every revoked certificate, for the CRL.
    pub fn revoked(&self) -> Vec<RevokedSerial> {
        self.entries
            .iter()
            .filter_map(|e| match e.status {
                CertStatus::Valid => None,
                CertStatus::Revoked { at, reason } => Some(RevokedSerial {
                    serial: e.serial.clone(),
                    revoked_at: at,
                    reason,
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn index_round_trips_through_its_text() {
        let t = |s| UNIX_EPOCH + Duration::from_secs(s);
        let index = Index {
            entries: vec![
                IndexEntry {
                    serial: "3f2a".into(),
                    kind: CertKind::Agency,
                    subject: "police-west".into(),
                    not_after: t(1_900_000_000),
                    status: CertStatus::Revoked {
                        at: t(1_800_000_000),
                        reason: RevocationReason::KeyCompromise,
                    },
                },
                IndexEntry {
                    serial: "0a01".into(),
                    kind: CertKind::Server,
                    subject: "localhost 127.0.0.1".into(),
                    not_after: t(1_900_000_000),
                    status: CertStatus::Valid,
                },
            ],
        };
        let text = index.to_text();
        assert!(text.contains("\tkeyCompromise\n"), "{text}");
        let path = Path::new("issued.tsv");
        assert_eq!(Index::parse(&text, path).unwrap(), index);
        let mut again = Index::parse(&text, path).unwrap();
        assert!(again.find_mut("3F:2A").is_some());
        assert!(again.find_mut("a01").is_some());
        assert!(again.find_mut("ffff").is_none());
        assert_eq!(again.revoked().len(), 1);
    }

    #[test]
    fn a_damaged_line_is_an_error_naming_it() {
        let text = format!("{HEADER}\n3f2a\tagency\tpolice\n");
        match Index::parse(&text, Path::new("issued.tsv")) {
            Err(PkiError::BadIndex { line: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
