//! Server-side mutual TLS: the rustls configuration, the accept loop that hands
//! established connections to tonic, and the caller's agency identity.
//!
//! Data flow: [`load_server_config`] builds the `rustls::ServerConfig` from PEM
//! files; [`tls_incoming`] accepts TCP connections, runs each handshake in its own
//! task, resolves the peer's identity once ([`agency_from_cert`]) and yields
//! [`TlsConnection`]s for `Server::serve_with_incoming_shutdown`; tonic then puts
//! the connection's [`PeerInfo`] into every request's extensions.
//!
//! Invariants:
//! - Exactly one crypto provider, ring, is used; [`crypto_provider`] is passed
//!   explicitly everywhere so the process default does not matter.
//! - A client certificate from an unknown CA fails the handshake. A client without
//!   a certificate completes it, but its [`PeerInfo::identity`] is
//!   `Err(IdentityError::NoCertificate)` so every request can be refused with
//!   `UNAUTHENTICATED` and a message the client can act on.
//! - Identity comes only from the verified leaf certificate's URI SAN
//!   `urn:joinery:agency:<id>`, never from anything the client sends later.
//! - The accept loop never awaits a handshake; connections (handshaking or
//!   established) are bounded by a semaphore, handshakes by a timeout.

mod acceptor;
mod identity;
mod server_config;

use std::path::PathBuf;

pub use acceptor::{tls_incoming, AcceptorSettings, TlsConnection};
pub use identity::{agency_from_cert, IdentityError, PeerInfo};
pub use server_config::{crypto_provider, install_crypto_provider, load_server_config};

/// Errors building the TLS server configuration. Each names the file at fault.
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
}
