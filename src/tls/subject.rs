//! Certificate subject names as `[[identity]] subject` compares them.
//!
//! # Text form
//! A subject is written as RFC 4514 text, most specific attribute first, as
//! `openssl x509 -noout -subject -nameopt RFC2253` prints it:
//! `CN=nhs-gateway,O=Demo NHS Trust,C=GB`. Openssl's default one-line form
//! (`C = GB, O = Demo NHS Trust, CN = nhs-gateway`, least specific first) is
//! accepted too, because:
//!
//! - Relative distinguished names (RDNs) are separated by `,`; attributes of a
//!   multi-valued RDN by `+` (`CN=a+UID=b`); type and value by the first `=`.
//! - Attribute types are matched case-insensitively by name — `CN`, `SN`,
//!   `SERIALNUMBER`, `C`, `L`, `ST` (or `S`), `STREET`, `O`, `OU`, `T`/`TITLE`,
//!   `GN`/`GIVENNAME`, `INITIALS`, `POSTALCODE`, `ORGANIZATIONIDENTIFIER`, `DC`,
//!   `UID`, `emailAddress` (or `E`) — or given as a dotted OID (`2.5.4.97`,
//!   `OID.2.5.4.97`).
//! - Values are compared exactly (case-sensitively) after trimming spaces at
//!   both ends. `\` escapes a special character (`\,` `\+` `\=` `\\` `\"` `\;`
//!   `\<` `\>` `\#` `\ `) or gives a byte in hex (`\C3\A9` is `é`). Hex-encoded
//!   values (`CN=#0c03...`) are not supported.
//! - The certificate's RDNs must match all of the text's, in the same order or
//!   in reverse order (so both the most-specific-first and the DER order work);
//!   within a multi-valued RDN the order does not matter.
//!
//! Certificate values are read from UTF8String, PrintableString, IA5String,
//! NumericString, BMPString, UniversalString and TeletexString (as Latin-1).

use std::fmt;

use x509_parser::asn1_rs::Tag;
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

/// A parsed subject: RDNs in the order written (or, from a certificate, in
/// DER order); each RDN's attributes sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectName {
    rdns: Vec<Rdn>,
}

/// One RDN: (attribute type OID in dotted form, value), sorted.
type Rdn = Vec<(String, String)>;

/// Why a subject text cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SubjectError(String);

/// Attribute type names and their OIDs.
const ATTRIBUTE_TYPES: &[(&str, &str)] = &[
    ("CN", "2.5.4.3"),
    ("COMMONNAME", "2.5.4.3"),
    ("SN", "2.5.4.4"),
    ("SURNAME", "2.5.4.4"),
    ("SERIALNUMBER", "2.5.4.5"),
    ("C", "2.5.4.6"),
    ("COUNTRYNAME", "2.5.4.6"),
    ("L", "2.5.4.7"),
    ("LOCALITYNAME", "2.5.4.7"),
    ("ST", "2.5.4.8"),
    ("S", "2.5.4.8"),
    ("STATEORPROVINCENAME", "2.5.4.8"),
    ("STREET", "2.5.4.9"),
    ("STREETADDRESS", "2.5.4.9"),
    ("O", "2.5.4.10"),
    ("ORGANIZATIONNAME", "2.5.4.10"),
    ("OU", "2.5.4.11"),
    ("ORGANIZATIONALUNITNAME", "2.5.4.11"),
    ("T", "2.5.4.12"),
    ("TITLE", "2.5.4.12"),
    ("POSTALCODE", "2.5.4.17"),
    ("GN", "2.5.4.42"),
    ("GIVENNAME", "2.5.4.42"),
    ("INITIALS", "2.5.4.43"),
    ("GENERATIONQUALIFIER", "2.5.4.44"),
    ("DNQUALIFIER", "2.5.4.46"),
    ("PSEUDONYM", "2.5.4.65"),
    ("ORGANIZATIONIDENTIFIER", "2.5.4.97"),
    ("DC", "0.9.2342.19200300.100.1.25"),
    ("DOMAINCOMPONENT", "0.9.2342.19200300.100.1.25"),
    ("UID", "0.9.2342.19200300.100.1.1"),
    ("USERID", "0.9.2342.19200300.100.1.1"),
    ("EMAILADDRESS", "1.2.840.113549.1.9.1"),
    ("E", "1.2.840.113549.1.9.1"),
    ("EMAIL", "1.2.840.113549.1.9.1"),
];

