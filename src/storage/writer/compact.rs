//! Compaction of message segments (see [`crate::storage::bodies`]): a
//! segment no longer written whose live bodies fill at most half of it has
//! them written again at the end of their subscription's current segment,
//! so that a few messages left pending never pin whole segments.

use std::time::Instant;

use tracing::{info, warn};

use super::super::bodies::BodyRef;
use super::super::keys;
use super::super::records::Pending;
use super::super::StorageError;
use super::{apply_delta, Group, Writer};

/// Most pending entries read looking for one segment's entries. A segment
/// whose live entries lie further apart is left as it is.
const SCAN_ENTRIES: usize = 65_536;
/// Most bytes moved per sweep (one group), unless a single segment holds more.
const MOVE_BYTES: u64 = 8 << 20;

impl Writer {
    /// Moves the live bodies of sparse segments (oldest first). Called from
    /// the sweep, once every group handed over is applied.
    pub(super) fn compact(&mut self, group: &mut Group) -> Result<(), StorageError> {
        let mut candidates: Vec<(u64, u32, u64, u64, u64)> = Vec::new();
        for (&segment, info) in &self.segments {
            let Some(extent) = info.extent else { continue };
            if self.placer.is_current(segment) {
                continue;
            }
            // As of this group too: it may hold acks already.
            let (count, bytes) = match group.body_deltas.get(&segment) {
                Some(d) => (
                    apply_delta(info.count, d.count),
                    apply_delta(extent.live_bytes, d.bytes),
                ),
                None => (info.count, extent.live_bytes),
            };
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
            candidates.push((segment, extent.sub, extent.first_seq, count, bytes));
        }
        candidates.sort_unstable();
        let mut moved_bytes = 0;
        for (segment, sub, first_seq, count, bytes) in candidates {
            if moved_bytes > 0 && moved_bytes + bytes > MOVE_BYTES {
                continue; // the next sweep's
            }
            match self.move_segment(group, segment, sub, first_seq, count)? {
                Some(bytes) => moved_bytes += bytes,
                None => {
                    self.compact_tried.insert(segment, count);
                }
            }
        }
        Ok(())
    }

    /// Moves the `count` live bodies of `segment` (entries of `sub` from
    /// `first_seq` on); returns the bytes moved, or None when they could not
    /// all be found or read.
    fn move_segment(
        &mut self,
        group: &mut Group,
        segment: u64,
        sub: u32,
        first_seq: u64,
        count: u64,
    ) -> Result<Option<u64>, StorageError> {
        let mut entries: Vec<(Vec<u8>, Vec<u8>, BodyRef)> = Vec::new();
        let range = keys::pending(sub, first_seq)..=keys::pending(sub, u64::MAX);
        for item in self.db.range(range).take(SCAN_ENTRIES) {
            let (key, value) = item?;
            // The group's own writes come first (an ack earlier in it).
            let value = match self.unapplied(group, &key) {
                Some(None) => continue,
                Some(Some(newer)) => newer.to_vec(),
                None => value.to_vec(),
            };
            if let Some(body) = Pending::body_ref(&value).filter(|b| b.segment == segment) {
                entries.push((key.to_vec(), value, body));
                if entries.len() as u64 == count {
                    break;
                }
            }
        }
        if entries.len() as u64 != count {
            warn!(
                segment,
                found = entries.len(),
                count,
                "message segment not compacted: its entries lie too far apart"
            );
            return Ok(None);
        }
        let refs: Vec<BodyRef> = entries.iter().map(|(_, _, body)| *body).collect();
        let read = match self.bodies.read(&refs) {
            Ok(read) => read,
            Err(e) => {
                warn!(segment, cause = %e, "message segment not compacted: a body is unreadable");
                return Ok(None);
            }
        };
        let mut stored = Vec::with_capacity(read.len());
        for body in read {
            match body {
                Some(body) => stored.push(body),
                None => {
                    warn!(segment, "message segment not compacted: a body is missing");
                    return Ok(None);
                }
            }
        }
        // Every new entry is built before the group is touched: a segment
        // is moved whole or not at all.
        let mut moves = Vec::with_capacity(stored.len());
        for ((key, value, old), body) in entries.into_iter().zip(stored) {
            let (Some(seq), Ok(pending)) = (keys::seq_of(&key), Pending::decode(&value)) else {
                warn!(
                    segment,
                    "message segment not compacted: a pending entry is unreadable"
                );
                return Ok(None);
            };
            moves.push((key, seq, pending, old, body));
        }
        let mut moved = 0;
        for (key, seq, pending, old, body) in moves {
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
            moved += u64::from(old.len);
        }
        info!(
            segment,
            bodies = count,
            bytes = moved,
            "compacted a message segment: its live bodies moved on"
        );
        Ok(Some(moved))
    }
}
