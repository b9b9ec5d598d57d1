//! Certificates for joinery's mutual TLS, made in-process with rcgen.
//!
//! A [`CertificateAuthority`] is a CA certificate plus its private key. It issues
//! agency client certificates (the agency id in the URI SAN
//! `urn:joinery:agency:<id>`, which is what [`crate::tls::agency_from_cert`] reads
//! back), server certificates, and arbitrary certificates for tests
//! ([`CertificateAuthority::issue_with`]). [`ensure_dev_pki`] lays out the
//! development PKI that `joinery serve` creates on first start with the default
//! config, and [`write_pem`] is the one place that writes PEM files.
//!
//! `joinery pki` ([`cli`]) manages a CA directory ([`CaDir`]): the CA, the index
//! of issued certificates ([`index`]) and the CRL ([`crl`]) that brokers load
//! through `[tls] crl`.
//!
//! Invariants:
//! - Every issued certificate has a fresh key pair and a random 16-byte positive
//!   serial; [`IssuedCert::serial`] is the lowercase hex of the serial's DER content
//!   bytes, exactly as [`crate::tls::PeerInfo::serial`] reports it for a live peer.
//! - A CA reloaded with [`CertificateAuthority::load`] issues certificates whose
//!   issuer name is byte-for-byte the CA's subject name (checked on load), so chains
//!   keep validating across restarts.
//! - Private keys reach the disk only through [`write_pem`]: created with mode 0600
//!   before any byte is written, then renamed into place, never world-readable.
//! - Nothing here panics on a bad file: every failure is a [`PkiError`].

mod ca_dir;
pub mod cli;
mod crl;
mod index;

pub use ca_dir::{CaDir, CrlSummary, IssuedFiles, Revocation, DEFAULT_CRL_VALIDITY};
pub use crl::{normalize_serial, parse_crl, CrlInfo, RevocationReason, RevokedSerial};
pub use index::{CertKind, CertStatus, Index, IndexEntry};

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::x509::X509Name;

/// The URI SAN prefix that names an agency in a client certificate.
pub const AGENCY_URI_PREFIX: &str = "urn:joinery:agency:";

