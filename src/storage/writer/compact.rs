//! Compaction of message segments (see [`crate::storage::bodies`]): a
//! segment no longer written whose live bodies fill at most half of it has
//! them written again at the end of their subscription's current segment,
//! so that a few messages left pending never pin whole segments.
//!
//! Each sweep does a bounded amount of work: it reads at most
//! [`SCAN_ENTRIES`] pending entries and moves at most [`MOVE_BYTES`], so a
//! segment may take several sweeps. A segment's entries lie at or after its
//! lowest sequence; as a sweep reads past entries, that bound is raised, so
//! the next sweep goes on where this one stopped.

use std::time::Instant;

use tracing::{debug, info, warn};

use super::super::bodies::BodyRef;
use super::super::keys;
use super::super::records::Pending;
use super::super::StorageError;
use super::{apply_delta, Group, Writer};

/// Most pending entries a sweep reads, over all segments.
const SCAN_ENTRIES: usize = if cfg!(test) { 8 } else { 16_384 };
/// Most bytes a sweep moves (one group, well under the journal's size).
const MOVE_BYTES: u64 = if cfg!(test) { 4 << 10 } else { 2 << 20 };

/// What a sweep may still do.
struct Budget {
    entries: usize,
    bytes: u64,
}

impl Writer {
    /// Moves the live bodies of sparse segments (oldest first). Called from
    /// the sweep, once every group handed over is applied.
    pub(super) fn compact(&mut self, group: &mut Group) -> Result<(), StorageError> {
        let mut candidates: Vec<(u64, u32, u64, u64)> = Vec::new();
        for (&segment, info) in &self.segments {
            let Some(extent) = info.extent else { continue };
            if self.placer.is_current(segment) {
                continue;
            }
            // As of this group too: it may hold acks, or an earlier sweep.
            let delta = group.body_deltas.get(&segment);
            let count = apply_delta(info.count, delta.map_or(0, |d| d.count));
            let bytes = apply_delta(extent.live_bytes, delta.map_or(0, |d| d.bytes));
            let first_seq = extent
                .first_seq
                .max(delta.and_then(|d| d.first_seq_at_least).unwrap_or(0));
            if count == 0 || bytes.saturating_mul(2) > extent.size {
                continue;
            }
            // Only once it has stayed so: not one a consumer is emptying.
            let since = *self
                .sparse_since
                .entry(segment)
                .or_insert_with(Instant::now);
            if since.elapsed() < self.options.compact_after {
                continue;
            }
            if self.compact_tried.get(&segment) == Some(&count) {
                continue;
            }
            candidates.push((segment, extent.sub, first_seq, count));
        }
        candidates.sort_unstable();
        let mut budget = Budget {
            entries: SCAN_ENTRIES,
            bytes: MOVE_BYTES,
        };
        for (segment, sub, first_seq, count) in candidates {
            if budget.entries == 0 || budget.bytes == 0 {
                break;
            }
            if !self.move_segment(group, segment, sub, first_seq, count, &mut budget)? {
                self.compact_tried.insert(segment, count);
            }
        }
        Ok(())
    }

    /// Moves live bodies of `segment` (entries of `sub` from `first_seq`
    /// on, `count` of them), as far as `budget` goes. Returns false when one
    /// could not be read: the segment is not tried again until its count
    /// changes.
    fn move_segment(
        &mut self,
        group: &mut Group,
        segment: u64,
        sub: u32,
        first_seq: u64,
        count: u64,
        budget: &mut Budget,
    ) -> Result<bool, StorageError> {
        let mut entries: Vec<(u64, Vec<u8>, Vec<u8>, BodyRef)> = Vec::new();
        let mut bytes = 0;
        let mut passed = None;
        let range = keys::pending(sub, first_seq)..=keys::pending(sub, u64::MAX);
        for item in self.db.range(range) {
            if budget.entries == 0 || bytes >= budget.bytes {
                break;
            }
            budget.entries -= 1;
            let (key, value) = item?;
            let Some(seq) = keys::seq_of(&key) else {
                continue;
            };
            passed = Some(seq);
            // The group's own writes come first (an ack earlier in it).
            let value = match self.unapplied(group, &key) {
                Some(None) => continue,
                Some(Some(newer)) => newer.to_vec(),
                None => value.to_vec(),
            };
            if let Some(body) = Pending::body_ref(&value).filter(|b| b.segment == segment) {
                bytes += u64::from(body.len);
                entries.push((seq, key.to_vec(), value, body));
                if entries.len() as u64 == count {
                    break;
                }
            }
        }
        let refs: Vec<BodyRef> = entries.iter().map(|(_, _, _, body)| *body).collect();
        let read = match self.bodies.read(&refs) {
            Ok(read) => read,
            Err(e) => {
                warn!(segment, cause = %e, "message segment not compacted: a body is unreadable");
                return Ok(false);
            }
        };
        // Every new entry is built before the group is touched: what was
        // found is moved whole or not at all.
        let mut moves = Vec::with_capacity(read.len());
        for ((seq, key, value, old), body) in entries.into_iter().zip(read) {
            let (Some(body), Ok(pending)) = (body, Pending::decode(&value)) else {
                warn!(
                    segment,
                    seq, "message segment not compacted: a body or its entry is unreadable"
                );
                return Ok(false);
            };
            moves.push((seq, key, pending, old, body));
        }
        let moved = moves.len() as u64;
        for (seq, key, pending, old, body) in moves {
            let (to, offset) = self.placer.place(sub, body.len());
            let new = BodyRef {
                segment: to,
                offset,
                len: old.len,
                crc: old.crc,
            };
            group.put_owned(&key, pending.encode_ref(&new, &body));
            group.place_body(sub, seq, &new);
            group.release_body(&old);
            group.put_owned(&keys::body(to, offset), body);
        }
        budget.bytes = budget.bytes.saturating_sub(bytes);
        if moved < count {
            // What is left of it lies after what this sweep read.
            if let Some(seq) = passed {
                group.raise_first_seq(segment, seq + 1);
            }
        }
        if moved > 0 {
            info!(
                segment,
                moved,
                bytes,
                left = count - moved,
                "compacting a message segment: live bodies moved on"
            );
        } else {
            debug!(
                segment,
                first_seq, "compaction found none of a segment's bodies yet"
            );
        }
        Ok(true)
    }
}
