//! How audit records are grouped: in **blocks** of consecutive records.
//!
//! A block holds records `first_seq, first_seq + 1, ...`, each as a 4-byte
//! big-endian length then the record's stored bytes (its prost encoding and
//! its hash). The writer starts a new block once one reaches
//! [`BLOCK_BYTES`], so one journal entry and one segment frame cover a few
//! dozen records.
//!
//! Blocks travel in the journal as keys `b first_seq` and are stored in
//! segment files ([`super::segments`]). Earlier versions kept them in sled
//! under those keys, and before that one record per key (`a seq`); opening
//! such a store moves them into segments ([`legacy`]).

use std::ops::Range;

use super::AuditError;
use crate::storage::keys;

/// A block is closed once it holds at least this many bytes.
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

/// The byte ranges of a block's records in order, without collecting them;
/// an item of None says the block is cut short there, and is the last.
pub fn ranges(value: &[u8]) -> impl Iterator<Item = Option<Range<usize>>> + '_ {
    let mut at = 0;
    let mut cut = false;
    std::iter::from_fn(move || {
        if cut || at >= value.len() {
            return None;
        }
        let range = (|| {
            let len = u32::from_be_bytes(value.get(at..at + LEN)?.try_into().ok()?) as usize;
            let start = at + LEN;
            let end = start.checked_add(len)?;
            (end <= value.len()).then_some(start..end)
        })();
        match &range {
            Some(r) => at = r.end,
            None => cut = true,
        }
        Some(range)
    })
}

/// The byte ranges of a block's records, or None if it is cut short.
pub fn block_ranges(value: &[u8]) -> Option<Vec<Range<usize>>> {
    ranges(value).collect()
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

/// The audit log as earlier versions (store format 2 and before) kept it in
/// sled: single records under `a seq`, then blocks under `b first_seq`.
/// Yields (first sequence number, block), singles as one-record blocks, in
/// sequence order; read once, to move them into segments.
pub(crate) fn legacy(
    tree: &sled::Db,
) -> impl Iterator<Item = Result<(u64, Vec<u8>), AuditError>> + '_ {
    let singles = tree.scan_prefix([keys::AUDIT]).map(|item| {
        let (key, value) = item?;
        Ok((seq_of(&key)?, encode_block(&[&value[..]])))
    });
    let blocks = tree.scan_prefix([keys::AUDIT_BLOCK]).map(|item| {
        let (key, value) = item?;
        Ok((seq_of(&key)?, value.to_vec()))
    });
    singles.chain(blocks)
}

fn seq_of(key: &[u8]) -> Result<u64, AuditError> {
    keys::audit_seq(key).ok_or(AuditError::Broken {
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