impl SubjectName {
    /// Parses RFC 4514 text (see the module docs).
    pub fn parse(text: &str) -> Result<Self, SubjectError> {
        if text.trim().is_empty() {
            return Err(SubjectError("the subject is empty".into()));
        }
        let rdns = split_unescaped(text, ',')
            .into_iter()
            .map(|rdn| {
                let mut attributes = split_unescaped(rdn, '+')
                    .into_iter()
                    .map(parse_attribute)
                    .collect::<Result<Rdn, _>>()?;
                attributes.sort();
                Ok(attributes)
            })
            .collect::<Result<Vec<_>, SubjectError>>()?;
        Ok(Self { rdns })
    }

    /// The subject of a certificate, or `None` if an attribute value is not a
    /// string (such a subject matches no configured text).
    pub fn from_x509(name: &X509Name<'_>) -> Option<Self> {
        let rdns = name
            .iter()
            .map(|rdn| {
                let mut attributes = rdn
                    .iter()
                    .map(|attr| Some((attr.attr_type().to_id_string(), attribute_text(attr)?)))
                    .collect::<Option<Rdn>>()?;
                attributes.sort();
                Some(attributes)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self { rdns })
    }

    /// Whether `self` (configured) names the certificate subject `cert`: the
    /// same RDNs in the same or the reverse order.
    pub fn matches(&self, cert: &SubjectName) -> bool {
        self.rdns.len() == cert.rdns.len()
            && (self.rdns == cert.rdns || self.rdns.iter().eq(cert.rdns.iter().rev()))
    }
}

impl fmt::Display for SubjectName {
    /// Dotted OIDs and raw values; for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rdn) in self.rdns.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            for (j, (oid, value)) in rdn.iter().enumerate() {
                if j > 0 {
                    f.write_str("+")?;
                }
                let name = ATTRIBUTE_TYPES
                    .iter()
                    .find(|(_, o)| o == oid)
                    .map_or(oid.as_str(), |(n, _)| n);
                write!(f, "{name}={value}")?;
            }
        }
        Ok(())
    }
}

/// Splits on `sep` where it is not escaped by a backslash.
fn split_unescaped(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_attribute(text: &str) -> Result<(String, String), SubjectError> {
    let Some(eq) = first_unescaped(text, '=') else {
        return Err(SubjectError(format!("{:?} is not TYPE=value", text.trim())));
    };
    let (name, raw_value) = (text[..eq].trim(), text[eq + 1..].trim());
    let oid = attribute_oid(name)?;
    if raw_value.starts_with('#') {
        return Err(SubjectError(format!(
            "hex-encoded values are not supported ({name}={raw_value})"
        )));
    }
    let value = unescape(raw_value)?;
    Ok((oid, value.trim().to_owned()))
}

fn first_unescaped(text: &str, wanted: char) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == wanted {
            return Some(i);
        }
    }
    None
}

fn attribute_oid(name: &str) -> Result<String, SubjectError> {
    if name.is_empty() {
        return Err(SubjectError("an attribute type is missing".into()));
    }
    let dotted = name
        .get(..4)
        .filter(|p| p.eq_ignore_ascii_case("OID."))
        .map_or(name, |_| &name[4..]);
    let is_oid = dotted.split('.').count() >= 2
        && dotted
            .split('.')
            .all(|arc| !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()));
    if is_oid {
        return Ok(dotted.to_owned());
    }
    ATTRIBUTE_TYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, oid)| (*oid).to_owned())
        .ok_or_else(|| {
            SubjectError(format!(
                "unknown attribute type {name:?}; use a dotted OID such as 2.5.4.97"
            ))
        })
}

/// Resolves RFC 4514 escapes.
fn unescape(text: &str) -> Result<String, SubjectError> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some(h) if h.is_ascii_hexdigit() => {
                let low = chars
                    .next_if(char::is_ascii_hexdigit)
                    .ok_or_else(|| SubjectError(format!("bad escape \\{h} in {text:?}")))?;
                let (h, low) = (h.to_digit(16), low.to_digit(16));
                if let (Some(h), Some(low)) = (h, low) {
                    // Both are hex digits, so this fits a byte.
                    bytes.push((h * 16 + low) as u8);
                }
            }
            Some(special @ (',' | '+' | '=' | '\\' | '"' | ';' | '<' | '>' | '#' | ' ')) => {
                bytes.push(special as u8);
            }
            Some(other) => {
                return Err(SubjectError(format!("bad escape \\{other} in {text:?}")));
            }
            None => return Err(SubjectError(format!("{text:?} ends with a lone \\"))),
        }
    }
    String::from_utf8(bytes)
        .map_err(|_| SubjectError(format!("{text:?} escapes bytes that are not UTF-8")))
}

