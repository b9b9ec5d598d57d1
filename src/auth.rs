//! Who is calling, and what they may do.
//!
//! The caller's agency comes only from its client certificate, resolved once
//! per connection by [`crate::tls`] and attached to every request as a
//! [`PeerInfo`] (or, on a loopback-only plaintext listener kept for measuring
//! TLS cost, from `[tls] insecure_plaintext_agency`). Nothing a client sends
//! in a request can change it.

use crate::config::glob_match;
use crate::tls::{IdentityError, PeerInfo};

/// Why a request has no usable caller identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("the request did not arrive over a mutual-TLS connection")]
    NoTls,
}

/// The caller's agency id.
pub fn agency_of<T>(request: &tonic::Request<T>) -> Result<String, AuthError> {
    let peer = request
        .extensions()
        .get::<PeerInfo>()
        .ok_or(AuthError::NoTls)?;
    peer.identity.clone().map_err(AuthError::Identity)
}

/// Whether `agency` matches any of `patterns` (agency ids, `*` globs).
pub fn allowed(patterns: &[String], agency: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, agency))
}
