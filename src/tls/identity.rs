//! The caller's identity: the agency a verified client certificate speaks for.
//!
//! # How an agency is resolved
//! In order, from the verified leaf certificate only:
//! 1. its URI SAN `urn:joinery:agency:<id>` (exactly one; several are refused);
//! 2. else an `[[identity]]` whose `san` equals one of the certificate's SAN
//!    values: DNS names (compared case-insensitively), email addresses (the
//!    domain case-insensitively) and URIs (exactly). A `DNS:`, `email:` or
//!    `URI:` prefix, as openssl prints SANs, restricts the match to that kind;
//! 3. else an `[[identity]]` whose `subject` names the certificate's subject,
//!    written as RFC 4514 text, e.g. `CN=nhs-gateway,O=Demo NHS Trust,C=GB`
//!    (see [`SubjectName`] for the exact rules: attribute names
//!    case-insensitive, values exact after trimming, RDNs in either order).
//!
//! If mappings at the deciding step name more than one agency the certificate
//! is refused as ambiguous. The agency must be configured.
//!
//! Invariants: the identity is resolved once per connection, at handshake,
//! never from a header or any field a client sets. Error messages are sent to
//! clients, so each says what to do about it.

use std::collections::HashSet;
use std::net::SocketAddr;

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::subject::SubjectName;
use super::TlsError;
use crate::config::{Config, IdentityConfig};
use crate::pki::{hex, AGENCY_URI_PREFIX};

/// Why a connection has no usable agency identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no client certificate was presented; connect with the certificate and key issued for your agency"
    )]
    NoCertificate,
    #[error(
        "the client certificate has no URI SAN {AGENCY_URI_PREFIX}<id> and matches no [[identity]] mapping; ask your operator for a certificate issued for your agency"
    )]
    NoAgencySan,
    #[error(
        "the client certificate names more than one agency ({}); ask your operator for a certificate issued for exactly one agency",
        .0.join(", ")
    )]
    MultipleAgencySans(Vec<String>),
    #[error(
        "the client certificate matches [[identity]] mappings of more than one agency ({}); ask your operator to correct the mappings",
        .0.join(", ")
    )]
    AmbiguousMapping(Vec<String>),
    #[error(
        "agency {0:?} named by the client certificate is not configured on this broker; ask your operator to add it"
    )]
    UnknownAgency(String),
    #[error(
        "the client certificate cannot be read ({0}); ask your operator for a new certificate"
    )]
    Malformed(String),
}

/// The agency id in the leaf certificate's URI SAN `urn:joinery:agency:<id>`,
/// without `[[identity]]` mappings (see [`IdentityResolver`] for those).
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
    let id = agency_san(&cert)?.ok_or(IdentityError::NoAgencySan)?;
    if !known(&id) {
        return Err(IdentityError::UnknownAgency(id));
    }
    Ok(id)
}

/// The agency in the URI SAN, `None` if there is no such SAN.
fn agency_san(cert: &X509Certificate<'_>) -> Result<Option<String>, IdentityError> {
    let mut ids: Vec<String> = general_names(cert)?
        .into_iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => agency_in_uri(uri),
            _ => None,
        })
        .map(str::to_owned)
        .collect();
    let id = match ids.len() {
        0 => return Ok(None),
        1 => ids.remove(0),
        _ => return Err(IdentityError::MultipleAgencySans(ids)),
    };
    if id.is_empty() {
        return Err(IdentityError::Malformed(format!(
            "the URI SAN {AGENCY_URI_PREFIX} names no agency"
        )));
    }
    Ok(Some(id))
}

fn general_names<'a>(
    cert: &'a X509Certificate<'_>,
) -> Result<Vec<&'a GeneralName<'a>>, IdentityError> {
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(format!("subject alternative names: {e}")))?;
    Ok(sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .collect())
}

/// The id after the agency prefix; the `urn:` scheme and namespace are compared
/// case-insensitively, as URNs require.
fn agency_in_uri(uri: &str) -> Option<&str> {
    let prefix = uri.get(..AGENCY_URI_PREFIX.len())?;
    prefix
        .eq_ignore_ascii_case(AGENCY_URI_PREFIX)
        .then(|| &uri[AGENCY_URI_PREFIX.len()..])
}

/// Which SAN kinds an `[[identity]] san` value matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SanKind {
    Any,
    Dns,
    Email,
    Uri,
}

#[derive(Debug, Clone)]
struct SanPattern {
    kind: SanKind,
    value: String,
}