/// Validity of a CA certificate made by [`CertificateAuthority::generate`].
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Validity of agency and server certificates.
const LEAF_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 60 * 60);
/// `not_before` is back-dated by this much to tolerate clock skew between hosts.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Length of random serial numbers, in bytes.
const SERIAL_LEN: usize = 16;
/// Longest accepted agency id.
const MAX_AGENCY_ID_LEN: usize = 64;
/// Common name of the CA made by [`ensure_dev_pki`].
const DEV_CA_NAME: &str = "joinery development CA";
/// Names in the development server certificate.
const DEV_SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Errors from making, loading and writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Unsupported(String),
    #[error("failed to generate a key pair")]
    GenerateKey(#[source] rcgen::Error),
    #[error("failed to sign the certificate for {subject}")]
    Sign {
        subject: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the system random number generator failed")]
    Random,
    #[error("invalid agency id {id:?}: {reason}")]
    InvalidAgencyId { id: String, reason: &'static str },
    #[error("{name:?} is not a valid DNS name or IP address")]
    InvalidServerName {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{name:?} is not a valid DNS name or IP address: {reason}")]
    BadServerName { name: String, reason: &'static str },
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoServerNames,
    #[error("invalid CA certificate: {reason}")]
    InvalidCaCert { reason: String },
    #[error("invalid CA private key")]
    InvalidCaKey(#[source] rcgen::Error),
    #[error("the CA private key does not match the CA certificate")]
    CaKeyMismatch,
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("found {present} but not {missing}; restore {missing} or remove {present}")]
    IncompletePair { present: PathBuf, missing: PathBuf },
    #[error(
        "{leaf} exists but its CA ({ca}) does not; remove the development PKI directory {dir} to start afresh"
    )]
    OrphanedLeaf {
        leaf: PathBuf,
        ca: PathBuf,
        dir: PathBuf,
    },
    #[error("the CA name must not be empty")]
    InvalidName,
    #[error("a CA already exists in {dir} ({path} is there); refusing to overwrite it: choose another --dir, or remove the directory if you really mean to start a new CA")]
    CaExists { dir: PathBuf, path: PathBuf },
    #[error("no CA in {dir}: run `joinery pki init --dir {dir}` first, or pass the --dir that holds ca.pem and ca.key")]
    NoCa { dir: PathBuf },
    #[error("{path} already exists; pass --force to replace it (the certificate it holds stays valid until it expires or you revoke it)")]
    OutputExists { path: PathBuf },
    #[error("invalid {what} validity: {reason}")]
    InvalidDays { what: &'static str, reason: String },
    #[error("invalid serial {serial:?}: {reason}")]
    InvalidSerial {
        serial: String,
        reason: &'static str,
    },
    #[error("serial {serial} is not in {index}: this CA did not issue it (`openssl x509 -noout -serial -in CERT.pem` prints a certificate's serial)")]
    UnknownSerial { serial: String, index: PathBuf },
    #[error("{path} line {line}: {reason}")]
    BadIndex {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{what} is not a usable CRL: {reason}")]
    BadCrl { what: String, reason: String },
    #[error("failed to sign the CRL")]
    SignCrl(#[source] rcgen::Error),
}

/// A certificate and private key issued by a [`CertificateAuthority`].
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM encoded.
    pub cert_pem: String,
    /// The certificate's private key, PKCS#8 PEM encoded.
    pub key_pem: String,
    /// Lowercase hex of the serial number's DER content bytes.
    pub serial: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// A CA certificate and its key, able to issue certificates.
#[derive(Debug)]
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Generates a self-signed CA (ECDSA P-256) valid for ten years, with key usages
    /// certificate sign and CRL sign. It may issue end-entity certificates only.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, CA_VALIDITY);
        params.serial_number = Some(random_serial()?);

        let key = KeyPair::generate().map_err(PkiError::GenerateKey)?;
        let cert = params.self_signed(&key).map_err(|source| PkiError::Sign {
            subject: common_name.to_owned(),
            source,
        })?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM encoded.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PKCS#8 PEM encoded.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> Result<SystemTime, PkiError> {
        ca_dir::cert_not_after(&self.cert_pem).ok_or_else(|| PkiError::InvalidCaCert {
            reason: "cannot read its expiry time".into(),
        })
    }

    /// Reloads a CA from its certificate and key so it can issue more certificates.
    ///
    /// Checks that the certificate is a CA, that the key belongs to it, and that
    /// certificates issued from it will name it exactly as its subject.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let der = single_cert_der(cert_pem)?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::InvalidCaCert {
                reason: format!("cannot parse the certificate: {e}"),
            })?;
        let is_ca = x509
            .basic_constraints()
            .map_err(|e| PkiError::InvalidCaCert {
                reason: format!("bad basic constraints extension: {e}"),
            })?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(PkiError::InvalidCaCert {
                reason: "it is not a CA certificate (basic constraints CA:TRUE missing)".into(),
            });
        }

        let key = KeyPair::from_pem(key_pem).map_err(PkiError::InvalidCaKey)?;
        if key.subject_public_key_info() != x509.public_key().raw {
            return Err(PkiError::CaKeyMismatch);
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(x509.subject())?;
        params.key_usages = key_usages(&x509)?;
        params.key_identifier_method = subject_key_id(&x509)
            .map(KeyIdMethod::PreSpecified)
            .unwrap_or(KeyIdMethod::Sha256);
        let ca = Self {
            cert_pem: cert_pem.to_owned(),
            issuer: Issuer::new(params, key),
        };

        // Certificates are chained by comparing the leaf's issuer bytes with the CA's
        // subject bytes, so prove the re-encoded name is identical.
        let probe = CertificateParams::default()
            .signed_by(ca.issuer.key(), &ca.issuer)
            .map_err(|source| PkiError::Sign {
                subject: "CA name probe".into(),
                source,
            })?;
        let (_, probe) = x509_parser::parse_x509_certificate(probe.der()).map_err(|e| {
            PkiError::InvalidCaCert {
                reason: format!("cannot parse a probe certificate: {e}"),
            }
        })?;
        if probe.issuer().as_raw() != x509.subject().as_raw() {
            return Err(PkiError::InvalidCaCert {
                reason: "its subject name uses an encoding this tool cannot reproduce".into(),
            });
        }
        Ok(ca)
    }

    /// Issues a client certificate for an agency: CN and URI SAN
    /// `urn:joinery:agency:<id>`, extended key usage clientAuth, two-year validity.
    pub fn issue_agency(&self, agency_id: &str) -> Result<IssuedCert, PkiError> {
        self.issue_agency_valid_for(agency_id, LEAF_VALIDITY)
    }

    /// [`Self::issue_agency`] valid for `validity` from now.
    pub fn issue_agency_valid_for(
        &self,
        agency_id: &str,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        validate_agency_id(agency_id)?;
        let uri = format!("{AGENCY_URI_PREFIX}{agency_id}");
        let uri = Ia5String::try_from(uri).map_err(|_| PkiError::InvalidAgencyId {
            id: agency_id.to_owned(),
            reason: "it must be ASCII",
        })?;
        let mut params = leaf_params(agency_id, validity);
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_with(params)
    }

    /// Issues a server certificate: extended key usage serverAuth, two-year validity.
    /// Names that parse as IP addresses become IP SANs, the others DNS SANs; the
    /// first name is also the subject CN.
    pub fn issue_server(&self, dns_names: &[String]) -> Result<IssuedCert, PkiError> {
        self.issue_server_valid_for(dns_names, LEAF_VALIDITY)
    }

    /// [`Self::issue_server`] valid for `validity` from now.
    pub fn issue_server_valid_for(
        &self,
        dns_names: &[String],
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let first = dns_names.first().ok_or(PkiError::NoServerNames)?;
        let sans = dns_names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => {
                    validate_dns_name(name)?;
                    Ia5String::try_from(name.as_str())
                        .map(SanType::DnsName)
                        .map_err(|source| PkiError::InvalidServerName {
                            name: name.clone(),
                            source,
                        })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut params = leaf_params(first, validity);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_with(params)
    }

    /// Issues a certificate from caller-made parameters (tests: no SAN, odd
    /// validity, ...) with a fresh key pair. A random serial is set when
    /// `params.serial_number` is `None`.
    pub fn issue_with(&self, mut params: CertificateParams) -> Result<IssuedCert, PkiError> {
        if params.serial_number.is_none() {
            params.serial_number = Some(random_serial()?);
        }
        let key = KeyPair::generate().map_err(PkiError::GenerateKey)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Sign {
                subject: subject_label(&params),
                source,
            })?;
        // Read the serial back from the certificate so it matches what a TLS peer
        // reports byte for byte (DER may add a leading zero).
        let serial = match x509_parser::parse_x509_certificate(cert.der()) {
            Ok((_, x509)) => hex(x509.raw_serial()),
            Err(_) => params
                .serial_number
                .as_ref()
                .map(|s| hex(&s.to_bytes()))
                .unwrap_or_default(),
        };
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }
}

