//! Key encoding for the one sled tree that holds everything.
//!
//! Every key starts with a one-byte kind, followed by big-endian integers so
//! that sled's byte order is numeric order (a subscription's pending entries
//! iterate in sequence order; the expiry index iterates in time order).

/// Topic message: `m topic(4) seq(8)` → [`super::records::StoredMessage`].
pub const MESSAGE: u8 = b'm';
/// Pending entry: `p sub(4) seq(8)` → [`super::records::Pending`], then the
/// message's stored value when it is inline (no topic copy).
pub const PENDING: u8 = b'p';
/// Packed pending entries: `q sub(4) block(8)` → the records of
/// [`super::packed::Block`], entries of `sub` from `block * SPAN` on.
pub const PACKED: u8 = b'q';
/// Dead letter: `d sub(4) seq(8)` → [`super::records::DeadLetter`].
pub const DEAD: u8 = b'd';
/// Dedup entry: `i topic(4) len(1) sender message_id` → seq(8) publish_ms(8).
pub const DEDUP: u8 = b'i';
/// Dedup expiry index: `w publish_ms(8) <dedup key>` → empty.
pub const DEDUP_BY_TIME: u8 = b'w';
/// Message expiry index: `x expires_ms(8) topic(4) seq(8)` → empty. Only for
/// expiries earlier than the topic's retention (an envelope's `expires_at`,
/// delivery reports, redriven messages); retention expiry is found by
/// walking the topic's messages in sequence order.
pub const EXPIRY: u8 = b'x';
/// Next sequence of a topic: `s topic(4)` → seq(8).
pub const NEXT_SEQ: u8 = b's';
/// Sequence floor of a topic that delivers before its syncs: `S topic(4)` →
/// seq(8). No sequence below it is handed out again, as one of them may have
/// been delivered before a crash lost it; raised well ahead of the topic's
/// sequences, so a restart skips ahead to it.
pub const SEQ_FLOOR: u8 = b'S';
/// Subscription counters: `k sub(4)` → depth(8) dead_letters(8).
pub const COUNTERS: u8 = b'k';
/// Name registry: `n t <topic name>` → topic(4); `n s <subscription name>` → sub(4) topic(4).
pub const NAME: u8 = b'n';
/// Audit record of store format 1: `a seq(8)` → record and its hash.
pub const AUDIT: u8 = b'a';
/// Audit block: `b first_seq(8)` → consecutive records (see
/// [`crate::audit::blocks`]). Only in journal records now (the flusher
/// appends them to segment files); store format 2 kept them in sled.
pub const AUDIT_BLOCK: u8 = b'b';
/// Audit anchor left by pruning: `A` → [`crate::audit::AuditAnchor`].
pub const AUDIT_ANCHOR: &[u8] = b"A";
/// Durable end of the audit segments: `T` → [`crate::audit::segments::Tail`].
pub const AUDIT_TAIL: &[u8] = b"T";
/// Message body: `B segment(8) offset(8)` → the stored value of a message
/// whose pending entry holds a [`super::bodies::BodyRef`]. Only in journal
/// records: the flusher writes it to the segment file, never to sled.
pub const BODY: u8 = b'B';
/// Live count of a message segment: `L segment(8)` → bodies still
/// referenced (u64); no key once none is.
pub const BODY_LIVE: u8 = b'L';
/// Registered schema package: `R <package>` → [`crate::schema::StoredPackage`].
pub const SCHEMA: u8 = b'R';
/// Last id handed out to a topic or subscription: `c` → id(4).
pub const ID_COUNTER: &[u8] = b"c";
/// Last journal group applied: `J` → lsn(8) (see [`super::journal`]).
pub const JOURNAL_LSN: &[u8] = b"J";
/// On-disk format version: `v` → u32.
pub const FORMAT: &[u8] = b"v";

pub fn message(topic: u32, seq: u64) -> [u8; 13] {
    id_seq(MESSAGE, topic, seq)
}

pub fn pending(sub: u32, seq: u64) -> [u8; 13] {
    id_seq(PENDING, sub, seq)
}

pub fn packed(sub: u32, block: u64) -> [u8; 13] {
    id_seq(PACKED, sub, block)
}

pub fn dead(sub: u32, seq: u64) -> [u8; 13] {
    id_seq(DEAD, sub, seq)
}

