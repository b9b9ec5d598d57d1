//! Operator actions as the dispatcher sees them. A redrive has already made
//! the dead letters pending again in the store; the dispatcher loads those
//! below its cursor (the rest it reads as usual) and delivers them first. A
//! purge drops everything the dispatcher holds before it removes anything
//! from the store, and the dispatcher does nothing else until it is done, so
//! nothing purged is delivered afterwards.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{error, info};

use super::{Dispatcher, Item};
use crate::audit::AuditEvent;
use crate::storage::{now_ms, StorageError};

/// Pending entries removed per writer batch during a purge.
const PURGE_CHUNK: usize = 10_000;

impl Dispatcher {
    /// Queues redriven sequences for delivery, skipping any it already holds
    /// or will read from the store anyway (at or above the cursor).
    pub(super) async fn redriven(&mut self, seqs: Vec<u64>) {
        let held: HashSet<u64> = self
            .in_flight
            .values()
            .map(|f| f.item.seq)
            .chain(self.ready.iter().map(|i| i.seq))
            .chain(self.retry.iter().map(|i| i.seq))
            .chain(self.delayed.values().map(|i| i.seq))
            .collect();
        let mut wanted: Vec<u64> = seqs
            .into_iter()
            .filter(|seq| *seq < self.cursor && !held.contains(seq))
            .collect();
        if wanted.is_empty() {
            return;
        }
        wanted.sort_unstable();
        wanted.dedup();
        let (store, state) = (self.store.clone(), self.state.clone());
        let rows = match tokio::task::spawn_blocking(move || store.pending_rows(&state, &wanted))
            .await
        {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                error!(cause = %e, "reading redriven messages failed; they are delivered after a restart");
                return;
            }
            Err(e) => {
                error!(cause = %e, "reading redriven messages failed; they are delivered after a restart");
                return;
            }
        };
        let now = now_ms();
        let mut queued = 0usize;
        for (seq, pending, message) in rows {
            let Some(message) = message else {
                error!(
                    seq,
                    "redriven entry without its message; it is dropped at the next read"
                );
                continue;
            };
            let item = Item {
                seq,
                attempts: pending.attempts,
                message,
            };
            if pending.not_before_ms > now {
                self.delayed.insert((pending.not_before_ms, seq), item);
            } else {
                self.retry.push_back(item);
            }
            queued += 1;
        }
        info!(queued, "redriven dead letters queued for delivery");
    }

    /// Drops every message held (in-flight deliveries become stale: later
    /// acks are ignored and they are never redelivered), then removes every
    /// pending entry from the store in chunks. Returns how many were removed.
    pub(super) async fn purge(
        &mut self,
        event: AuditEvent,
        fence: &AtomicU64,
    ) -> Result<u64, StorageError> {
        // Deliveries still waiting in a consumer's channel are dropped there.
        fence.store(self.next_delivery, Ordering::Release);
        let stale = self.in_flight.len();
        self.in_flight.clear();
        self.deadlines.clear();
        self.ready.clear();
        self.retry.clear();
        self.delayed.clear();
        for slot in &mut self.consumers {
            slot.in_flight = 0;
        }
        drop(self.state.take_expired());
        // Nothing is held now; the store is read again from the start once
        // the purge is done (only what was published since remains).
        self.cursor = 0;
        let mut total = 0u64;
        let mut first = true;
        loop {
            let removed = self
                .store
                .purge_chunk(
                    self.state.clone(),
                    self.topic.clone(),
                    PURGE_CHUNK,
                    event.clone(),
                    first,
                )
                .await?;
            first = false;
            total += removed;
            if removed < PURGE_CHUNK as u64 {
                break;
            }
            info!(removed = total, "purging");
        }
        info!(
            purged = total,
            stale_deliveries = stale,
            operator = %event.agency,
            "subscription purged"
        );
        Ok(total)
    }
}
