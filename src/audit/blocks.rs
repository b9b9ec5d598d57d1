//! How audit records sit in the tree: in **blocks** of consecutive records.
//!
//! A block is stored under `b first_seq` (big-endian) and holds records
//! `first_seq, first_seq + 1, ...`, each as a 4-byte big-endian length then
//! the record's stored bytes (its prost encoding and its hash). The writer
//! starts a new block once one reaches [`BLOCK_BYTES`], so one tree insert
//! covers a few dozen records: sled rewrites a tree node for every insert,
//! and one insert per record made the audit log a third of the writer's
//! work.
//!
//! Earlier versions stored one record per key (`a seq`); those are still
//! read, before every block (they are older than any block).

use std::ops::Range;

use super::{AuditError, HASH_LEN};
use crate::storage::keys;

/// A block is closed once it holds at least this many bytes. Small enough
/// that a full sled leaf of blocks (16) stays inline in sled's log instead
/// of going to a blob file.
pub const BLOCK_BYTES: usize = 4096;

const LEN: usize = 4;

/// Builds the blocks of one group commit.
#[derive(Debug, Default)]
pub struct BlockWriter {
    open: Option<(u64, Vec<u8>)>,
    closed: Vec<([u8; 9], Vec<u8>)>,
}

impl BlockWriter {
    /// Adds record `seq`, which must follow the previous one.
    pub fn push(&mut self, seq: u64, stored: &[u8]) {
        self.push_with(seq, |buf| buf.extend_from_slice(stored));
    }

    /// Adds record `seq`, whose stored bytes `write` appends to the block
    /// in place.
    pub fn push_with(&mut self, seq: u64, write: impl FnOnce(&mut Vec<u8>)) {
        let (_, buf) = self
            .open
            .get_or_insert_with(|| (seq, Vec::with_capacity(BLOCK_BYTES + 512)));
        let at = buf.len();
        buf.extend_from_slice(&[0; LEN]);
        write(buf);
        let len = (buf.len() - at - LEN) as u32;
        buf[at..at + LEN].copy_from_slice(&len.to_be_bytes());
        if buf.len() >= BLOCK_BYTES {
            self.close();
        }
    }

    fn close(&mut self) {
        if let Some((first, buf)) = self.open.take() {
            self.closed.push((keys::audit_block(first), buf));
        }
    }

    /// The blocks to insert, as (key, value).
    pub fn finish(mut self) -> Vec<([u8; 9], Vec<u8>)> {
        self.close();
        self.closed
    }
}

/// A block's value made of `records` (each its stored bytes).
pub fn encode_block<R: AsRef<[u8]>>(records: &[R]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        let r = r.as_ref();
        out.extend_from_slice(&(r.len() as u32).to_be_bytes());
        out.extend_from_slice(r);
    }
    out
}

/// The byte ranges of a block's records, or None if it is cut short.
pub fn block_ranges(value: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < value.len() {
        let len = u32::from_be_bytes(value.get(at..at + LEN)?.try_into().ok()?) as usize;
        let start = at + LEN;
        let end = start.checked_add(len)?;
        if end > value.len() {
            return None;
        }
        out.push(start..end);
        at = end;
    }
    Some(out)
}

/// The records of a block, each its stored bytes.
pub fn decode_block(value: &[u8]) -> Option<Vec<&[u8]>> {
    Some(
        block_ranges(value)?
            .into_iter()
            .map(|r| &value[r])
            .collect(),
    )
}

/// One stored record, as found in the tree.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its sequence number by where it is stored (the key, or the block's
    /// first sequence plus its position).
    pub seq: u64,
    /// Key of the block (or single record) holding it.
    pub key: sled::IVec,
    value: sled::IVec,
    range: Range<usize>,
    /// The last record of its block: the block can go once this one can.
    pub last_in_block: bool,
}

impl Stored {
    /// Its stored bytes: encoding then hash.
    pub fn bytes(&self) -> &[u8] {
        &self.value[self.range.clone()]
    }

    /// Its encoding and stored hash, or None if shorter than a hash.
    pub fn split(&self) -> Option<(&[u8], [u8; HASH_LEN])> {
        super::split(self.bytes())
    }

    /// Bytes it takes in the tree: its share of the value, plus the key
    /// once per block.
    pub fn stored_len(&self) -> u64 {
        let key = if self.last_in_block {
            self.key.len()
        } else {
            0
        };
        (self.range.len() + LEN + key) as u64
    }
}

/// Every stored record in sequence order: single records of earlier
/// versions, then blocks. Stops after the first error.
pub struct Records {
    singles: sled::Iter,
    blocks: sled::Iter,
    pending: std::vec::IntoIter<Stored>,
    failed: bool,
}

