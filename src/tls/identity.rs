//! The caller's identity: the agency named by the verified client certificate.
//!
//! Invariants: the identity is read only from the leaf certificate's URI SAN
//! `urn:joinery:agency:<id>` (exactly one), the id must be a configured agency,
//! and it is resolved once per connection, at handshake. Error messages are sent
//! to clients, so each says what to do about it.

use std::net::SocketAddr;

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use crate::pki::{hex, AGENCY_URI_PREFIX};

/// Why a connection has no usable agency identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no client certificate was presented; connect with the certificate and key issued for your agency"
    )]
    NoCertificate,
    #[error(
        "the client certificate has no URI SAN {AGENCY_URI_PREFIX}<id>; ask your operator for a certificate issued for your agency"
    )]
    NoAgencySan,
    #[error(
        "the client certificate names more than one agency ({}); ask your operator for a certificate issued for exactly one agency",
        .0.join(", ")
    )]
    MultipleAgencySans(Vec<String>),
    #[error(
        "agency {0:?} named by the client certificate is not configured on this broker; ask your operator to add it"
    )]
    UnknownAgency(String),
    #[error(
        "the client certificate cannot be read ({0}); ask your operator for a new certificate"
    )]
    Malformed(String),
}

/// The agency id in the leaf certificate's URI SAN `urn:joinery:agency:<id>`.
///
/// Exactly one such SAN is required and the id must satisfy `known` (the
/// configured agencies), else [`IdentityError::UnknownAgency`]. The certificate's
/// chain must already have been verified (rustls does so during the handshake).
pub fn agency_from_cert(
    leaf_der: &[u8],
    known: &dyn Fn(&str) -> bool,
) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    agency_from_parsed(&cert, known)
}

fn agency_from_parsed(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    known: &dyn Fn(&str) -> bool,
) -> Result<String, IdentityError> {
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(format!("subject alternative names: {e}")))?;
    let mut ids: Vec<String> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => agency_in_uri(uri),
            _ => None,
        })
        .map(str::to_owned)
        .collect();
    let id = match ids.len() {
        0 => return Err(IdentityError::NoAgencySan),
        1 => ids.remove(0),
        _ => return Err(IdentityError::MultipleAgencySans(ids)),
    };
    if id.is_empty() {
        return Err(IdentityError::Malformed(format!(
            "the URI SAN {AGENCY_URI_PREFIX} names no agency"
        )));
    }
    if !known(&id) {
        return Err(IdentityError::UnknownAgency(id));
    }
    Ok(id)
}

/// The id after the agency prefix; the `urn:` scheme and namespace are compared
/// case-insensitively, as URNs require.
fn agency_in_uri(uri: &str) -> Option<&str> {
    let prefix = uri.get(..AGENCY_URI_PREFIX.len())?;
    prefix
        .eq_ignore_ascii_case(AGENCY_URI_PREFIX)
        .then(|| &uri[AGENCY_URI_PREFIX.len()..])
}

/// What a request handler knows about the connection it arrived on; tonic puts a
/// clone into every request's extensions (`request.extensions().get::<PeerInfo>()`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The agency the client certificate names, or why there is none.
    pub identity: Result<String, IdentityError>,
    /// Lowercase hex of the leaf certificate's serial (DER content bytes), if any.
    pub serial: Option<String>,
}

impl PeerInfo {
    /// Resolves the identity from the peer's verified chain (leaf first), as
    /// rustls reports it after the handshake.
    pub fn from_certificates(
        remote_addr: SocketAddr,
        certs: Option<&[CertificateDer<'_>]>,
        known: &dyn Fn(&str) -> bool,
    ) -> Self {
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            return Self {
                remote_addr,
                identity: Err(IdentityError::NoCertificate),
                serial: None,
            };
        };
        match x509_parser::parse_x509_certificate(leaf) {
            Ok((_, cert)) => Self {
                remote_addr,
                identity: agency_from_parsed(&cert, known),
                serial: Some(hex(cert.raw_serial())),
            },
            Err(e) => Self {
                remote_addr,
                identity: Err(IdentityError::Malformed(e.to_string())),
                serial: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;
    use rcgen::string::Ia5String;
    use rcgen::{CertificateParams, SanType};

    fn leaf_der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    fn cert_with_sans(sans: &[&str]) -> CertificateDer<'static> {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|s| SanType::URI(Ia5String::try_from(*s).unwrap()))
            .collect();
        leaf_der(&ca.issue_with(params).unwrap().cert_pem)
    }

    fn anyone(_: &str) -> bool {
        true
    }

    #[test]
    fn certificate_without_san_has_no_agency() {
        let der = cert_with_sans(&[]);
        assert_eq!(
            agency_from_cert(&der, &anyone),
            Err(IdentityError::NoAgencySan)
        );
        let other_uri = cert_with_sans(&["https://example.org/agency/x"]);
        assert_eq!(
            agency_from_cert(&other_uri, &anyone),
            Err(IdentityError::NoAgencySan)
        );
    }

    #[test]
    fn agency_not_configured_is_unknown() {
        let der = cert_with_sans(&["urn:joinery:agency:council-york"]);
        assert_eq!(
            agency_from_cert(&der, &|id| id == "council-leeds"),
            Err(IdentityError::UnknownAgency("council-york".into()))
        );
        assert_eq!(
            agency_from_cert(&der, &|id| id == "council-york").as_deref(),
            Ok("council-york")
        );
    }

    #[test]
    fn two_agency_sans_are_refused() {
        let der = cert_with_sans(&[
            "urn:joinery:agency:council-leeds",
            "https://example.org/",
            "URN:JOINERY:AGENCY:police-west",
        ]);
        assert_eq!(
            agency_from_cert(&der, &anyone),
            Err(IdentityError::MultipleAgencySans(vec![
                "council-leeds".into(),
                "police-west".into()
            ]))
        );
    }

    #[test]
    fn empty_agency_id_and_garbage_are_malformed() {
        let der = cert_with_sans(&["urn:joinery:agency:"]);
        assert!(matches!(
            agency_from_cert(&der, &anyone),
            Err(IdentityError::Malformed(_))
        ));
        assert!(matches!(
            agency_from_cert(b"not a certificate", &anyone),
            Err(IdentityError::Malformed(_))
        ));
    }

    #[test]
    fn peer_info_reports_serial_and_missing_certificate() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca.issue_agency("council-leeds").unwrap();
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let chain = [leaf_der(&issued.cert_pem)];
        let info = PeerInfo::from_certificates(addr, Some(&chain), &anyone);
        assert_eq!(info.identity.as_deref(), Ok("council-leeds"));
        assert_eq!(info.serial.as_deref(), Some(issued.serial.as_str()));

        let none = PeerInfo::from_certificates(addr, None, &anyone);
        assert_eq!(none.identity, Err(IdentityError::NoCertificate));
        assert!(none.serial.is_none());
        assert!(none
            .identity
            .unwrap_err()
            .to_string()
            .starts_with("no client certificate"));
    }

    #[test]
    fn messages_tell_the_client_what_to_do() {
        assert_eq!(
            IdentityError::NoAgencySan.to_string(),
            "the client certificate has no URI SAN urn:joinery:agency:<id>; \
             ask your operator for a certificate issued for your agency"
        );
    }
}
