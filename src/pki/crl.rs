//! Certificate revocation lists: signing one with a [`CertificateAuthority`] and
//! reading back what an existing one says.
//!
//! Invariants:
//! - A CRL names its issuer exactly as the CA's subject, carries the CA's subject
//!   key identifier as its authority key identifier, a CRL number and a
//!   `next_update`, so rustls (webpki) accepts it and treats it as authoritative
//!   for every certificate the CA issued.
//! - A revoked serial is written as the same integer the certificate carries:
//!   serials travel as the lowercase hex of their DER content bytes
//!   ([`super::IssuedCert::serial`]) and are re-encoded as positive integers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};

use super::{subject_key_id, CertificateAuthority, PkiError};

/// Converts a `SystemTime` to the date-time type rcgen takes, to the second.
/// (A macro because that type belongs to the `time` crate, which joinery does
/// not name.)
macro_rules! rcgen_time {
    ($at:expr) => {
        rcgen::date_time_ymd(1970, 1, 1)
            + Duration::from_secs($at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
    };
}

/// Why a certificate was revoked: the RFC 5280 reason codes an operator may
/// choose (`certificateHold` and `removeFromCRL` are left out: a revocation
/// here is final).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RevocationReason {
    /// No reason given (the CRL entry then carries no reason code).
    #[default]
    #[value(name = "unspecified")]
    Unspecified,
    /// The certificate's private key was, or may have been, disclosed.
    #[value(name = "keyCompromise")]
    KeyCompromise,
    /// The CA's own key was compromised.
    #[value(name = "caCompromise")]
    CaCompromise,
    /// The agency's name or relationship changed.
    #[value(name = "affiliationChanged")]
    AffiliationChanged,
    /// A new certificate replaces this one.
    #[value(name = "superseded")]
    Superseded,
    /// The agency no longer takes part.
    #[value(name = "cessationOfOperation")]
    CessationOfOperation,
    /// The agency's rights were withdrawn.
    #[value(name = "privilegeWithdrawn")]
    PrivilegeWithdrawn,
}

impl RevocationReason {
    const ALL: [RevocationReason; 7] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::CaCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::PrivilegeWithdrawn,
    ];

    /// The RFC 5280 name, e.g. `keyCompromise`.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "keyCompromise",
            RevocationReason::CaCompromise => "caCompromise",
            RevocationReason::AffiliationChanged => "affiliationChanged",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessationOfOperation",
            RevocationReason::PrivilegeWithdrawn => "privilegeWithdrawn",
        }
    }

    /// Parses an RFC 5280 name (ASCII case ignored).
    pub fn parse(name: &str) -> Option<RevocationReason> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(name))
    }

    fn to_rcgen(self) -> rcgen::RevocationReason {
        match self {
            RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
            RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevocationReason::CaCompromise => rcgen::RevocationReason::CaCompromise,
            RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
            RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            RevocationReason::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        }
    }
}

impl std::fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One revoked certificate, as listed in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Lowercase hex of the serial's DER content bytes ([`super::IssuedCert::serial`]).
    pub serial: String,
    /// When the CA revoked it.
    pub revoked_at: SystemTime,
    pub reason: RevocationReason,
}

/// What a CRL says, as far as joinery's tools care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// The CRL number (monotonically increasing per CA).
    pub number: u64,
    pub this_update: SystemTime,
    pub next_update: SystemTime,
    /// Revoked serials, lowercase hex of their DER content bytes.
    pub revoked: Vec<String>,
}

impl CertificateAuthority {
    /// Signs a CRL listing `revoked`, valid from `this_update` until
    /// `next_update` (after which rustls, enforcing CRL expiry, refuses every
    /// certificate of this CA until a fresh CRL is loaded). Returns PEM
    /// (`BEGIN X509 CRL`).
    pub fn sign_crl(
        &self,
        number: u64,
        this_update: SystemTime,
        next_update: SystemTime,
        revoked: &[RevokedSerial],
    ) -> Result<String, PkiError> {
        if next_update <= this_update {
            return Err(PkiError::InvalidDays {
                what: "CRL",
                reason: "next_update must be after this_update".into(),
            });
        }
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial_bytes(&r.serial)?),
                    revocation_time: rcgen_time!(r.revoked_at),
                    reason_code: Some(r.reason.to_rcgen()),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        // The authority key identifier must equal the CA's subject key identifier
        // whichever method made that; read it from the certificate.
        let der = super::single_cert_der(&self.cert_pem)?;
        let key_identifier_method = match x509_parser::parse_x509_certificate(&der) {
            Ok((_, x509)) => subject_key_id(&x509).map(KeyIdMethod::PreSpecified),
            Err(_) => None,
        }
        .unwrap_or(KeyIdMethod::Sha256);
        let params = CertificateRevocationListParams {
            this_update: rcgen_time!(this_update),
            next_update: rcgen_time!(next_update),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(PkiError::SignCrl)
    }
}

