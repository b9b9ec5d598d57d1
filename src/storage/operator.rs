//! Operator actions on a subscription's stored messages (the Admin service).
//! Redriving dead letters and purging pending entries go to the writer as
//! [`Op`]s, so each is applied in one atomic batch together with its audit
//! record, and answered only once that batch is durable. Listing dead letters
//! and reading pending entries are plain (blocking) reads.
//!
//! # Invariants
//! - A redriven dead letter becomes a pending entry with no attempts, and its
//!   topic copy exists again, in the batch that removes the dead letter.
//! - A purge chunk removes pending entries together with the topic copies no
//!   other subscription still holds, and moves the depth counter by exactly
//!   what it removed (to zero once nothing is left).

use std::sync::Arc;

use tokio::sync::oneshot;

use super::{keys, DeadLetter, Op, PendingRow, StorageError, Store, SubState, TopicState};
use crate::audit::AuditEvent;

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redriven {
    /// Sequences put back on the subscription, in order.
    pub sequences: Vec<u64>,
    /// Requested sequences that were not dead letters of the subscription.
    pub missing: Vec<u64>,
}

/// Dead letters back to their subscription.
pub(crate) struct RedriveOp {
    pub sub: Arc<SubState>,
    pub topic: Arc<TopicState>,
    /// Empty: every dead letter, oldest first (up to `limit`).
    pub sequences: Vec<u64>,
    pub limit: usize,
    /// The operator's audit record; the writer fills in the count.
    pub event: AuditEvent,
    /// Answered while the batch is built.
    pub reply: oneshot::Sender<Result<Redriven, StorageError>>,
    /// Answered after the flush covering it.
    pub durable: oneshot::Sender<Result<(), StorageError>>,
}

/// Up to `limit` pending entries of a subscription removed.
pub(crate) struct PurgeOp {
    pub sub: Arc<SubState>,
    pub topic: Arc<TopicState>,
    pub limit: usize,
    /// The operator's audit record; the writer fills in the count.
    pub event: AuditEvent,
    /// Record the event even when nothing was removed (a purge's first chunk).
    pub record_empty: bool,
    pub reply: oneshot::Sender<Result<u64, StorageError>>,
    pub durable: oneshot::Sender<Result<(), StorageError>>,
}

impl Store {
    /// Puts dead letters of `sub` back as pending entries with their attempts
    /// reset: those named by `sequences`, or (when empty) the oldest, at most
    /// `limit` either way. Returns once the change is durable; the
    /// subscription's dispatcher still has to be told (it holds no entry
    /// below its read cursor that it did not read itself).
    pub async fn redrive(
        &self,
        sub: Arc<SubState>,
        topic: Arc<TopicState>,
        sequences: Vec<u64>,
        limit: usize,
        event: AuditEvent,
    ) -> Result<Redriven, StorageError> {
        let (reply, answer) = oneshot::channel();
        let (durable, flushed) = oneshot::channel();
        self.send(Op::Redrive(RedriveOp {
            sub,
            topic,
            sequences,
            limit,
            event,
            reply,
            durable,
        }))
        .await?;
        let redriven = answer.await.map_err(|_| StorageError::Closed)??;
        flushed.await.map_err(|_| StorageError::Closed)??;
        Ok(redriven)
    }

    /// Removes up to `limit` pending entries of `sub` (oldest first) and the
    /// topic copies nobody else holds; returns how many, once durable. Fewer
    /// than `limit` means the subscription has no pending entry left.
    pub async fn purge_chunk(
        &self,
        sub: Arc<SubState>,
        topic: Arc<TopicState>,
        limit: usize,
        event: AuditEvent,
        record_empty: bool,
    ) -> Result<u64, StorageError> {
        let (reply, answer) = oneshot::channel();
        let (durable, flushed) = oneshot::channel();
        self.send(Op::Purge(PurgeOp {
            sub,
            topic,
            limit,
            event,
            record_empty,
            reply,
            durable,
        }))
        .await?;
        let removed = answer.await.map_err(|_| StorageError::Closed)??;
        flushed.await.map_err(|_| StorageError::Closed)??;
        Ok(removed)
    }