/// A certificate attribute value as text, trimmed.
fn attribute_text(attr: &AttributeTypeAndValue<'_>) -> Option<String> {
    let value = attr.attr_value();
    let data: &[u8] = value.data;
    let text = match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::NumericString => {
            std::str::from_utf8(data).ok()?.to_owned()
        }
        Tag::BmpString => {
            if data.len() % 2 != 0 {
                return None;
            }
            let units = data
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()?
        }
        Tag::UniversalString => {
            if data.len() % 4 != 0 {
                return None;
            }
            data.chunks_exact(4)
                .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                .collect::<Option<String>>()?
        }
        Tag::TeletexString => data.iter().map(|&b| char::from(b)).collect(),
        _ => return None,
    };
    Some(text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue};

    fn cert_subject(attrs: &[(DnType, DnValue)]) -> SubjectName {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for (ty, value) in attrs {
            params.distinguished_name.push(ty.clone(), value.clone());
        }
        let pem = ca.issue_with(params).unwrap().cert_pem;
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        SubjectName::from_x509(cert.subject()).unwrap()
    }

    fn utf8(s: &str) -> DnValue {
        DnValue::Utf8String(s.into())
    }

    /// C, O, CN in DER order, as most CAs write them.
    fn nhs_gateway() -> SubjectName {
        cert_subject(&[
            (
                DnType::CountryName,
                DnValue::PrintableString("GB".try_into().unwrap()),
            ),
            (DnType::OrganizationName, utf8("Demo NHS Trust")),
            (DnType::CommonName, utf8("nhs-gateway")),
        ])
    }

    #[test]
    fn rfc4514_text_matches_in_either_order() {
        let cert = nhs_gateway();
        for text in [
            "CN=nhs-gateway,O=Demo NHS Trust,C=GB",
            "cn=nhs-gateway, o=Demo NHS Trust, c=GB",
            "C = GB, O = Demo NHS Trust, CN = nhs-gateway",
            "commonName=nhs-gateway,2.5.4.10=Demo NHS Trust,OID.2.5.4.6=GB",
        ] {
            let name = SubjectName::parse(text).unwrap();
            assert!(name.matches(&cert), "{text} vs {cert}");
        }
    }

    #[test]
    fn values_are_exact_and_all_rdns_count() {
        let cert = nhs_gateway();
        for text in [
            "CN=NHS-Gateway,O=Demo NHS Trust,C=GB",
            "CN=nhs-gateway,O=Demo NHS Trust",
            "CN=nhs-gateway,O=Demo NHS Trust,C=GB,OU=Extra",
            "O=Demo NHS Trust,CN=nhs-gateway,C=GB",
            "CN=nhs-gateway,OU=Demo NHS Trust,C=GB",
        ] {
            let name = SubjectName::parse(text).unwrap();
            assert!(!name.matches(&cert), "{text} should not match {cert}");
        }
    }

    #[test]
    fn escapes_and_multi_valued_rdns() {
        let cert = cert_subject(&[
            (DnType::OrganizationName, utf8("Smith, Jones + Partners")),
            (DnType::CommonName, utf8("caf\u{e9}")),
        ]);
        let name = SubjectName::parse(r"CN=caf\C3\A9,O=Smith\, Jones \+ Partners").unwrap();
        assert!(name.matches(&cert));

        let a = SubjectName::parse("CN=a+UID=b,O=x").unwrap();
        let b = SubjectName::parse("UID=b+cn=a,O=x").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn email_address_attribute_by_any_name() {
        let cert = cert_subject(&[
            (
                DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
                DnValue::Ia5String("ops@nhs.example".try_into().unwrap()),
            ),
            (DnType::CommonName, utf8("ops")),
        ]);
        for text in [
            "CN=ops,emailAddress=ops@nhs.example",
            "CN=ops,E=ops@nhs.example",
        ] {
            assert!(SubjectName::parse(text).unwrap().matches(&cert), "{text}");
        }
    }

    #[test]
    fn bad_text_is_refused_with_a_reason() {
        for (text, fragment) in [
            ("", "empty"),
            ("CN", "not TYPE=value"),
            ("=x", "attribute type is missing"),
            ("XX=1", "unknown attribute type"),
            ("CN=#0c0161", "hex-encoded"),
            (r"CN=a\q", "bad escape"),
            (r"CN=a\", "lone"),
            (r"CN=\FF", "not UTF-8"),
        ] {
            let err = SubjectName::parse(text).unwrap_err().to_string();
            assert!(err.contains(fragment), "{text:?}: {err}");
        }
    }
}