/// Reads a PEM CRL (exactly one `X509 CRL` block). `what` names it in errors.
pub fn parse_crl(pem: &str, what: &str) -> Result<CrlInfo, PkiError> {
    let bad = |reason: String| PkiError::BadCrl {
        what: what.to_owned(),
        reason,
    };
    let crls = rustls_pemfile::crls(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("bad PEM: {e}")))?;
    let der = match crls.as_slice() {
        [only] => only,
        [] => return Err(bad("no PEM \"X509 CRL\" block found".into())),
        _ => return Err(bad(format!("expected one CRL, found {}", crls.len()))),
    };
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| bad(format!("{e}")))?;
    let number = match crl.crl_number() {
        None => 0,
        Some(n) => {
            let bytes = n.to_bytes_be();
            if bytes.len() > 8 {
                return Err(bad("its CRL number is larger than 64 bits".into()));
            }
            bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }
    };
    let time = |t: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let next_update = crl
        .next_update()
        .ok_or_else(|| bad("it has no next update time".into()))?;
    Ok(CrlInfo {
        number,
        this_update: time(crl.last_update()),
        next_update: time(next_update),
        revoked: crl
            .iter_revoked_certificates()
            .map(|r| normalize_serial(&super::hex(r.raw_serial())).unwrap_or_default())
            .collect(),
    })
}

/// Normalises a serial as an operator may type it — `0x` prefix, colons or
/// spaces (as `openssl x509 -serial` and browsers print it), either case — to
/// lowercase hex without leading zero bytes beyond the one DER needs.
pub fn normalize_serial(input: &str) -> Result<String, PkiError> {
    let invalid = |reason: &'static str| PkiError::InvalidSerial {
        serial: input.to_owned(),
        reason,
    };
    let trimmed = input.trim();
    let digits = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        .unwrap_or(trimmed);
    let digits: String = digits
        .chars()
        .filter(|c| !matches!(c, ':' | ' ' | '-'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.is_empty() {
        return Err(invalid("it is empty"));
    }
    if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid("it must be hexadecimal (e.g. 3f2a9c...)"));
    }
    if digits.len() > 42 {
        return Err(invalid("it is longer than 20 bytes"));
    }
    // Compare serials as integers: drop leading zeros, then pad to whole bytes
    // and add back the zero byte DER puts before a high first bit.
    let mut hex = digits.trim_start_matches('0').to_owned();
    if hex.is_empty() {
        hex.push('0');
    }
    if hex.len() % 2 == 1 {
        hex.insert(0, '0');
    }
    if hex.as_bytes()[0] >= b'8' {
        hex.insert_str(0, "00");
    }
    Ok(hex)
}