/// Writes a PEM file: private keys with mode 0600, certificates with mode 0644.
/// Missing parent directories are created with mode 0700.
///
/// The file is written to a temporary sibling created with its final mode (so a
/// key is never readable by others, not even for a moment), synced, then renamed
/// over `path`.
pub fn write_pem(path: &Path, pem: &str, private: bool) -> Result<(), PkiError> {
    let io_err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io {
            action,
            path,
            source,
        }
    };
    let mode = if private { 0o600 } else { 0o644 };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(io_err("create directory", parent))?;

    let file_name = path.file_name().ok_or_else(|| PkiError::Io {
        action: "write",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = parent.join(tmp_name);

    // A leftover from a crashed run may exist; it is ours to replace.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove stale temporary file", &tmp)(e)),
    }
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        // The umask may have narrowed a certificate's mode; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("set permissions of", &tmp))?;
        file.write_all(pem.as_bytes())
            .map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Make the rename durable; failure here leaves a correct file, so ignore it.
    if let Ok(dir) = fs::File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The files of a development PKI, as laid out by [`ensure_dev_pki`].
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The PKI directory.
    pub dir: PathBuf,
    /// `ca.pem`, the CA certificate (its key is `ca.key` beside it).
    pub ca: PathBuf,
    /// `server.pem`.
    pub server_cert: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    /// `(agency id, agencies/<id>.pem, agencies/<id>.key)` for each requested agency.
    pub agencies: Vec<(String, PathBuf, PathBuf)>,
    /// Whether this call wrote anything.
    pub created: bool,
}

