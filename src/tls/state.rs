//! The TLS material in force — server certificate, client CA bundle and CRLs —
//! and the connections made under it.
//!
//! Invariants:
//! - Every handshake reads the current `rustls::ServerConfig` (an `Arc` clone
//!   under a read lock), so a reload applies to the next handshake and never to
//!   an established connection.
//! - [`TlsState::reload`] swaps in new material only when every file loads; on
//!   any error the previous material stays in force.
//! - After a reload swaps the CRLs, every live connection whose certificate the
//!   new CRLs revoke is closed. A connection registered concurrently is checked
//!   against the CRLs in force after it registers, so none slips between the
//!   swap and the sweep.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::registry::{ConnectionInfo, ConnectionRegistry, Registration};
use super::server_config::{load, Loaded};
use super::TlsError;
use crate::config::TlsConfig;

/// The broker's TLS material and live connections. Share it as `Arc<TlsState>`.
#[derive(Debug)]
pub struct TlsState {
    files: TlsConfig,
    current: RwLock<Arc<Loaded>>,
    connections: ConnectionRegistry,
    /// Serialises reloads (SIGHUP and the file poll may coincide).
    reloading: Mutex<()>,
}

/// What a successful reload put in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadReport {
    /// CRLs loaded (over all files).
    pub crls: usize,
    /// Certificates they revoke.
    pub revoked: usize,
    /// Live connections closed because their certificate is now revoked.
    pub closed: usize,
}

impl TlsState {
    /// Loads the files `tls` names; fails if any is missing or unusable.
    pub fn load(tls: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let loaded = load(tls)?;
        Ok(Arc::new(Self {
            files: tls.clone(),
            current: RwLock::new(Arc::new(loaded)),
            connections: ConnectionRegistry::default(),
            reloading: Mutex::new(()),
        }))
    }

    /// The server configuration for the next handshake.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current().server.clone()
    }

    /// Re-reads the CA bundle, certificate, key and CRLs. On success the new
    /// material applies to new handshakes and connections of newly revoked
    /// certificates are closed; on error nothing changes.
    pub fn reload(&self) -> Result<ReloadReport, TlsError> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let loaded = Arc::new(load(&self.files)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = loaded.clone();
        let closed = self.connections.close_revoked(&loaded.revoked);
        Ok(ReloadReport {
            crls: loaded.crls,
            revoked: loaded.revoked.len(),
            closed,
        })
    }

    /// Number of established connections not yet closed.
    pub fn live_connections(&self) -> usize {
        self.connections.len()
    }

    /// The files a reload reads.
    pub fn files(&self) -> Vec<PathBuf> {
        let f = &self.files;
        let mut paths = vec![f.ca.clone(), f.cert.clone(), f.key.clone()];
        paths.extend(f.crl.iter().cloned());
        paths
    }

    /// Registers an established connection. The token is cancelled when its
    /// certificate is revoked — at once if the CRLs now in force revoke it.
    pub(crate) fn register(&self, info: ConnectionInfo) -> (Registration, CancellationToken) {
        let leaf = info.leaf.clone();
        let (registration, token) = self.connections.register(info);
        if let Some(leaf) = leaf {
            if self.current().revoked.contains(&leaf.issuer, &leaf.serial) {
                debug!("connection registered after its certificate was revoked");
                token.cancel();
            }
        }
        (registration, token)
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
