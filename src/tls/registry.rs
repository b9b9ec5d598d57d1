//! The live TLS connections, so that a CRL reload can close those whose
//! certificate it revokes.
//!
//! Invariants: every established connection is registered until it is dropped
//! (its [`Registration`] removes the entry); cancelling an entry's token makes
//! the connection fail its next read or write, which tears it down; the lock is
//! held only for map operations, never across I/O or an await.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::crl::RevokedSerials;
use super::identity::LeafId;

/// The live connections. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionRegistry {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    live: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    remote_addr: SocketAddr,
    agency: Option<String>,
    serial: Option<String>,
    leaf: Option<LeafId>,
    revoked: CancellationToken,
}

/// Who a registered connection belongs to.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionInfo {
    pub remote_addr: SocketAddr,
    pub agency: Option<String>,
    /// Lowercase hex, for logs.
    pub serial: Option<String>,
    pub leaf: Option<LeafId>,
}

/// Keeps a connection registered; dropping it removes the entry.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u64,
    registry: ConnectionRegistry,
}

impl Drop for Registration {
    fn drop(&mut self) {
        ::metrics::gauge!(crate::metrics::CONNECTIONS).decrement(1.0);
        self.registry.lock().live.remove(&self.id);
    }
}

impl ConnectionRegistry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection; its token is cancelled if its certificate is
    /// revoked later.
    pub fn register(&self, info: ConnectionInfo) -> (Registration, CancellationToken) {
        let token = CancellationToken::new();
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.live.insert(
            id,
            Entry {
                remote_addr: info.remote_addr,
                agency: info.agency,
                serial: info.serial,
                leaf: info.leaf,
                revoked: token.clone(),
            },
        );
        drop(inner);
        ::metrics::gauge!(crate::metrics::CONNECTIONS).increment(1.0);
        let registration = Registration {
            id,
            registry: self.clone(),
        };
        (registration, token)
    }

    /// Cancels every live connection whose certificate `revoked` lists;
    /// returns how many were newly cancelled.
    pub fn close_revoked(&self, revoked: &RevokedSerials) -> usize {
        if revoked.is_empty() {
            return 0;
        }
        let inner = self.lock();
        let mut closed = 0;
        for entry in inner.live.values() {
            let Some(leaf) = &entry.leaf else { continue };
            if entry.revoked.is_cancelled() || !revoked.contains(&leaf.issuer, &leaf.serial) {
                continue;
            }
            // The connection logs its closure (at info) when it notices.
            debug!(
                peer = %entry.remote_addr,
                agency = entry.agency.as_deref().unwrap_or("-"),
                serial = entry.serial.as_deref().unwrap_or("-"),
                "closing connection: its client certificate has been revoked"
            );
            entry.revoked.cancel();
            closed += 1;
        }
        closed
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(serial: u8) -> ConnectionInfo {
        ConnectionInfo {
            remote_addr: "127.0.0.1:1".parse().unwrap(),
            agency: Some("police".into()),
            serial: Some(format!("{serial:02x}")),
            leaf: Some(LeafId {
                issuer: b"ca".to_vec(),
                serial: vec![serial],
            }),
        }
    }

    #[test]
    fn closes_only_revoked_connections_and_forgets_dropped_ones() {
        let registry = ConnectionRegistry::default();
        let (first, first_token) = registry.register(info(1));
        let (_second, second_token) = registry.register(info(2));
        let (_anonymous, anonymous_token) = registry.register(ConnectionInfo {
            leaf: None,
            ..info(1)
        });
        assert_eq!(registry.len(), 3);

        let revoked = RevokedSerials::from_pairs([(b"ca".to_vec(), vec![1])]);
        assert_eq!(registry.close_revoked(&revoked), 1);
        assert!(first_token.is_cancelled());
        assert!(!second_token.is_cancelled() && !anonymous_token.is_cancelled());
        // Already cancelled: not counted again.
        assert_eq!(registry.close_revoked(&revoked), 0);

        drop(first);
        assert_eq!(registry.len(), 2);
    }
}