/// Development PKI for the embedded default config: under `dir` creates (only what
/// is missing) `ca.pem` + `ca.key`, `server.pem` + `server.key` (names `localhost`,
/// `127.0.0.1`, `::1`), and `agencies/<id>.pem` + `agencies/<id>.key` for every id
/// in `agencies`.
///
/// Idempotent: an existing CA is loaded and reused, existing files are left alone.
/// Half a pair (a certificate without its key or the reverse) is an error rather
/// than something to overwrite, and so are leaf certificates without their CA.
pub fn ensure_dev_pki(dir: &Path, agencies: &[String]) -> Result<DevPki, PkiError> {
    for id in agencies {
        validate_agency_id(id)?;
    }
    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca.key");
    let server_cert = dir.join("server.pem");
    let server_key = dir.join("server.key");
    let agency_dir = dir.join("agencies");
    let agency_files: Vec<(String, PathBuf, PathBuf)> = agencies
        .iter()
        .map(|id| {
            (
                id.clone(),
                agency_dir.join(format!("{id}.pem")),
                agency_dir.join(format!("{id}.key")),
            )
        })
        .collect();

    let mut created = false;
    let ca = if pair_exists(&ca_cert, &ca_key)? {
        CertificateAuthority::load(&read(&ca_cert)?, &read(&ca_key)?)?
    } else {
        // Leaves signed by a lost CA would fail every handshake: refuse, loudly.
        let leaves = std::iter::once((&server_cert, &server_key))
            .chain(agency_files.iter().map(|(_, c, k)| (c, k)));
        for (cert, key) in leaves {
            for leaf in [cert, key] {
                if exists(leaf)? {
                    return Err(PkiError::OrphanedLeaf {
                        leaf: leaf.clone(),
                        ca: ca_cert.clone(),
                        dir: dir.to_path_buf(),
                    });
                }
            }
        }
        let ca = CertificateAuthority::generate(DEV_CA_NAME)?;
        write_pair(&ca_cert, &ca.cert_pem, &ca_key, &ca.key_pem())?;
        created = true;
        ca
    };

    if !pair_exists(&server_cert, &server_key)? {
        let names: Vec<String> = DEV_SERVER_NAMES.iter().map(|s| s.to_string()).collect();
        let issued = ca.issue_server(&names)?;
        write_pair(&server_cert, &issued.cert_pem, &server_key, &issued.key_pem)?;
        created = true;
    }

    for (id, cert, key) in &agency_files {
        if !pair_exists(cert, key)? {
            let issued = ca.issue_agency(id)?;
            write_pair(cert, &issued.cert_pem, key, &issued.key_pem)?;
            created = true;
        }
    }

    Ok(DevPki {
        dir: dir.to_path_buf(),
        ca: ca_cert,
        server_cert,
        server_key,
        agencies: agency_files,
        created,
    })
}

/// Lowercase hex without separators.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Agency ids become URI SANs and file names: 1 to 64 ASCII letters, digits, `-`,
/// `_` or `.`, starting with a letter or digit.
fn validate_agency_id(id: &str) -> Result<(), PkiError> {
    let reason = if id.is_empty() {
        Some("it is empty")
    } else if id.len() > MAX_AGENCY_ID_LEN {
        Some("it is longer than 64 characters")
    } else if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Some("it must start with a letter or digit")
    } else if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Some("it may hold only ASCII letters, digits, '-', '_' and '.'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(PkiError::InvalidAgencyId {
            id: id.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A DNS name for a server certificate: dot-separated labels of ASCII letters,
/// digits and `-` (not at either end of a label), each 1 to 63 characters, at
/// most 253 in all; the first label may be the wildcard `*`.
fn validate_dns_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason| PkiError::BadServerName {
        name: name.to_owned(),
        reason,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Err(bad("a DNS name has 1 to 253 characters"));
    }
    for (i, label) in name.split('.').enumerate() {
        let ok = (i == 0 && label == "*")
            || (!label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !ok {
            return Err(bad(
                "each dot-separated label must be 1-63 ASCII letters, digits or '-', not starting or ending with '-'",
            ));
        }
    }
    Ok(())
}

/// Parameters shared by agency and server certificates, valid for `validity`.
fn leaf_params(common_name: &str, validity: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity);
    params
}

