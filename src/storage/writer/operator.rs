//! Operator actions as the writer applies them: a redrive or a purge chunk is
//! built into the current group like any other op (once every earlier group
//! is applied to sled, reading through the group's own writes), its audit record in the same batch, and answered after
//! the flush that covers it.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::super::operator::{PurgeOp, RedriveOp, Redriven};
use super::super::records::{DeadLetter, MessageHeader, Pending, StoredMessage};
use super::super::{keys, packed, StorageError, SubState, TopicState};
use super::{EntryState, Group, Writer};

impl Writer {
    pub(super) fn redrive(
        &mut self,
        group: &mut Group,
        op: RedriveOp,
        now: u64,
    ) -> Result<(), StorageError> {
        let RedriveOp {
            sub,
            topic,
            sequences,
            limit,
            mut event,
            reply,
            durable,
        } = op;
        if let Some(reason) = &self.failed {
            let _ = reply.send(Err(StorageError::Unavailable(reason.clone())));
            return Ok(());
        }
        match self.redrive_into(group, &sub, &topic, &sequences, limit) {
            Ok(redriven) => {
                event.count = redriven.sequences.len() as u64;
                self.record(group, event, now);
                let _ = reply.send(Ok(redriven));
                group.syncs.push(durable);
                Ok(())
            }
            Err(e) => {
                let _ = reply.send(Err(StorageError::Unavailable(e.to_string())));
                Err(e)
            }
        }
    }

    fn redrive_into(
        &mut self,
        group: &mut Group,
        sub: &std::sync::Arc<SubState>,
        topic: &TopicState,
        sequences: &[u64],
        limit: usize,
    ) -> Result<Redriven, StorageError> {
        let mut out = Redriven::default();
        if sequences.is_empty() {
            for item in self.db.scan_prefix(keys::dead_prefix(sub.id)) {
                if out.sequences.len() >= limit {
                    break;
                }
                let (key, value) = item?;
                // Removed earlier in this batch (redriven twice at once).
                if group.changes.get(&key[..]) == Some(&None) {
                    continue;
                }
                let seq = keys::seq_of(&key).ok_or_else(|| StorageError::Corrupt {
                    what: format!("dead letter key of subscription {:?}", sub.name),
                })?;
                self.redrive_one(group, sub, topic, seq, &value)?;
                out.sequences.push(seq);
            }
        } else {
            let wanted: BTreeSet<u64> = sequences.iter().copied().collect();
            for seq in wanted.into_iter().take(limit) {
                let key = keys::dead(sub.id, seq);
                let value = self.get(group, &key)?;
                match value {
                    Some(value) => {
                        self.redrive_one(group, sub, topic, seq, &value)?;
                        out.sequences.push(seq);
                    }
                    None => out.missing.push(seq),
                }
            }
        }
        Ok(out)
    }

    /// One dead letter back: its topic copy (if gone), a fresh pending
    /// entry, the dead letter removed, the counters moved.
    fn redrive_one(
        &mut self,
        group: &mut Group,
        sub: &std::sync::Arc<SubState>,
        topic: &TopicState,
        seq: u64,
        value: &[u8],
    ) -> Result<(), StorageError> {
        let dead = DeadLetter::decode(topic.id, seq, value)?;
        let message_key = keys::message(topic.id, seq);
        if !self.exists(group, &message_key)? {
            let message = &dead.message;
            // Back under its old sequence, behind the by-order sweep's
            // cursor: a redriven message always gets an expiry-index entry.
            let header = MessageHeader {
                expiry_by_order: false,
                ..message.header()
            };
            group.put(
                &message_key,
                &StoredMessage::encode_value(header, &message.envelope),
            );
            if message.expires_ms != 0 {
                group.put(&keys::expiry(message.expires_ms, topic.id, seq), &[]);
            }
        }
        let existing = self.pending_entry(group, sub.id, seq)?;
        let already_pending = existing.is_some();
        let packed = existing.is_some_and(|(_, packed)| packed);
        self.put_pending(
            group,
            sub.id,
            seq,
            Pending::default().encode().to_vec(),
            packed,
        )?;
        group.del(&keys::dead(sub.id, seq));
        group.delta(sub, if already_pending { 0 } else { 1 }, -1);
        Ok(())
    }