impl Records {
    pub fn new(tree: &sled::Db) -> Records {
        Records {
            singles: tree.scan_prefix([keys::AUDIT]),
            blocks: tree.scan_prefix([keys::AUDIT_BLOCK]),
            pending: Vec::new().into_iter(),
            failed: false,
        }
    }

    fn next_inner(&mut self) -> Option<Result<Stored, AuditError>> {
        if let Some(stored) = self.pending.next() {
            return Some(Ok(stored));
        }
        if let Some(item) = self.singles.next() {
            return Some(item.map_err(AuditError::from).and_then(single));
        }
        let records = match self.blocks.next()? {
            Ok(kv) => block(kv),
            Err(e) => return Some(Err(e.into())),
        };
        match records {
            Ok(records) => {
                self.pending = records.into_iter();
                self.pending.next().map(Ok)
            }
            Err(e) => Some(Err(e)),
        }
    }
}

/// A single record of an earlier version, stored under `a seq`.
fn single((key, value): (sled::IVec, sled::IVec)) -> Result<Stored, AuditError> {
    let seq = seq_of(&key)?;
    let range = 0..value.len();
    Ok(Stored {
        seq,
        key,
        value,
        range,
        last_in_block: true,
    })
}

/// The records of a block stored under `b first_seq`, in order; never empty.
fn block((key, value): (sled::IVec, sled::IVec)) -> Result<Vec<Stored>, AuditError> {
    let first = seq_of(&key)?;
    let Some(ranges) = block_ranges(&value).filter(|r| !r.is_empty()) else {
        return Err(AuditError::Broken {
            seq: first,
            problem: "its block is cut short or empty".into(),
        });
    };
    let last = ranges.len() - 1;
    Ok(ranges
        .into_iter()
        .enumerate()
        .map(|(i, range)| Stored {
            seq: first + i as u64,
            key: key.clone(),
            value: value.clone(),
            range,
            last_in_block: i == last,
        })
        .collect())
}

impl Iterator for Records {
    type Item = Result<Stored, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.next_inner();
        if matches!(item, Some(Err(_))) {
            self.failed = true;
        }
        item
    }
}

/// The last stored record, if any.
pub fn last(tree: &sled::Db) -> Result<Option<Stored>, AuditError> {
    if let Some(item) = tree.scan_prefix([keys::AUDIT_BLOCK]).next_back() {
        return Ok(block(item?)?.pop());
    }
    tree.scan_prefix([keys::AUDIT])
        .next_back()
        .map(|item| single(item?))
        .transpose()
}

/// A block as found by [`block_of`]: its key, its records (stored bytes)
/// and the position of the record asked for.
pub type FoundBlock = (sled::IVec, Vec<Vec<u8>>, usize);

/// The block holding record `seq`. For tools and tests that inspect or
/// repair the log by hand.
pub fn block_of(tree: &sled::Db, seq: u64) -> Result<Option<FoundBlock>, AuditError> {
    let range = keys::audit_block(0)..=keys::audit_block(seq);
    let Some(item) = tree.range(range).next_back() else {
        return Ok(None);
    };
    let (key, value) = item?;
    let first = seq_of(&key)?;
    let records: Vec<Vec<u8>> = decode_block(&value)
        .ok_or(AuditError::Broken {
            seq: first,
            problem: "its block is cut short".into(),
        })?
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    let at = (seq - first) as usize;
    if at >= records.len() {
        return Ok(None);
    }
    Ok(Some((key, records, at)))
}

fn seq_of(key: &[u8]) -> Result<u64, AuditError> {
    key.get(1..)
        .and_then(keys::be_u64)
        .ok_or(AuditError::Broken {
            seq: 0,
            problem: "unreadable key".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_closes_blocks_at_the_size_and_they_decode_back() {
        let mut w = BlockWriter::default();
        let record = vec![7u8; 1100];
        for seq in 10..15 {
            w.push(seq, &record);
        }
        let blocks = w.finish();
        // 4 records of 1104 bytes pass 4096; the fifth opens a new block.
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].0, keys::audit_block(10));
        assert_eq!(blocks[1].0, keys::audit_block(14));
        assert_eq!(decode_block(&blocks[0].1).unwrap().len(), 4);
        assert_eq!(decode_block(&blocks[1].1).unwrap(), vec![&record[..]]);
        assert_eq!(encode_block(&[&record[..]]), blocks[1].1);
    }

    #[test]
    fn a_cut_block_does_not_decode() {
        let mut value = encode_block(&[b"abc".as_slice(), b"defg".as_slice()]);
        value.pop();
        assert!(decode_block(&value).is_none());
        assert!(decode_block(&[0, 0, 0]).is_none());
        assert_eq!(decode_block(&[]).unwrap().len(), 0);
    }
}