/// Valid from a few minutes ago (clock skew) for `validity` from now.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch.saturating_sub(CLOCK_SKEW);
    params.not_after = epoch + since_epoch + validity;
}

/// A random positive serial of exactly [`SERIAL_LEN`] DER content bytes.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; SERIAL_LEN];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    // Clear the sign bit and avoid a leading zero, so DER stores the bytes as-is.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(SerialNumber::from_slice(&bytes))
}

/// A label for error messages: the CN if any.
fn subject_label(params: &CertificateParams) -> String {
    match params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(s)) => s.clone(),
        Some(DnValue::PrintableString(s)) => s.as_str().to_owned(),
        _ => "an unnamed subject".to_owned(),
    }
}

/// The DER of the only certificate in `pem`.
fn single_cert_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::InvalidCaCert {
            reason: format!("bad PEM: {e}"),
        })?;
    match certs.as_slice() {
        [only] => Ok(only.to_vec()),
        [] => Err(PkiError::InvalidCaCert {
            reason: "no PEM CERTIFICATE block found".into(),
        }),
        _ => Err(PkiError::InvalidCaCert {
            reason: format!("expected one certificate, found {}", certs.len()),
        }),
    }
}

/// Rebuilds an rcgen name from a parsed one, keeping each value's string type so
/// that rcgen encodes it identically.
fn distinguished_name(name: &X509Name<'_>) -> Result<DistinguishedName, PkiError> {
    let invalid = |reason: &str| PkiError::InvalidCaCert {
        reason: format!("unsupported subject name: {reason}"),
    };
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(invalid("multi-valued or empty relative distinguished name"));
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| invalid("attribute type out of range"))?
            .collect();
        let value = attr.attr_value();
        let text = std::str::from_utf8(value.data).map_err(|_| invalid("non-UTF-8 value"))?;
        let value = match value.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(
                PrintableString::try_from(text).map_err(|_| invalid("bad PrintableString"))?,
            ),
            Tag::Ia5String => {
                DnValue::Ia5String(Ia5String::try_from(text).map_err(|_| invalid("bad IA5String"))?)
            }
            _ => return Err(invalid("string type other than UTF8, Printable or IA5")),
        };
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            return Err(invalid("repeated attribute type"));
        }
        dn.push(ty, value);
    }
    Ok(dn)
}

/// The key usages of a parsed certificate, in rcgen's terms.
fn key_usages(x509: &X509Certificate<'_>) -> Result<Vec<KeyUsagePurpose>, PkiError> {
    let usage = x509.key_usage().map_err(|e| PkiError::InvalidCaCert {
        reason: format!("bad key usage extension: {e}"),
    })?;
    let Some(usage) = usage else {
        return Ok(Vec::new());
    };
    let ku = usage.value;
    let all = [
        (ku.digital_signature(), KeyUsagePurpose::DigitalSignature),
        (ku.non_repudiation(), KeyUsagePurpose::ContentCommitment),
        (ku.key_encipherment(), KeyUsagePurpose::KeyEncipherment),
        (ku.data_encipherment(), KeyUsagePurpose::DataEncipherment),
        (ku.key_agreement(), KeyUsagePurpose::KeyAgreement),
        (ku.key_cert_sign(), KeyUsagePurpose::KeyCertSign),
        (ku.crl_sign(), KeyUsagePurpose::CrlSign),
        (ku.encipher_only(), KeyUsagePurpose::EncipherOnly),
        (ku.decipher_only(), KeyUsagePurpose::DecipherOnly),
    ];
    Ok(all
        .into_iter()
        .filter_map(|(set, purpose)| set.then_some(purpose))
        .collect())
}