pub fn audit(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = AUDIT;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub fn audit_block(first_seq: u64) -> [u8; 9] {
    let mut key = audit(first_seq);
    key[0] = AUDIT_BLOCK;
    key
}

/// Whether `key` is an audit block's (`b first_seq`).
pub fn is_audit_block(key: &[u8]) -> bool {
    key.first() == Some(&AUDIT_BLOCK)
}

/// The sequence number in an audit key (`a seq` or `b first_seq`).
pub fn audit_seq(key: &[u8]) -> Option<u64> {
    key.get(1..).and_then(be_u64)
}

pub fn body(segment: u64, offset: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = BODY;
    key[1..9].copy_from_slice(&segment.to_be_bytes());
    key[9..].copy_from_slice(&offset.to_be_bytes());
    key
}

/// The segment and offset in a body key (`B segment offset`).
pub fn parse_body(key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != 17 || key[0] != BODY {
        return None;
    }
    Some((be_u64(&key[1..9])?, be_u64(&key[9..])?))
}

pub fn body_live(segment: u64) -> [u8; 9] {
    let mut key = audit(segment);
    key[0] = BODY_LIVE;
    key
}

/// The segment in a live-count key (`L segment`).
pub fn body_live_segment(key: &[u8]) -> Option<u64> {
    if key.len() != 9 || key[0] != BODY_LIVE {
        return None;
    }
    be_u64(&key[1..])
}

pub fn next_seq(topic: u32) -> [u8; 5] {
    id_only(NEXT_SEQ, topic)
}

pub fn seq_floor(topic: u32) -> [u8; 5] {
    id_only(SEQ_FLOOR, topic)
}

pub fn counters(sub: u32) -> [u8; 5] {
    id_only(COUNTERS, sub)
}

/// Prefix of every key of one subscription's pending entries.
pub fn pending_prefix(sub: u32) -> [u8; 5] {
    id_only(PENDING, sub)
}

/// Prefix of every block of one subscription's packed pending entries.
pub fn packed_prefix(sub: u32) -> [u8; 5] {
    id_only(PACKED, sub)
}

/// Prefix of every key of one subscription's dead letters.
pub fn dead_prefix(sub: u32) -> [u8; 5] {
    id_only(DEAD, sub)
}

pub fn dedup(topic: u32, sender: &str, message_id: &str) -> Vec<u8> {
    // Agency ids are at most 64 bytes (config validation), so the length fits a byte.
    let sender = &sender.as_bytes()[..sender.len().min(255)];
    let mut key = Vec::with_capacity(6 + sender.len() + message_id.len());
    key.push(DEDUP);
    key.extend_from_slice(&topic.to_be_bytes());
    key.push(sender.len() as u8);
    key.extend_from_slice(sender);
    key.extend_from_slice(message_id.as_bytes());
    key
}

pub fn dedup_by_time(publish_ms: u64, dedup_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + dedup_key.len());
    key.push(DEDUP_BY_TIME);
    key.extend_from_slice(&publish_ms.to_be_bytes());
    key.extend_from_slice(dedup_key);
    key
}

pub fn expiry(expires_ms: u64, topic: u32, seq: u64) -> [u8; 21] {
    let mut key = [0u8; 21];
    key[0] = EXPIRY;
    key[1..9].copy_from_slice(&expires_ms.to_be_bytes());
    key[9..13].copy_from_slice(&topic.to_be_bytes());
    key[13..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub fn topic_name(name: &str) -> Vec<u8> {
    [&[NAME, b't'][..], name.as_bytes()].concat()
}

pub fn subscription_name(name: &str) -> Vec<u8> {
    [&[NAME, b's'][..], name.as_bytes()].concat()
}

/// The sequence number at the end of a `kind id(4) seq(8)` key.
pub fn seq_of(key: &[u8]) -> Option<u64> {
    be_u64(key.get(5..13)?)
}

/// `(expires_ms, topic, seq)` of an expiry-index key.
pub fn parse_expiry(key: &[u8]) -> Option<(u64, u32, u64)> {
    Some((
        be_u64(key.get(1..9)?)?,
        be_u32(key.get(9..13)?)?,
        be_u64(key.get(13..21)?)?,
    ))
}

/// `(publish_ms, dedup key)` of a dedup-by-time key.
pub fn parse_dedup_by_time(key: &[u8]) -> Option<(u64, &[u8])> {
    Some((be_u64(key.get(1..9)?)?, key.get(9..)?))
}

pub fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

pub fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

fn id_seq(kind: u8, id: u32, seq: u64) -> [u8; 13] {
    let mut key = [0u8; 13];
    key[0] = kind;
    key[1..5].copy_from_slice(&id.to_be_bytes());
    key[5..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn id_only(kind: u8, id: u32) -> [u8; 5] {
    let mut key = [0u8; 5];
    key[0] = kind;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_keys_sort_by_sequence() {
        let a = pending(7, 255);
        let b = pending(7, 256);
        let c = pending(8, 1);
        assert!(a < b && b < c);
        assert_eq!(seq_of(&b), Some(256));
    }

    #[test]
    fn expiry_keys_sort_by_time_and_parse_back() {
        let early = expiry(1_000, 9, 5);
        let late = expiry(2_000, 1, 1);
        assert!(early < late);
        assert_eq!(parse_expiry(&early), Some((1_000, 9, 5)));
    }

    #[test]
    fn dedup_keys_separate_senders_that_share_a_prefix() {
        // "ab" + "c…" must not collide with "a" + "bc…".
        assert_ne!(dedup(1, "ab", "c1"), dedup(1, "a", "bc1"));
    }
}