impl SanPattern {
    fn parse(text: &str) -> Self {
        let text = text.trim();
        for (prefix, kind) in [
            ("DNS:", SanKind::Dns),
            ("email:", SanKind::Email),
            ("URI:", SanKind::Uri),
        ] {
            if let Some(head) = text.get(..prefix.len()) {
                if head.eq_ignore_ascii_case(prefix) {
                    return Self {
                        kind,
                        value: text[prefix.len()..].trim().to_owned(),
                    };
                }
            }
        }
        Self {
            kind: SanKind::Any,
            value: text.to_owned(),
        }
    }

    fn matches(&self, name: &GeneralName<'_>) -> bool {
        let wants = |kind| self.kind == SanKind::Any || self.kind == kind;
        match name {
            GeneralName::DNSName(dns) => {
                wants(SanKind::Dns)
                    && dns
                        .trim_end_matches('.')
                        .eq_ignore_ascii_case(self.value.trim_end_matches('.'))
            }
            GeneralName::RFC822Name(email) => wants(SanKind::Email) && email_eq(email, &self.value),
            GeneralName::URI(uri) => wants(SanKind::Uri) && *uri == self.value,
            _ => false,
        }
    }
}

/// Local parts exactly, domains case-insensitively.
fn email_eq(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}

/// Resolves a verified client certificate to a configured agency (see the
/// module docs for the order). Cheap to share; built once at start-up.
#[derive(Debug, Clone, Default)]
pub struct IdentityResolver {
    agencies: HashSet<String>,
    by_san: Vec<(SanPattern, String)>,
    by_subject: Vec<(SubjectName, String)>,
}

impl IdentityResolver {
    /// The configured agencies and `[[identity]]` mappings.
    pub fn from_config(config: &Config) -> Result<Self, TlsError> {
        Self::new(
            config.agencies.iter().map(|a| a.id.clone()),
            &config.identities,
        )
    }

    /// `agencies` may connect; `mappings` map certificates without the agency
    /// SAN. Fails on a mapping whose subject is not valid RFC 4514 text or that
    /// sets neither or both of `subject` and `san`.
    pub fn new(
        agencies: impl IntoIterator<Item = String>,
        mappings: &[IdentityConfig],
    ) -> Result<Self, TlsError> {
        let mut resolver = Self {
            agencies: agencies.into_iter().collect(),
            ..Self::default()
        };
        for (index, mapping) in mappings.iter().enumerate() {
            let bad = |reason: String| TlsError::IdentityMapping {
                number: index + 1,
                reason,
            };
            let agency = mapping.agency.clone();
            match (&mapping.subject, &mapping.san) {
                (Some(subject), None) => {
                    let name = SubjectName::parse(subject)
                        .map_err(|e| bad(format!("subject {subject:?}: {e}")))?;
                    resolver.by_subject.push((name, agency));
                }
                (None, Some(san)) if !san.trim().is_empty() => {
                    resolver.by_san.push((SanPattern::parse(san), agency));
                }
                _ => return Err(bad("set exactly one of subject and san".into())),
            }
        }
        Ok(resolver)
    }

    /// Whether `id` is a configured agency.
    pub fn is_agency(&self, id: &str) -> bool {
        self.agencies.contains(id)
    }

    /// The agency of a verified leaf certificate (DER).
    pub fn resolve(&self, leaf_der: &[u8]) -> Result<String, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|e| IdentityError::Malformed(e.to_string()))?;
        self.resolve_parsed(&cert)
    }

    fn resolve_parsed(&self, cert: &X509Certificate<'_>) -> Result<String, IdentityError> {
        let id = match agency_san(cert)? {
            Some(id) => id,
            None => self.mapped(cert)?.ok_or(IdentityError::NoAgencySan)?,
        };
        if !self.is_agency(&id) {
            return Err(IdentityError::UnknownAgency(id));
        }
        Ok(id)
    }

    /// The agency an `[[identity]]` mapping gives: by SAN, else by subject.
    fn mapped(&self, cert: &X509Certificate<'_>) -> Result<Option<String>, IdentityError> {
        if !self.by_san.is_empty() {
            let names = general_names(cert)?;
            let hits = self
                .by_san
                .iter()
                .filter(|(pattern, _)| names.iter().any(|name| pattern.matches(name)))
                .map(|(_, agency)| agency);
            if let Some(agency) = single(hits)? {
                return Ok(Some(agency));
            }
        }
        if !self.by_subject.is_empty() {
            if let Some(subject) = SubjectName::from_x509(cert.subject()) {
                let hits = self
                    .by_subject
                    .iter()
                    .filter(|(name, _)| name.matches(&subject))
                    .map(|(_, agency)| agency);
                return single(hits);
            }
        }
        Ok(None)
    }
}