/// The subject key identifier, so issued certificates' authority key identifier
/// matches it whatever method made it.
fn subject_key_id(x509: &X509Certificate<'_>) -> Option<Vec<u8>> {
    x509.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(|source| PkiError::Io {
        action: "check",
        path: path.to_path_buf(),
        source,
    })
}

/// Whether both files of a pair exist; half a pair is an error.
fn pair_exists(cert: &Path, key: &Path) -> Result<bool, PkiError> {
    match (exists(cert)?, exists(key)?) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(PkiError::IncompletePair {
            present: cert.to_path_buf(),
            missing: key.to_path_buf(),
        }),
        (false, true) => Err(PkiError::IncompletePair {
            present: key.to_path_buf(),
            missing: cert.to_path_buf(),
        }),
    }
}

fn write_pair(cert: &Path, cert_pem: &str, key: &Path, key_pem: &str) -> Result<(), PkiError> {
    write_pem(key, key_pem, true)?;
    write_pem(cert, cert_pem, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{agency_from_cert, IdentityError};
    use rustls::pki_types::{CertificateDer, UnixTime};
    use rustls::server::WebPkiClientVerifier;
    use std::sync::Arc;

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("one certificate")
            .expect("valid pem")
    }

    fn any_agency(_: &str) -> bool {
        true
    }

    /// Verifies `leaf` as a client certificate against `ca` with webpki.
    fn verifies_as_client(ca: &CertificateAuthority, leaf: &IssuedCert) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&ca.cert_pem())).expect("ca accepted");
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        verifier
            .verify_client_cert(&der(&leaf.cert_pem), &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn reloaded_ca_issues_certificates_that_chain_to_it() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let reloaded = CertificateAuthority::load(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(reloaded.cert_pem(), ca.cert_pem());
        assert_eq!(reloaded.key_pem(), ca.key_pem());

        let from_original = ca.issue_agency("council-leeds").unwrap();
        let from_reloaded = reloaded.issue_agency("council-leeds").unwrap();
        assert!(verifies_as_client(&ca, &from_original));
        assert!(verifies_as_client(&ca, &from_reloaded));
        assert_ne!(from_original.serial, from_reloaded.serial);
        assert_eq!(from_original.serial.len(), 2 * SERIAL_LEN);
    }

    #[test]
    fn load_rejects_a_key_from_another_ca() {
        let a = CertificateAuthority::generate("a").unwrap();
        let b = CertificateAuthority::generate("b").unwrap();
        assert!(matches!(
            CertificateAuthority::load(&a.cert_pem(), &b.key_pem()),
            Err(PkiError::CaKeyMismatch)
        ));
    }

    #[test]
    fn load_rejects_a_leaf_certificate_and_garbage() {
        let ca = CertificateAuthority::generate("a").unwrap();
        let leaf = ca.issue_agency("police-west").unwrap();
        assert!(matches!(
            CertificateAuthority::load(&leaf.cert_pem, &leaf.key_pem),
            Err(PkiError::InvalidCaCert { .. })
        ));
        assert!(matches!(
            CertificateAuthority::load("not pem", &ca.key_pem()),
            Err(PkiError::InvalidCaCert { .. })
        ));
        assert!(matches!(
            CertificateAuthority::load(&ca.cert_pem(), "not pem"),
            Err(PkiError::InvalidCaKey(_))
        ));
    }

    #[test]
    fn agency_certificate_carries_the_agency_uri_san() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let issued = ca.issue_agency("council-leeds").unwrap();
        let leaf = der(&issued.cert_pem);
        assert_eq!(
            agency_from_cert(&leaf, &any_agency).as_deref(),
            Ok("council-leeds")
        );
        assert_eq!(
            agency_from_cert(&leaf, &|id| id == "police-west"),
            Err(IdentityError::UnknownAgency("council-leeds".into()))
        );

        let (_, x509) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        assert_eq!(hex(x509.raw_serial()), issued.serial);
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let days = (x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp())
            / 86_400;
        assert!((730..=731).contains(&days), "{days} days");
    }

    #[test]
    fn agency_ids_that_are_not_safe_names_are_refused() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        for id in ["", "../etc", "a/b", ".hidden", "sp ace", "caf\u{e9}"] {
            assert!(
                matches!(ca.issue_agency(id), Err(PkiError::InvalidAgencyId { .. })),
                "{id:?}"
            );
        }
    }

    #[test]
    fn server_certificate_has_ip_and_dns_sans() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let names = ["localhost", "127.0.0.1", "::1"].map(String::from);
        let issued = ca.issue_server(&names).unwrap();
        let leaf = der(&issued.cert_pem);
        let (_, x509) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let sans = &x509
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        use x509_parser::extensions::GeneralName;
        assert!(sans.contains(&GeneralName::DNSName("localhost")));
        assert!(sans.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert!(sans.contains(&GeneralName::IPAddress(&v6)));
        assert!(!sans
            .iter()
            .any(|n| matches!(n, GeneralName::DNSName("127.0.0.1"))));
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth);
        assert!(matches!(ca.issue_server(&[]), Err(PkiError::NoServerNames)));
        for bad in [
            "not a name",
            "",
            "-x.example",
            "a..b",
            "caf\u{e9}.uk",
            "x_y.uk",
        ] {
            assert!(
                matches!(
                    ca.issue_server(&[bad.to_string()]),
                    Err(PkiError::BadServerName { .. })
                ),
                "{bad:?}"
            );
        }
        for good in ["*.leeds.gov.uk", "broker-1.example.", "localhost"] {
            assert!(ca.issue_server(&[good.to_string()]).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn write_pem_sets_modes_and_replaces_files() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("pki/nested/a.key");
        let cert = tmp.path().join("pki/nested/a.pem");
        write_pem(&key, "KEY", true).unwrap();
        write_pem(&cert, "CERT", false).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(mode(&tmp.path().join("pki")), 0o700);
        write_pem(&key, "KEY2", true).unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), "KEY2");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(
            fs::read_dir(tmp.path().join("pki/nested")).unwrap().count(),
            2
        );
    }

    #[test]
    fn ensure_dev_pki_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let agencies = vec!["council-leeds".to_string(), "police-west".to_string()];
        let first = ensure_dev_pki(&dir, &agencies).unwrap();
        assert!(first.created);
        let ca_bytes = fs::read(&first.ca).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(mode(&first.server_key), 0o600);
        for (_, cert, key) in &first.agencies {
            assert_eq!(mode(key), 0o600);
            assert_eq!(mode(cert), 0o644);
        }
        assert_eq!(mode(&dir), 0o700);

        let second = ensure_dev_pki(&dir, &agencies).unwrap();
        assert!(!second.created);
        assert_eq!(fs::read(&second.ca).unwrap(), ca_bytes);

        // A new agency is issued from the same CA; the others are untouched.
        let leeds_before = fs::read(&first.agencies[0].1).unwrap();
        let mut more = agencies.clone();
        more.push("nhs-trust".into());
        let third = ensure_dev_pki(&dir, &more).unwrap();
        assert!(third.created);
        assert_eq!(fs::read(&third.ca).unwrap(), ca_bytes);
        assert_eq!(fs::read(&third.agencies[0].1).unwrap(), leeds_before);
        let ca = CertificateAuthority::load(
            &fs::read_to_string(&third.ca).unwrap(),
            &fs::read_to_string(dir.join("ca.key")).unwrap(),
        )
        .unwrap();
        let nhs = IssuedCert {
            cert_pem: fs::read_to_string(&third.agencies[2].1).unwrap(),
            key_pem: String::new(),
            serial: String::new(),
        };
        assert!(verifies_as_client(&ca, &nhs));
    }

    #[test]
    fn ensure_dev_pki_refuses_half_pairs_and_orphans() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let pki = ensure_dev_pki(&dir, &[]).unwrap();
        fs::remove_file(&pki.server_key).unwrap();
        assert!(matches!(
            ensure_dev_pki(&dir, &[]),
            Err(PkiError::IncompletePair { .. })
        ));
        fs::remove_file(&pki.server_cert).unwrap();
        ensure_dev_pki(&dir, &[]).unwrap();
        fs::remove_file(&pki.ca).unwrap();
        fs::remove_file(dir.join("ca.key")).unwrap();
        assert!(matches!(
            ensure_dev_pki(&dir, &[]),
            Err(PkiError::OrphanedLeaf { .. })
        ));
    }
}