    pub(super) fn purge(
        &mut self,
        group: &mut Group,
        op: PurgeOp,
        now: u64,
    ) -> Result<(), StorageError> {
        let PurgeOp {
            sub,
            topic,
            limit,
            mut event,
            record_empty,
            reply,
            durable,
        } = op;
        if let Some(reason) = &self.failed {
            let _ = reply.send(Err(StorageError::Unavailable(reason.clone())));
            return Ok(());
        }
        match self.purge_into(group, &sub, &topic, limit.max(1)) {
            Ok(removed) => {
                if removed > 0 || record_empty {
                    event.count = removed;
                    self.record(group, event, now);
                }
                let _ = reply.send(Ok(removed));
                group.syncs.push(durable);
                Ok(())
            }
            Err(e) => {
                let _ = reply.send(Err(StorageError::Unavailable(e.to_string())));
                Err(e)
            }
        }
    }

    fn purge_into(
        &mut self,
        group: &mut Group,
        sub: &std::sync::Arc<SubState>,
        topic: &TopicState,
        limit: usize,
    ) -> Result<u64, StorageError> {
        let prefix = keys::pending_prefix(sub.id);
        // Entries written earlier in this batch are not in the tree yet.
        // seq → what of its message the entry carries, and whether it is
        // packed in a block.
        let mut doomed: BTreeMap<u64, (EntryState, bool)> = group
            .changes
            .range::<[u8], _>((Bound::Included(&prefix[..]), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(&prefix))
            .filter_map(|(key, value)| {
                Some((
                    keys::seq_of(key)?,
                    (EntryState::of(value.as_deref()?), false),
                ))
            })
            .collect();
        let in_group: BTreeSet<u64> = group
            .blocks
            .keys()
            .filter(|(s, _)| *s == sub.id)
            .map(|(_, block)| *block)
            .collect();
        for block in &in_group {
            if let Some((entries, _)) = group.blocks.get(&(sub.id, *block)) {
                for (seq, value) in entries.entries() {
                    doomed.insert(seq, (EntryState::of(&value), true));
                }
            }
        }
        let mut from_tree = 0;
        for item in self.db.scan_prefix(prefix) {
            if from_tree >= limit {
                break;
            }
            let (key, value) = item?;
            if group.changes.contains_key(&key[..]) {
                continue; // written or removed earlier in this batch
            }
            let seq = keys::seq_of(&key).ok_or_else(|| StorageError::Corrupt {
                what: format!("pending key of subscription {:?}", sub.name),
            })?;
            doomed.insert(seq, (EntryState::of(&value), false));
            from_tree += 1;
        }
        'blocks: for item in self.db.scan_prefix(keys::packed_prefix(sub.id)) {
            let (key, stored) = item?;
            let block = keys::seq_of(&key).ok_or_else(|| StorageError::Corrupt {
                what: format!("packed pending key of subscription {:?}", sub.name),
            })?;
            if in_group.contains(&block) {
                continue; // read above, as this batch left it
            }
            for (seq, reference) in packed::records(&stored)? {
                if from_tree >= limit {
                    break 'blocks;
                }
                let value = packed::entry_value(reference);
                doomed.insert(seq, (EntryState::of(&value), true));
                from_tree += 1;
            }
        }
        let removed = doomed.len() as u64;
        for (seq, (entry, packed)) in doomed {
            self.remove_pending(group, sub.id, seq, packed)?;
            if let Some(body) = &entry.body {
                group.release_body(body);
            }
            if !entry.own_copy {
                self.release(group, sub.id, topic, seq, None)?;
            }
        }
        if from_tree < limit {
            // Nothing of the subscription is pending any more: the depth is
            // exactly what later ops of this batch add.
            let entry = group.deltas.entry(sub.id).or_insert((sub.clone(), 0, 0));
            entry.1 = -i64::try_from(self.counts(sub).0).unwrap_or(i64::MAX);
        } else {
            group.delta(sub, -i64::try_from(removed).unwrap_or(i64::MAX), 0);
        }
        Ok(removed)
    }
}