    /// Up to `limit` dead letters of `sub` with a sequence above `after`,
    /// oldest first. Blocking.
    pub fn dead_letters_after(
        &self,
        sub: &SubState,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StorageError> {
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let range = keys::dead(sub.id, from)..=keys::dead(sub.id, u64::MAX);
        let mut out = Vec::new();
        for item in self.inner.tree.range(range).take(limit) {
            let (key, value) = item?;
            let seq = keys::seq_of(&key).ok_or_else(|| StorageError::Corrupt {
                what: format!("dead letter key of subscription {:?}", sub.name),
            })?;
            out.push(DeadLetter::decode(sub.topic, seq, &value)?);
        }
        Ok(out)
    }

    /// The pending entries of `sub` at the given sequences (those that are
    /// pending), each with its message. Blocking.
    pub fn pending_rows(
        &self,
        sub: &SubState,
        sequences: &[u64],
    ) -> Result<Vec<PendingRow>, StorageError> {
        let mut entries = Vec::new();
        for &seq in sequences {
            if let Some(value) = self.pending_value(sub.id, seq)? {
                entries.push((seq, value));
            }
        }
        self.pending_rows_of(sub, &entries)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::audit::EventKind;
    use crate::storage::{now_ms, DeadReason, Outcome, PublishOp, StoreOptions};

    fn open(dir: &Path) -> Store {
        Store::open(
            dir,
            StoreOptions {
                cache_capacity: 4 << 20,
                dedup_window: Duration::from_secs(60),
                max_batch: 16,
                audit_retention: Some(Duration::from_secs(86400)),
                audit_segment_bytes: crate::audit::segments::SEGMENT_BYTES,
                body_segment_bytes: crate::storage::bodies::SEGMENT_BYTES,
                compact_after: crate::storage::bodies::COMPACT_AFTER,
                reports: Vec::new(),
                deliver_before_sync: Vec::new(),
            },
            &["t".to_string()],
            &[
                ("a".to_string(), "t".to_string()),
                ("b".to_string(), "t".to_string()),
            ],
        )
        .unwrap()
    }

    async fn publish(store: &Store, targets: &[&str]) -> u64 {
        let (reply, rx) = oneshot::channel();
        store
            .publish(PublishOp {
                topic: store.topic("t").unwrap(),
                targets: targets
                    .iter()
                    .map(|s| store.subscription(s).unwrap())
                    .collect(),
                dedup_key: None,
                publish_ms: now_ms(),
                expires_ms: 0,
                expiry_by_order: false,
                envelope: crate::storage::tests::enveloped(b"envelope"),
                reply,
            })
            .await
            .unwrap();
        rx.await.unwrap().unwrap().seq
    }

    fn event(kind: EventKind) -> AuditEvent {
        AuditEvent::new(kind, "ops")
    }

    #[tokio::test]
    async fn a_chunked_purge_empties_the_subscription_and_keeps_copies_others_hold() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let mut only_a = Vec::new();
        let mut shared = Vec::new();
        for _ in 0..7 {
            only_a.push(publish(&store, &["a"]).await);
        }
        for _ in 0..3 {
            shared.push(publish(&store, &["a", "b"]).await);
        }
        let (a, b, topic) = (
            store.subscription("a").unwrap(),
            store.subscription("b").unwrap(),
            store.topic("t").unwrap(),
        );
        assert_eq!((a.depth(), b.depth()), (10, 3));
        let mut removed = Vec::new();
        loop {
            let n = store
                .purge_chunk(a.clone(), topic.clone(), 4, event(EventKind::Purge), true)
                .await
                .unwrap();
            removed.push((n, a.depth()));
            if n < 4 {
                break;
            }
        }
        assert_eq!(removed, [(4, 6), (4, 2), (2, 0)]);
        assert!(store.scan_pending(&a, 0, u64::MAX, 100).unwrap().is_empty());
        assert_eq!(b.depth(), 3);
        for seq in only_a {
            assert!(
                store.load_message(topic.id, seq).unwrap().is_none(),
                "{seq} released"
            );
        }
        for seq in shared {
            assert!(
                store.load_message(topic.id, seq).unwrap().is_some(),
                "{seq} kept for b"
            );
        }
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_redrive_restores_the_topic_copy_and_a_fresh_pending_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let seq = publish(&store, &["a"]).await;
        let other = publish(&store, &["a"]).await;
        let (a, topic) = (store.subscription("a").unwrap(), store.topic("t").unwrap());
        let message = store.pending_message("a", seq).unwrap();
        store
            .settle(
                a.clone(),
                topic.clone(),
                message.clone(),
                Outcome::DeadLetter {
                    reason: DeadReason::MaxDeliveries,
                    attempts: 5,
                },
                "council".into(),
            )
            .await
            .unwrap();
        store.sync().await.unwrap();
        assert!(store.load_message(topic.id, seq).unwrap().is_none());
        assert_eq!((a.depth(), a.dead_letters()), (1, 1));

        let redriven = store
            .redrive(
                a.clone(),
                topic.clone(),
                vec![],
                10,
                event(EventKind::Redrive),
            )
            .await
            .unwrap();
        assert_eq!(redriven.sequences, [seq]);
        assert_eq!((a.depth(), a.dead_letters()), (2, 0));
        assert_eq!(store.load_message(topic.id, seq).unwrap(), Some(message));
        let rows = store.pending_rows(&a, &[seq, other, 99]).unwrap();
        let found: Vec<(u64, u32)> = rows.iter().map(|r| (r.0, r.1.attempts)).collect();
        assert_eq!(found, [(seq, 0), (other, 0)]);
        assert!(store.dead_letters_after(&a, 0, 10).unwrap().is_empty());

        // Nothing left to redrive; a named sequence that is not dead is reported.
        let again = store
            .redrive(
                a.clone(),
                topic.clone(),
                vec![seq],
                10,
                event(EventKind::Redrive),
            )
            .await
            .unwrap();
        assert_eq!((again.sequences, again.missing), (vec![], vec![seq]));
        store.close().await.unwrap();
        drop(store);
        let store = open(tmp.path());
        let a = store.subscription("a").unwrap();
        assert_eq!(
            (a.depth(), a.dead_letters()),
            (2, 0),
            "counters are durable"
        );
        store.close().await.unwrap();
    }
}
