//! Set-up shared by the benches that need a store.

use std::time::Duration;

use joinery::config::BrokerConfig;
use joinery::storage::{Store, StoreOptions};

/// Audit retention of bench stores (nothing is old enough to be pruned).
pub const AUDIT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A store on a real sled directory under cargo's target tmp dir (on disk,
/// wherever /tmp lives), with the broker's default cache, dedup window and
/// group size, and the audit log on. Keep the directory until the store is
/// dropped.
pub fn open_store(
    prefix: &str,
    topics: &[String],
    subscriptions: &[(String, String)],
) -> (tempfile::TempDir, Store) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a temporary directory");
    let defaults = BrokerConfig::default();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            cache_capacity: defaults.cache_capacity,
            dedup_window: defaults.dedup_window,
            max_batch: defaults.max_batch,
            audit_retention: Some(AUDIT_RETENTION),
            audit_segment_bytes: joinery::audit::segments::SEGMENT_BYTES,
            body_segment_bytes: joinery::storage::bodies::SEGMENT_BYTES,
            compact_after: joinery::storage::bodies::COMPACT_AFTER,
            reports: Vec::new(),
            deliver_before_sync: Vec::new(),
        },
        topics,
        subscriptions,
    )
    .expect("the store opens");
    (dir, store)
}