/// The one distinct agency among `hits`, none, or an ambiguity error.
fn single<'a>(hits: impl Iterator<Item = &'a String>) -> Result<Option<String>, IdentityError> {
    let mut agencies: Vec<String> = Vec::new();
    for agency in hits {
        if !agencies.contains(agency) {
            agencies.push(agency.clone());
        }
    }
    match agencies.len() {
        0 => Ok(None),
        1 => Ok(agencies.pop()),
        _ => Err(IdentityError::AmbiguousMapping(agencies)),
    }
}

/// What a request handler knows about the connection it arrived on; tonic puts a
/// clone into every request's extensions (`request.extensions().get::<PeerInfo>()`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: SocketAddr,
    /// The agency the client certificate speaks for, or why there is none.
    pub identity: Result<String, IdentityError>,
    /// Lowercase hex of the leaf certificate's serial (DER content bytes), if any.
    pub serial: Option<String>,
}

/// What identifies a leaf certificate in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeafId {
    /// DER of the issuer's name.
    pub issuer: Vec<u8>,
    /// Serial number, DER content bytes.
    pub serial: Vec<u8>,
}

impl PeerInfo {
    /// Resolves the identity from the peer's verified chain (leaf first), as
    /// rustls reports it after the handshake.
    pub fn from_certificates(
        remote_addr: SocketAddr,
        certs: Option<&[CertificateDer<'_>]>,
        identities: &IdentityResolver,
    ) -> Self {
        Self::inspect(remote_addr, certs, identities).0
    }

    /// As [`Self::from_certificates`], also returning the leaf's issuer and serial.
    pub(crate) fn inspect(
        remote_addr: SocketAddr,
        certs: Option<&[CertificateDer<'_>]>,
        identities: &IdentityResolver,
    ) -> (Self, Option<LeafId>) {
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            let info = Self {
                remote_addr,
                identity: Err(IdentityError::NoCertificate),
                serial: None,
            };
            return (info, None);
        };
        match x509_parser::parse_x509_certificate(leaf) {
            Ok((_, cert)) => {
                let info = Self {
                    remote_addr,
                    identity: identities.resolve_parsed(&cert),
                    serial: Some(hex(cert.raw_serial())),
                };
                let id = LeafId {
                    issuer: cert.issuer().as_raw().to_vec(),
                    serial: cert.raw_serial().to_vec(),
                };
                (info, Some(id))
            }
            Err(e) => {
                let info = Self {
                    remote_addr,
                    identity: Err(IdentityError::Malformed(e.to_string())),
                    serial: None,
                };
                (info, None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;
    use rcgen::string::Ia5String;
    use rcgen::{CertificateParams, DistinguishedName, DnType, SanType};

    fn leaf_der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    fn issue(sans: Vec<SanType>, subject: &[(DnType, &str)]) -> CertificateDer<'static> {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = DistinguishedName::new();
        for (ty, value) in subject {
            params.distinguished_name.push(ty.clone(), *value);
        }
        leaf_der(&ca.issue_with(params).unwrap().cert_pem)
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(Ia5String::try_from(s).unwrap())
    }

    fn email(s: &str) -> SanType {
        SanType::Rfc822Name(Ia5String::try_from(s).unwrap())
    }

    fn cert_with_sans(sans: &[&str]) -> CertificateDer<'static> {
        issue(sans.iter().map(|s| uri(s)).collect(), &[])
    }

    fn anyone(_: &str) -> bool {
        true
    }

    fn by_subject(subject: &str, agency: &str) -> IdentityConfig {
        IdentityConfig {
            subject: Some(subject.into()),
            san: None,
            agency: agency.into(),
        }
    }

    fn by_san(san: &str, agency: &str) -> IdentityConfig {
        IdentityConfig {
            subject: None,
            san: Some(san.into()),
            agency: agency.into(),
        }
    }

    fn resolver(mappings: &[IdentityConfig]) -> IdentityResolver {
        let agencies = ["nhs", "fire", "police", "council-leeds"].map(String::from);
        IdentityResolver::new(agencies, mappings).unwrap()
    }

    const NHS_GATEWAY: &[(DnType, &str)] = &[
        (DnType::CountryName, "GB"),
        (DnType::OrganizationName, "Demo NHS Trust"),
        (DnType::CommonName, "nhs-gateway"),
    ];

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
        assert_eq!(
            resolver(&[]).resolve(&other_uri),
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
        assert_eq!(
            resolver(&[]).resolve(&der),
            Err(IdentityError::UnknownAgency("council-york".into()))
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
        assert!(matches!(
            resolver(&[]).resolve(b"not a certificate"),
            Err(IdentityError::Malformed(_))
        ));
    }

    #[test]
    fn subject_mapping_names_the_agency() {
        let der = issue(vec![], NHS_GATEWAY);
        let mapped = resolver(&[by_subject("CN=nhs-gateway,O=Demo NHS Trust,C=GB", "nhs")]);
        assert_eq!(mapped.resolve(&der).as_deref(), Ok("nhs"));

        let other = resolver(&[by_subject("CN=nhs-gateway,O=Other Trust,C=GB", "nhs")]);
        assert_eq!(other.resolve(&der), Err(IdentityError::NoAgencySan));
    }

    #[test]
    fn san_mapping_by_dns_email_and_uri() {
        let der = issue(
            vec![
                dns("CAD.fire.example.gov.uk"),
                email("Ops@Fire.Example"),
                uri("https://fire.example/cad"),
            ],
            &[(DnType::CommonName, "cad")],
        );
        for (san, hit) in [
            ("cad.fire.example.gov.uk", true),
            ("DNS:cad.fire.example.gov.uk", true),
            ("email:cad.fire.example.gov.uk", false),
            ("Ops@fire.example", true),
            ("ops@fire.example", false),
            ("https://fire.example/cad", true),
            ("URI:https://fire.example/cad", true),
            ("https://fire.example/CAD", false),
        ] {
            let got = resolver(&[by_san(san, "fire")]).resolve(&der);
            if hit {
                assert_eq!(got.as_deref(), Ok("fire"), "{san}");
            } else {
                assert_eq!(got, Err(IdentityError::NoAgencySan), "{san}");
            }
        }
    }

    #[test]
    fn order_is_agency_san_then_san_mapping_then_subject() {
        let mappings = [
            by_subject("CN=nhs-gateway,O=Demo NHS Trust,C=GB", "nhs"),
            by_san("gw.example", "fire"),
        ];
        let r = resolver(&mappings);
        let subject_only = issue(vec![], NHS_GATEWAY);
        let san_and_subject = issue(vec![dns("gw.example")], NHS_GATEWAY);
        let all_three = issue(
            vec![dns("gw.example"), uri("urn:joinery:agency:police")],
            NHS_GATEWAY,
        );
        assert_eq!(r.resolve(&subject_only).as_deref(), Ok("nhs"));
        assert_eq!(r.resolve(&san_and_subject).as_deref(), Ok("fire"));
        assert_eq!(r.resolve(&all_three).as_deref(), Ok("police"));
    }

    #[test]
    fn mappings_to_two_agencies_are_ambiguous_and_unknown_agencies_refused() {
        let der = issue(vec![dns("a.example"), dns("b.example")], &[]);
        let r = resolver(&[by_san("a.example", "fire"), by_san("b.example", "nhs")]);
        assert_eq!(
            r.resolve(&der),
            Err(IdentityError::AmbiguousMapping(vec![
                "fire".into(),
                "nhs".into()
            ]))
        );
        let same = resolver(&[by_san("a.example", "fire"), by_san("b.example", "fire")]);
        assert_eq!(same.resolve(&der).as_deref(), Ok("fire"));

        let unknown = resolver(&[by_san("a.example", "ambulance")]);
        assert_eq!(
            unknown.resolve(&der),
            Err(IdentityError::UnknownAgency("ambulance".into()))
        );
    }

    #[test]
    fn bad_mappings_are_refused_at_start() {
        let err = IdentityResolver::new(Vec::new(), &[by_subject("CN=a,XX=b", "nhs")]).unwrap_err();
        assert!(
            err.to_string().contains("[[identity]] #1") && err.to_string().contains("XX"),
            "{err}"
        );
        let neither = IdentityConfig {
            subject: None,
            san: None,
            agency: "nhs".into(),
        };
        assert!(IdentityResolver::new(Vec::new(), &[neither]).is_err());
    }

    #[test]
    fn peer_info_reports_serial_and_missing_certificate() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca.issue_agency("council-leeds").unwrap();
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let chain = [leaf_der(&issued.cert_pem)];
        let (info, leaf) = PeerInfo::inspect(addr, Some(&chain), &resolver(&[]));
        assert_eq!(info.identity.as_deref(), Ok("council-leeds"));
        assert_eq!(info.serial.as_deref(), Some(issued.serial.as_str()));
        assert_eq!(leaf.map(|l| hex(&l.serial)), Some(issued.serial.clone()));

        let none = PeerInfo::from_certificates(addr, None, &resolver(&[]));
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
            "the client certificate has no URI SAN urn:joinery:agency:<id> and matches no \
             [[identity]] mapping; ask your operator for a certificate issued for your agency"
        );
    }
}
