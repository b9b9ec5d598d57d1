//! Packed pending entries: a subscription's fresh entries that refer to a
//! body in a segment file, [`SPAN`] sequences to one sled key.
//!
//! A message published to one subscription costs a pending entry. As its
//! own key (`p sub seq`) that is one sled insert per publish and one
//! removal per ack, and sled's leaves split every 16 keys: on a 2-core
//! server that was the largest part of a group commit. Packed, a group of
//! publishes rewrites one or two keys (`q sub block`), and a group of acks
//! the same.
//!
//! Only entries never delivered nor moved are packed: a record is a
//! sequence and a [`BodyRef`] (with the head of its stored value), and its
//! [`Pending`] fields are the defaults. An entry whose fields change
//! (a redelivery, a nack, a compaction moving its body) leaves its block
//! for its own key, written first: a reader may see it in both places for
//! a moment (the own key wins) but never in neither. An entry is in one
//! place otherwise.

use super::bodies::BodyRef;
use super::records::Pending;
use super::StorageError;

/// Sequences per block: block `b` holds sequences `b * SPAN ..`.
pub const SPAN: u64 = 64;
/// Bytes of a record: sequence, then the encoded reference.
pub const RECORD: usize = 8 + BodyRef::ENCODED;

/// The block that would hold `seq`.
pub fn block_of(seq: u64) -> u64 {
    seq / SPAN
}

/// A block's records, in sequence order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Block {
    records: Vec<(u64, [u8; BodyRef::ENCODED])>,
}

impl Block {
    /// A stored block; `None` is an empty one.
    pub fn decode(bytes: Option<&[u8]>) -> Result<Self, StorageError> {
        let Some(bytes) = bytes else {
            return Ok(Self::default());
        };
        let records = records(bytes)?
            .map(|(seq, r)| {
                let mut out = [0u8; BodyRef::ENCODED];
                out.copy_from_slice(r);
                (seq, out)
            })
            .collect();
        Ok(Self { records })
    }

    /// The stored form (not called on an empty block: remove its key).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.records.len() * RECORD);
        for (seq, r) in &self.records {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(r);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The block's entries in sequence order, each as its own key would
    /// hold it.
    pub fn entries(&self) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
        self.records.iter().map(|(seq, r)| (*seq, entry_value(r)))
    }

    fn position(&self, seq: u64) -> Result<usize, usize> {
        self.records.binary_search_by_key(&seq, |(s, _)| *s)
    }

    /// The pending entry of `seq` as its own key would hold it.
    pub fn get(&self, seq: u64) -> Option<Vec<u8>> {
        let i = self.position(seq).ok()?;
        Some(entry_value(&self.records[i].1))
    }

    /// Puts `seq`'s entry, given as its own key would hold it, in the
    /// block. Returns false, changing nothing, for an entry a block cannot
    /// hold (one with fields set, or with no reference to a segment).
    pub fn insert(&mut self, seq: u64, entry: &[u8]) -> bool {
        let fresh = Pending::default().encode();
        let Some(reference) = entry
            .strip_prefix(&fresh[..])
            .filter(|r| BodyRef::decode(r).is_some())
        else {
            return false;
        };
        let mut r = [0u8; BodyRef::ENCODED];
        r.copy_from_slice(reference);
        match self.position(seq) {
            Ok(i) => self.records[i].1 = r,
            // Publishes come in sequence order: mostly a push.
            Err(i) => self.records.insert(i, (seq, r)),
        }
        true
    }

    /// Takes `seq`'s entry out; false if the block does not hold it.
    pub fn remove(&mut self, seq: u64) -> bool {
        match self.position(seq) {
            Ok(i) => {
                self.records.remove(i);
                true
            }
            Err(_) => false,
        }
    }
}

/// The records of a stored block: each sequence with its encoded reference.
pub fn records(bytes: &[u8]) -> Result<impl Iterator<Item = (u64, &[u8])>, StorageError> {
    if bytes.len() % RECORD != 0 {
        return Err(StorageError::Corrupt {
            what: "a block of packed pending entries".into(),
        });
    }
    Ok(bytes.chunks_exact(RECORD).map(|r| {
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&r[..8]);
        (u64::from_be_bytes(seq), &r[8..])
    }))
}

/// A record's reference as a whole pending entry (default fields).
pub fn entry_value(reference: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(Pending::LEN + reference.len());
    out.extend_from_slice(&Pending::default().encode());
    out.extend_from_slice(reference);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(offset: u64) -> BodyRef {
        BodyRef {
            segment: 3,
            offset,
            len: 100,
            crc: 7,
        }
    }

    fn entry(offset: u64, value: &[u8]) -> Vec<u8> {
        Pending::default().encode_ref(&body(offset), value)
    }

    #[test]
    fn a_block_round_trips_and_gives_entries_as_their_own_keys_would() {
        let mut block = Block::default();
        assert!(block.insert(70, &entry(0, b"value seventy and on")));
        assert!(block.insert(65, &entry(100, b"value sixty-five")));
        let stored = block.encode();
        assert_eq!(stored.len(), 2 * RECORD);
        let back = Block::decode(Some(&stored)).unwrap();
        assert_eq!(back, block);
        let seqs: Vec<u64> = records(&stored).unwrap().map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![65, 70]);

        let value = back.get(70).unwrap();
        let (pending, found) = Pending::split(&value).unwrap();
        assert_eq!(pending, Pending::default());
        match found {
            crate::storage::records::Body::Segment(b, head) => {
                assert_eq!(b, body(0));
                assert_eq!(head, &b"value seventy and"[..]);
            }
            other => panic!("not a segment reference: {other:?}"),
        }
        assert_eq!(back.get(66), None);
        assert_eq!(back.get(65), Some(entry(100, b"value sixty-five")));
    }

    #[test]
    fn entries_a_block_cannot_hold_are_refused() {
        let mut block = Block::default();
        let delivered = Pending {
            attempts: 1,
            not_before_ms: 0,
        };
        assert!(!block.insert(1, &delivered.encode_ref(&body(0), b"x")));
        assert!(!block.insert(2, &Pending::default().encode()));
        assert!(!block.insert(3, &Pending::default().encode_inline(b"inline message")));
        assert!(block.is_empty());
    }

    #[test]
    fn removing_every_entry_empties_the_block() {
        let mut block = Block::default();
        assert!(block.insert(1, &entry(0, b"x")));
        assert!(!block.remove(2));
        assert!(block.remove(1));
        assert!(block.is_empty());
        assert_eq!(Block::decode(None).unwrap(), block);
    }

    #[test]
    fn a_damaged_block_is_refused() {
        assert!(Block::decode(Some(&[0u8; RECORD + 1])).is_err());
    }

    #[test]
    fn blocks_span_sixty_four_sequences() {
        assert_eq!(block_of(63), 0);
        assert_eq!(block_of(64), 1);
    }
}
