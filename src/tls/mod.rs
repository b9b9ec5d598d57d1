//! Server-side mutual TLS: the rustls configuration and its reloading, the
//! accept loop that hands established connections to tonic, the caller's agency
//! identity, and closing connections whose certificate is revoked or too old.
//!
//! Data flow: [`TlsState::load`] builds the `rustls::ServerConfig` from the PEM
//! files of `[tls]` (CA bundle, certificate, key, CRLs); [`spawn_reloader`]
//! reloads them on SIGHUP and when they change; an [`Acceptor`]
//! ([`tls_incoming`]) accepts TCP connections, runs each handshake in its own
//! task with the configuration in force, resolves the peer's agency once
//! ([`IdentityResolver`]), registers the connection, and yields [`Connection`]s
//! for `Server::serve_with_incoming_shutdown`; tonic then puts the connection's
//! [`PeerInfo`] into every request's extensions.
//!
//! The one exception to TLS is `[tls] insecure_plaintext_agency`, a mode for
//! measuring what TLS costs: [`Acceptor::plaintext`] serves plaintext HTTP/2,
//! every connection acting as that agency, and only on a loopback listener
//! (configuration validation refuses any other address too).
//!
//! Invariants:
//! - Exactly one crypto provider, ring, is used; [`crypto_provider`] is passed
//!   explicitly everywhere so the process default does not matter.
//! - A client certificate from an unknown CA, expired, not yet valid, revoked by
//!   a configured CRL, or whose issuer's CRL is stale fails the handshake, and
//!   the reason is logged with the peer's address. A client without a
//!   certificate completes it, but its [`PeerInfo::identity`] is
//!   `Err(IdentityError::NoCertificate)` so every request can be refused with
//!   `UNAUTHENTICATED` and a message the client can act on.
//! - Identity comes only from the verified leaf certificate (the URI SAN
//!   `urn:joinery:agency:<id>`, else an `[[identity]]` mapping of a SAN or the
//!   subject), never from anything the client sends later.
//! - A reload changes only new handshakes; a failed reload changes nothing.
//!   After a successful one, connections whose certificate the new CRLs revoke
//!   are closed; every connection is closed at `[tls] max_connection_age`.
//! - The accept loop never awaits a handshake; connections (handshaking or
//!   established) are bounded by a semaphore, handshakes by a timeout.

mod acceptor;
mod crl;
mod failure;
mod identity;
mod registry;
mod reload;
mod server_config;
mod state;
mod subject;

use std::path::PathBuf;

pub use acceptor::{
    is_loopback, tls_incoming, Acceptor, AcceptorSettings, CloseReason, Connection, Incoming,
};
pub use failure::handshake_failure_reason;
pub use identity::{agency_from_cert, IdentityError, IdentityResolver, PeerInfo};
pub use reload::{spawn_reloader, OnReload};
pub use server_config::{crypto_provider, install_crypto_provider, load_server_config};
pub use state::{ReloadReport, TlsState};
pub use subject::{SubjectError, SubjectName};

/// Errors setting up how connections are secured: building the TLS server
/// configuration (each names the file at fault) or the plaintext measurement
/// mode.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid PEM")]
    Pem {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no certificate in {path} (expected PEM \"BEGIN CERTIFICATE\" blocks)")]
    NoCertificate { path: PathBuf },
    #[error("no private key in {path} (expected a PEM PKCS#8, PKCS#1 or SEC1 private key)")]
    NoPrivateKey { path: PathBuf },
    #[error("CA certificate number {index} in {path} cannot be used as a trust anchor")]
    BadCaCertificate {
        path: PathBuf,
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("the private key in {path} cannot be used")]
    BadPrivateKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate in {cert} cannot be used with the key in {key}")]
    BadServerCertificate {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client certificate verifier from {ca}")]
    ClientVerifier {
        ca: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("the crypto provider does not support TLS 1.2 and 1.3")]
    ProtocolVersions(#[source] rustls::Error),
    #[error("no CRL in {path} (expected PEM \"BEGIN X509 CRL\" blocks)")]
    NoCrl { path: PathBuf },
    #[error("CRL number {index} in {path} cannot be parsed: {reason}")]
    BadCrl {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("[[identity]] #{number}: {reason}")]
    IdentityMapping { number: usize, reason: String },
    #[error(
        "refusing to serve plaintext on {addr}: tls.insecure_plaintext_agency is for measuring TLS cost only and serves loopback addresses only"
    )]
    PlaintextNotLoopback { addr: std::net::SocketAddr },
    #[error("cannot read the listener's local address")]
    LocalAddr(#[source] std::io::Error),
}
