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
use super::super::packed;
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
        // (sequence, packed in a block, entry, body) of the segment's
        // entries: own keys first, then packed ones, each read in sequence
        // order from `first_seq` as far as the budget goes.
        let mut entries: Vec<(u64, bool, Vec<u8>, BodyRef)> = Vec::new();
        let mut bytes = 0;
        // Per source, the last sequence read and whether it was cut short.
        let mut reads: Vec<(Option<u64>, bool)> = Vec::new();
        let mut passed = None;
        let mut cut = false;
        let range = keys::pending(sub, first_seq)..=keys::pending(sub, u64::MAX);
        for item in self.db.range(range) {
            if budget.entries == 0 || bytes >= budget.bytes {
                cut = true;
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
                entries.push((seq, false, value, body));
                if entries.len() as u64 == count {
                    cut = true;
                    break;
                }
            }
        }
        reads.push((passed, cut));
        let (mut passed, mut cut) = (None, false);
        let blocks = keys::packed(sub, packed::block_of(first_seq))..=keys::packed(sub, u64::MAX);
        'blocks: for item in self.db.range(blocks) {
            let (key, _) = item?;
            let Some(block) = keys::seq_of(&key) else {
                continue;
            };
            // The group's own writes come first.
            let (stored, _) = self.block(group, sub, block)?;
            let found: Vec<(u64, Vec<u8>)> = stored
                .entries()
                .filter(|(seq, _)| *seq >= first_seq)
                .collect();
            for (seq, value) in found {
                if budget.entries == 0 || bytes >= budget.bytes || entries.len() as u64 >= count {
                    cut = true;
                    break 'blocks;
                }
                budget.entries -= 1;
                passed = Some(seq);
                if let Some(body) = Pending::body_ref(&value).filter(|b| b.segment == segment) {
                    bytes += u64::from(body.len);
                    entries.push((seq, true, value, body));
                    if entries.len() as u64 == count {
                        cut = true;
                        break 'blocks;
                    }
                }
            }
        }
        reads.push((passed, cut));
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
        for ((seq, packed, value, old), body) in entries.into_iter().zip(read) {
            let (Some(body), Ok(pending)) = (body, Pending::decode(&value)) else {
                warn!(
                    segment,
                    seq, "message segment not compacted: a body or its entry is unreadable"
                );
                return Ok(false);
            };
            moves.push((seq, packed, pending, old, body));
        }
        let moved = moves.len() as u64;
        for (seq, packed, pending, old, body) in moves {
            let (to, offset) = self.placer.place(sub, body.len());
            let new = BodyRef {
                segment: to,
                offset,
                len: old.len,
                crc: old.crc,
            };
            let entry = pending.encode_ref(&new, &body);
            // A packed entry stays in its block, with its new reference.
            let repacked = packed && {
                let block = self.block(group, sub, packed::block_of(seq))?;
                let done = block.0.insert(seq, &entry);
                block.1 |= done;
                done
            };
            if !repacked {
                self.put_pending(group, sub, seq, entry, packed)?;
            }
            group.place_body(sub, seq, &new);
            group.release_body(&old);
            group.put_owned(&keys::body(to, offset), body);
        }
        budget.bytes = budget.bytes.saturating_sub(bytes);
        if moved < count {
            // What is left of it lies after what this sweep read: of each
            // source cut short, past its last entry read (of a source read
            // to its end, past everything).
            let cut_at = reads.iter().filter(|(_, cut)| *cut).map(|(p, _)| *p).min();
            let floor = match cut_at {
                Some(passed) => passed,
                None => reads.iter().filter_map(|(p, _)| *p).max(),
            };
            if let Some(seq) = floor {
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
