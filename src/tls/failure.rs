//! Why a TLS handshake failed, in a few words an operator can act on.
//!
//! Every refused handshake is logged at info with the peer's address and one of
//! these reasons (plus rustls's own wording as `detail`), so "why can't agency X
//! connect?" is answered by the log: expired, not yet valid, revoked, unknown
//! CA, stale CRL, and so on.

use std::borrow::Cow;
use std::time::{Duration, UNIX_EPOCH};

use rustls::pki_types::UnixTime;
use rustls::{CertRevocationListError, CertificateError, Error};

/// A short reason for a failed handshake.
pub fn handshake_failure_reason(error: &Error) -> Cow<'static, str> {
    match error {
        Error::InvalidCertificate(e) => certificate_reason(e),
        Error::InvalidCertRevocationList(e) => Cow::Owned(format!("unusable CRL ({})", crl_reason(e))),
        Error::NoCertificatesPresented => "no client certificate".into(),
        Error::AlertReceived(alert) => Cow::Owned(format!(
            "the client ended the handshake (alert {alert:?}); it may not trust the server certificate"
        )),
        Error::NoApplicationProtocol => "no common application protocol (the broker speaks h2)".into(),
        Error::PeerIncompatible(_) => "client's TLS version or cipher suites are incompatible".into(),
        Error::InvalidMessage(_) | Error::PeerMisbehaved(_) | Error::InappropriateHandshakeMessage { .. } | Error::InappropriateMessage { .. } => {
            "TLS protocol error".into()
        }
        _ => "TLS error".into(),
    }
}

#[allow(deprecated)] // UnsupportedSignatureAlgorithm is still produced by older paths.
fn certificate_reason(error: &CertificateError) -> Cow<'static, str> {
    match error {
        CertificateError::Expired => "certificate expired".into(),
        CertificateError::ExpiredContext { not_after, .. } => {
            Cow::Owned(format!("certificate expired at {}", rfc3339(not_after)))
        }
        CertificateError::NotValidYet => "certificate not yet valid".into(),
        CertificateError::NotValidYetContext { not_before, .. } => Cow::Owned(format!(
            "certificate not yet valid (valid from {})",
            rfc3339(not_before)
        )),
        CertificateError::Revoked => "certificate revoked".into(),
        CertificateError::UnknownIssuer => "certificate not issued by a trusted CA".into(),
        CertificateError::BadSignature => "certificate signature invalid".into(),
        CertificateError::BadEncoding => "certificate malformed".into(),
        CertificateError::UnknownRevocationStatus => {
            "revocation status unknown (no CRL configured for the certificate's issuer)".into()
        }
        CertificateError::ExpiredRevocationList => "CRL stale (past its next update)".into(),
        CertificateError::ExpiredRevocationListContext { next_update, .. } => Cow::Owned(format!(
            "CRL stale (its next update was due {})",
            rfc3339(next_update)
        )),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "certificate not valid for client authentication".into()
        }
        CertificateError::UnhandledCriticalExtension => {
            "certificate has an unsupported critical extension".into()
        }
        CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "certificate signature algorithm unsupported".into()
        }
        _ => "certificate rejected".into(),
    }
}

#[allow(deprecated)]
fn crl_reason(error: &CertRevocationListError) -> &'static str {
    match error {
        CertRevocationListError::BadSignature => "bad signature",
        CertRevocationListError::UnsupportedSignatureAlgorithm
        | CertRevocationListError::UnsupportedSignatureAlgorithmContext { .. }
        | CertRevocationListError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "unsupported signature algorithm"
        }
        CertRevocationListError::IssuerInvalidForCrl => "its issuer may not sign CRLs",
        _ => "invalid",
    }
}

fn rfc3339(time: &UnixTime) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(time.as_secs())).to_string()
}

/// A short, fixed label for a failed handshake (for metrics: a bounded set).
pub fn handshake_failure_label(error: &Error) -> &'static str {
    match error {
        Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::UnknownRevocationStatus => "revocation_unknown",
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "crl_stale",
            _ => "bad_certificate",
        },
        Error::InvalidCertRevocationList(_) => "crl_unusable",
        Error::NoCertificatesPresented => "no_certificate",
        Error::AlertReceived(_) => "client_alert",
        Error::NoApplicationProtocol => "no_alpn",
        Error::PeerIncompatible(_) => "incompatible",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_problems_get_short_reasons() {
        let at = UnixTime::since_unix_epoch(Duration::from_secs(1_700_000_000));
        let cases = [
            (CertificateError::Expired, "certificate expired"),
            (
                CertificateError::ExpiredContext {
                    time: at,
                    not_after: at,
                },
                "certificate expired at 2023-11-14T22:13:20Z",
            ),
            (CertificateError::NotValidYet, "certificate not yet valid"),
            (CertificateError::Revoked, "certificate revoked"),
            (
                CertificateError::UnknownIssuer,
                "certificate not issued by a trusted CA",
            ),
            (
                CertificateError::ExpiredRevocationList,
                "CRL stale (past its next update)",
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(
                handshake_failure_reason(&Error::InvalidCertificate(error)),
                reason
            );
        }
        assert!(handshake_failure_reason(&Error::InvalidCertificate(
            CertificateError::NotValidYetContext {
                time: at,
                not_before: at
            }
        ))
        .starts_with("certificate not yet valid (valid from 2023-"));
        assert_eq!(
            handshake_failure_reason(&Error::NoApplicationProtocol),
            "no common application protocol (the broker speaks h2)"
        );
    }
}