/// The bytes of a serial in lowercase hex.
fn serial_bytes(serial: &str) -> Result<Vec<u8>, PkiError> {
    let hex = normalize_serial(serial)?;
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| PkiError::InvalidSerial {
                serial: serial.to_owned(),
                reason: "it must be hexadecimal",
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::IssuedCert;
    use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
    use rustls::server::danger::ClientCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use std::sync::Arc;

    const DAY: Duration = Duration::from_secs(86_400);

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("one certificate")
            .expect("valid pem")
    }

    fn crls(pem: &str) -> Vec<CertificateRevocationListDer<'static>> {
        rustls_pemfile::crls(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("valid CRL PEM")
    }

    /// The broker's client verifier (see `tls::server_config`) with `crl_pem`.
    fn verifier(ca: &CertificateAuthority, crl_pem: &str) -> Arc<dyn ClientCertVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&ca.cert_pem())).expect("ca accepted");
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::tls::crypto_provider())
            .with_crls(crls(crl_pem))
            .enforce_revocation_expiration()
            .build()
            .expect("rustls accepts the CRL")
    }

    fn verify(v: &dyn ClientCertVerifier, leaf: &IssuedCert) -> Result<(), rustls::Error> {
        v.verify_client_cert(&der(&leaf.cert_pem), &[], UnixTime::now())
            .map(|_| ())
    }

    fn revoked(serial: &str, reason: RevocationReason) -> RevokedSerial {
        RevokedSerial {
            serial: serial.to_owned(),
            revoked_at: SystemTime::now(),
            reason,
        }
    }

    #[test]
    fn rustls_refuses_a_revoked_certificate_and_accepts_the_others() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let police = ca.issue_agency("police").unwrap();
        let council = ca.issue_agency("council").unwrap();
        let now = SystemTime::now();

        let empty = ca.sign_crl(1, now, now + 30 * DAY, &[]).unwrap();
        let v = verifier(&ca, &empty);
        assert!(verify(&*v, &police).is_ok());
        assert!(verify(&*v, &council).is_ok());

        let crl = ca
            .sign_crl(
                2,
                now,
                now + 30 * DAY,
                &[revoked(&police.serial, RevocationReason::KeyCompromise)],
            )
            .unwrap();
        let v = verifier(&ca, &crl);
        assert_eq!(
            verify(&*v, &police),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
        );
        assert!(verify(&*v, &council).is_ok());
    }

    #[test]
    fn rustls_refuses_everything_once_the_crl_is_past_next_update() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let council = ca.issue_agency("council").unwrap();
        let long_ago = SystemTime::now() - 10 * DAY;
        let stale = ca.sign_crl(1, long_ago, long_ago + DAY, &[]).unwrap();
        let v = verifier(&ca, &stale);
        assert!(matches!(
            verify(&*v, &council),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ExpiredRevocationList
                    | rustls::CertificateError::ExpiredRevocationListContext { .. }
            ))
        ));
    }

    #[test]
    fn a_reloaded_ca_signs_crls_rustls_accepts() {
        let ca = CertificateAuthority::generate("Leeds City Council CA").unwrap();
        let reloaded = CertificateAuthority::load(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let fire = reloaded.issue_agency("fire").unwrap();
        let now = SystemTime::now();
        let crl = reloaded
            .sign_crl(
                7,
                now,
                now + DAY,
                &[revoked(&fire.serial, RevocationReason::Unspecified)],
            )
            .unwrap();
        assert!(verify(&*verifier(&ca, &crl), &fire).is_err());
    }

    #[test]
    fn parse_crl_reads_back_number_times_and_serials() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let a = ca.issue_agency("a").unwrap();
        let b = ca.issue_agency("b").unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let pem = ca
            .sign_crl(
                42,
                now,
                now + 30 * DAY,
                &[
                    revoked(&a.serial, RevocationReason::Superseded),
                    revoked(&b.serial, RevocationReason::Unspecified),
                ],
            )
            .unwrap();
        assert!(pem.starts_with("-----BEGIN X509 CRL-----"));
        let info = parse_crl(&pem, "test").unwrap();
        assert_eq!(info.number, 42);
        assert_eq!(info.this_update, now);
        assert_eq!(info.next_update, now + 30 * DAY);
        assert_eq!(info.revoked, vec![a.serial, b.serial]);
        assert!(matches!(
            parse_crl(&ca.cert_pem(), "test"),
            Err(PkiError::BadCrl { .. })
        ));
        assert!(matches!(
            ca.sign_crl(1, now, now, &[]),
            Err(PkiError::InvalidDays { .. })
        ));
    }

    #[test]
    fn serials_are_normalised_as_integers() {
        assert_eq!(normalize_serial("3F:2A:01").unwrap(), "3f2a01");
        assert_eq!(normalize_serial("0x3f2a01").unwrap(), "3f2a01");
        assert_eq!(normalize_serial("003f2a01").unwrap(), "3f2a01");
        assert_eq!(normalize_serial("f2a01").unwrap(), "0f2a01");
        assert_eq!(normalize_serial("9c").unwrap(), "009c");
        assert_eq!(normalize_serial("00:9c").unwrap(), "009c");
        assert_eq!(normalize_serial("0").unwrap(), "00");
        for bad in ["", "0x", "xyz", "12g4", &"1".repeat(43)] {
            assert!(
                matches!(normalize_serial(bad), Err(PkiError::InvalidSerial { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(
            RevocationReason::parse("KEYCOMPROMISE"),
            Some(RevocationReason::KeyCompromise)
        );
        assert_eq!(RevocationReason::parse("certificateHold"), None);
    }
}
