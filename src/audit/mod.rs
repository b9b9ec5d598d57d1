//! The tamper-evident audit log.
//!
//! Every publish, delivery, ack, nack, dead letter, expiry, refused request,
//! TLS reload and operator action (redrive, purge, peek) becomes an
//! [`AuditEvent`]; the storage writer appends it as a record in the **same
//! group and journal record** as the change it describes, so a publish is
//! acknowledged only once its audit record is durable too.
//!
//! # Records and the chain
//! Record `n` is stored as its prost encoding ([`AuditRecord`]) followed by
//! the 32-byte SHA-256 of that encoding, in a block of consecutive records
//! ([`blocks`]), in append-only segment files outside sled ([`segments`]).
//! Each record holds the hash of the record before it
//! (`prev_hash`), so:
//! - changing any byte of a record changes its hash (caught at that record);
//! - re-hashing an edited record breaks the next record's `prev_hash`;
//! - removing a record leaves a gap in the sequence numbers and a broken link.
//!
//! Records hold ids, agencies, topic, type and the payload's SHA-256 — never
//! the payload itself.
//!
//! # Retention
//! Records older than `audit.retention` are pruned from the front. The
//! anchor (`A`) then names the first kept record and the hash of the last
//! pruned one, so verification starts from the anchor and the rest of the
//! chain stays verifiable.

pub mod blocks;
pub mod cli;
pub mod segments;

use std::sync::Arc;

use prost::Message;
use ring::digest::{digest, SHA256};
use serde::Serialize;

use crate::storage::keys;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Publish,
    PublishDuplicate,
    Delivery,
    Ack,
    Nack,
    DeadLetter,
    Expired,
    Denied,
    ConfigReload,
    SchemaRegistered,
    /// An operator put dead letters back on their subscription.
    Redrive,
    /// An operator removed a subscription's pending messages.
    Purge,
    /// An operator looked at pending messages (with or without payloads).
    Peek,
}

impl EventKind {
    /// Stable name in records and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Publish => "publish",
            EventKind::PublishDuplicate => "publish_duplicate",
            EventKind::Delivery => "delivery",
            EventKind::Ack => "ack",
            EventKind::Nack => "nack",
            EventKind::DeadLetter => "dead_letter",
            EventKind::Expired => "expired",
            EventKind::Denied => "denied",
            EventKind::ConfigReload => "config_reload",
            EventKind::SchemaRegistered => "schema_registered",
            EventKind::Redrive => "redrive",
            EventKind::Purge => "purge",
            EventKind::Peek => "peek",
        }
    }
}

/// One thing to record. Fields that do not apply stay empty.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub kind: EventKind,
    /// The agency that acted: the publisher, the consuming agency, the caller
    /// of a refused request.
    pub agency: String,
    pub topic: String,
    pub subscription: String,
    pub message_id: String,
    pub message_type: String,
    pub digest: Option<[u8; 32]>,
    /// The message's sequence in its topic.
    pub sequence: u64,
    pub attempt: u32,
    /// Dead-letter reason, refusal reason, reload outcome.
    pub reason: String,
    /// Messages an operator action covered (redrive, purge, peek).
    pub count: u64,
}

impl AuditEvent {
    pub fn new(kind: EventKind, agency: impl Into<String>) -> Self {
        AuditEvent {
            kind,
            agency: agency.into(),
            topic: String::new(),
            subscription: String::new(),
            message_id: String::new(),
            message_type: String::new(),
            digest: None,
            sequence: 0,
            attempt: 0,
            reason: String::new(),
            count: 0,
        }
    }

    /// Fills in the message fields from a stored message.
    pub fn about(mut self, message: &crate::storage::StoredMessage) -> Self {
        self.message_id = message.message_id.clone();
        self.message_type = message.message_type.clone();
        self.digest = Some(message.digest);
        self.sequence = message.seq;
        self
    }
}

/// A stored audit record (prost encoding; field numbers are a storage contract).
#[derive(Clone, PartialEq, Message)]
pub struct AuditRecord {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(uint64, tag = "2")]
    pub time_ms: u64,
    #[prost(string, tag = "3")]
    pub event: String,
    #[prost(string, tag = "4")]
    pub agency: String,
    #[prost(string, tag = "5")]
    pub topic: String,
    #[prost(string, tag = "6")]
    pub subscription: String,
    #[prost(string, tag = "7")]
    pub message_id: String,
    #[prost(string, tag = "8")]
    pub message_type: String,
    #[prost(bytes = "vec", tag = "9")]
    pub payload_sha256: Vec<u8>,
    #[prost(uint64, tag = "10")]
    pub sequence: u64,
    #[prost(uint32, tag = "11")]
    pub attempt: u32,
    #[prost(string, tag = "12")]
    pub reason: String,
    #[prost(bytes = "vec", tag = "13")]
    pub prev_hash: Vec<u8>,
    #[prost(uint64, tag = "14")]
    pub count: u64,
}

/// The anchor left by pruning (prost encoding, under key `A`).
#[derive(Clone, PartialEq, Message)]
pub struct AuditAnchor {
    /// The first record kept.
    #[prost(uint64, tag = "1")]
    pub first_seq: u64,
    /// Hash of the last record pruned: the `prev_hash` of `first_seq`.
    #[prost(bytes = "vec", tag = "2")]
    pub prev_hash: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub pruned_at_ms: u64,
}

pub const HASH_LEN: usize = 32;
const GENESIS: [u8; HASH_LEN] = [0; HASH_LEN];

fn sha256(bytes: &[u8]) -> [u8; HASH_LEN] {
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// SHA-256 of a payload, as recorded.
pub fn payload_digest(payload: &[u8]) -> [u8; HASH_LEN] {
    sha256(payload)
}

/// Why the audit log could not be read or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit record {seq} is broken: {problem}")]
    Broken { seq: u64, problem: String },
    #[error("reading the audit log failed")]
    Storage(#[from] sled::Error),
    #[error("reading the audit log failed")]
    Store(#[from] crate::storage::StorageError),
    #[error("reading the audit log's file {path} failed")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit anchor is unreadable")]
    Anchor,
}

/// The head of the chain, kept by the storage writer.
#[derive(Debug, Clone)]
pub struct Chain {
    next_seq: u64,
    last_hash: [u8; HASH_LEN],
    retention_ms: u64,
}

impl Chain {
    /// Loads the head: the segments' recorded end (`tail`, exact right
    /// after the store's open), else the anchor in `tree`, else genesis.
    pub fn load(
        tree: &sled::Db,
        tail: Option<&segments::Tail>,
        retention: std::time::Duration,
    ) -> Result<Chain, AuditError> {
        let retention_ms = retention.as_millis() as u64;
        if let Some(tail) = tail {
            return Ok(Chain {
                next_seq: tail.next_seq,
                last_hash: to_hash(&tail.last_hash).ok_or(AuditError::Broken {
                    seq: tail.next_seq.saturating_sub(1),
                    problem: "the store's record of the log's end is unreadable".into(),
                })?,
                retention_ms,
            });
        }
        let (next_seq, last_hash) = match read_anchor(tree)? {
            Some(anchor) => (
                anchor.first_seq,
                to_hash(&anchor.prev_hash).ok_or(AuditError::Anchor)?,
            ),
            None => (1, GENESIS),
        };
        Ok(Chain {
            next_seq,
            last_hash,
            retention_ms,
        })
    }

    /// The sequence number and stored bytes of the next record; advances
    /// the head. (The writer uses [`Chain::append_to`], which writes the
    /// same bytes straight into a block.)
    pub fn append(&mut self, event: &AuditEvent, time_ms: u64) -> (u64, Vec<u8>) {
        let mut value = Vec::new();
        let seq = self.write_next(event.clone(), time_ms, &mut value);
        (seq, value)
    }

    /// Appends the next record to `blocks`, encoded and hashed in place (no
    /// copy of the event's strings, no buffer of its own); advances the
    /// head and returns its sequence number.
    pub fn append_to(
        &mut self,
        event: AuditEvent,
        time_ms: u64,
        blocks: &mut blocks::BlockWriter,
    ) -> u64 {
        let seq = self.next_seq;
        blocks.push_with(seq, |buf| {
            self.write_next(event, time_ms, buf);
        });
        seq
    }

    /// Appends the next record's stored bytes (its prost encoding, then
    /// their SHA-256) to `buf`; advances the head and returns its sequence
    /// number.
    fn write_next(&mut self, event: AuditEvent, time_ms: u64, buf: &mut Vec<u8>) -> u64 {
        let record = AuditRecord {
            seq: self.next_seq,
            time_ms,
            event: event.kind.as_str().to_string(),
            agency: event.agency,
            topic: event.topic,
            subscription: event.subscription,
            message_id: event.message_id,
            message_type: event.message_type,
            payload_sha256: event.digest.map(|d| d.to_vec()).unwrap_or_default(),
            sequence: event.sequence,
            attempt: event.attempt,
            reason: event.reason,
            prev_hash: self.last_hash.to_vec(),
            count: event.count,
        };
        let start = buf.len();
        buf.reserve(record.encoded_len() + HASH_LEN);
        // A Vec grows as needed, so encoding into one cannot fail; the
        // fallback only keeps this free of a panic path.
        if record.encode(buf).is_err() {
            buf.truncate(start);
            buf.extend_from_slice(&record.encode_to_vec());
        }
        let hash = sha256(&buf[start..]);
        buf.extend_from_slice(&hash);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.last_hash = hash;
        seq
    }

    pub fn retention_ms(&self) -> u64 {
        self.retention_ms
    }
}

/// A record's encoding and its stored hash.
fn split(value: &[u8]) -> Option<(&[u8], [u8; HASH_LEN])> {
    let at = value.len().checked_sub(HASH_LEN)?;
    let hash = to_hash(&value[at..])?;
    Some((&value[..at], hash))
}

fn to_hash(bytes: &[u8]) -> Option<[u8; HASH_LEN]> {
    bytes.try_into().ok()
}

pub fn read_anchor(tree: &sled::Db) -> Result<Option<AuditAnchor>, AuditError> {
    match tree.get(keys::AUDIT_ANCHOR)? {
        Some(v) => AuditAnchor::decode(&v[..])
            .map(Some)
            .map_err(|_| AuditError::Anchor),
        None => Ok(None),
    }
}

/// What a successful verification saw.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub records: u64,
    /// Bytes of the stored records in their segments (frames included).
    pub bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records before this one were pruned by retention.
    pub anchored_at: Option<u64>,
}

/// Checks the whole chain of the store whose sled database is `tree` and
/// whose data directory is `data_dir` (opened, so recovered: see
/// [`crate::storage::open_existing`]); the error names the first broken
/// record. The chain must also end where the store recorded its end.
pub fn verify(tree: &sled::Db, data_dir: &std::path::Path) -> Result<Verified, AuditError> {
    let anchor = read_anchor(tree)?;
    let (mut expect_seq, mut prev) = match &anchor {
        Some(a) => (
            a.first_seq,
            to_hash(&a.prev_hash).ok_or(AuditError::Anchor)?,
        ),
        None => (1, GENESIS),
    };
    let mut records = 0;
    let mut bytes = 0;
    let mut first_seq = None;
    for item in segments::Records::new(data_dir, expect_seq)? {
        let item = item?;
        bytes += item.stored_len();
        let seq = item.seq;
        let broken = |problem: String| AuditError::Broken { seq, problem };
        if seq != expect_seq {
            return Err(if seq > expect_seq {
                missing(expect_seq, seq)
            } else {
                broken(format!("out of order: expected record {expect_seq}"))
            });
        }
        let (body, stored) = item.split().ok_or_else(|| broken("truncated".into()))?;
        if sha256(body) != stored {
            return Err(broken(
                "altered: its content does not match its hash".into(),
            ));
        }
        let record = AuditRecord::decode(body).map_err(|e| broken(format!("unreadable: {e}")))?;
        if record.seq > seq {
            // A record taken out of a block moves the ones after it up.
            return Err(missing(seq, record.seq));
        }
        if record.seq != seq {
            return Err(broken(format!(
                "altered: it says it is record {}",
                record.seq
            )));
        }
        if record.prev_hash != prev {
            return Err(broken(format!(
                "the chain is broken here: its previous-record hash does not match record {}",
                seq.saturating_sub(1)
            )));
        }
        prev = stored;
        first_seq.get_or_insert(seq);
        expect_seq = seq.saturating_add(1);
        records += 1;
    }
    if let Some(tail) = segments::read_tail(tree)? {
        if tail.next_seq != expect_seq {
            return Err(AuditError::Broken {
                seq: expect_seq.min(tail.next_seq),
                problem: format!(
                    "missing: the log ends before record {expect_seq}, but the store recorded its end before record {}",
                    tail.next_seq
                ),
            });
        }
        if tail.last_hash != prev {
            return Err(AuditError::Broken {
                seq: expect_seq.saturating_sub(1),
                problem: "altered: it is not the last record the store recorded".into(),
            });
        }
    }
    Ok(Verified {
        records,
        bytes,
        first_seq,
        last_seq: first_seq.map(|_| expect_seq - 1),
        anchored_at: anchor.map(|a| a.first_seq),
    })
}

/// Record `expected` is not where it should be: `found` comes next.
fn missing(expected: u64, found: u64) -> AuditError {
    AuditError::Broken {
        seq: expected,
        problem: format!(
            "missing: record {} is followed by record {found}",
            expected.saturating_sub(1)
        ),
    }
}

/// A record as exported (JSON lines).
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    pub seq: u64,
    pub time: String,
    pub time_ms: u64,
    pub event: String,
    pub agency: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub topic: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub subscription: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message_type: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub payload_sha256: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub sequence: u64,
    #[serde(skip_serializing_if = "is_zero32")]
    pub attempt: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub count: u64,
    pub hash: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero32(v: &u32) -> bool {
    *v == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Records at or after `since_ms` (and of `agency`, when given), in order,
/// of the store whose sled database is `tree` and data directory `data_dir`.
pub fn export(
    tree: &sled::Db,
    data_dir: &std::path::Path,
    since_ms: u64,
    agency: Option<&str>,
    mut sink: impl FnMut(Exported) -> std::io::Result<()>,
) -> Result<u64, ExportError> {
    let unreadable = |e: AuditError| match e {
        AuditError::Broken { seq, .. } => ExportError::Unreadable(seq),
        other => ExportError::Read(other),
    };
    let from = read_anchor(tree)
        .map_err(unreadable)?
        .map_or(0, |a| a.first_seq);
    let mut n = 0;
    for item in segments::Records::new(data_dir, from).map_err(unreadable)? {
        let item = item.map_err(unreadable)?;
        let seq = item.seq;
        let (body, hash) = item.split().ok_or(ExportError::Unreadable(seq))?;
        let r = AuditRecord::decode(body).map_err(|_| ExportError::Unreadable(seq))?;
        if r.time_ms < since_ms || agency.is_some_and(|a| a != r.agency) {
            continue;
        }
        let time = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.time_ms),
        )
        .to_string();
        sink(Exported {
            seq: r.seq,
            time,
            time_ms: r.time_ms,
            event: r.event,
            agency: r.agency,
            topic: r.topic,
            subscription: r.subscription,
            message_id: r.message_id,
            message_type: r.message_type,
            payload_sha256: hex(&r.payload_sha256),
            sequence: r.sequence,
            attempt: r.attempt,
            reason: r.reason,
            count: r.count,
            hash: hex(&hash),
        })
        .map_err(ExportError::Write)?;
        n += 1;
    }
    Ok(n)
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Read(AuditError),
    #[error("audit record {0} is unreadable; run `joinery audit verify`")]
    Unreadable(u64),
    #[error("writing the export failed")]
    Write(#[source] std::io::Error),
}

/// Where the broker sends audit events (the store's writer), cheap to clone.
pub type Sink = Arc<dyn Fn(AuditEvent) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A log in a temporary data directory: sled for the anchor and the
    /// recorded end, segments for the records.
    struct Log {
        tmp: tempfile::TempDir,
        db: sled::Db,
        chain: Chain,
        segments: segments::Appender,
    }

    impl Log {
        fn new(segment_bytes: u64) -> Log {
            let tmp = tempfile::tempdir().unwrap();
            let db = sled::Config::new()
                .path(tmp.path().join("db"))
                .open()
                .unwrap();
            let chain = Chain::load(&db, None, Duration::from_secs(86400)).unwrap();
            let segments = segments::Appender::open(tmp.path(), None, segment_bytes).unwrap();
            Log {
                tmp,
                db,
                chain,
                segments,
            }
        }

        fn dir(&self) -> &std::path::Path {
            self.tmp.path()
        }

        /// Appends `n` records at `time_ms` as one block.
        fn append_block(&mut self, time_ms: u64, n: usize) {
            let mut w = blocks::BlockWriter::default();
            for _ in 0..n {
                let event = AuditEvent::new(EventKind::Ack, "council");
                self.chain.append_to(event, time_ms, &mut w);
            }
            for (key, value) in w.finish() {
                let first = keys::audit_seq(&key).unwrap();
                self.segments.push(first, &value).unwrap();
            }
        }

        /// What a checkpoint does: sync, then record the end.
        fn checkpoint(&mut self) {
            if let Some(tail) = self.segments.sync().unwrap() {
                segments::record_tail(&self.db, &tail).unwrap();
            }
        }

        fn verify(&self) -> Result<Verified, AuditError> {
            verify(&self.db, self.dir())
        }
    }

    #[test]
    fn records_built_in_place_are_the_prost_encoding_and_its_hash_chained() {
        let mut chain = Chain {
            next_seq: 7,
            last_hash: [9; HASH_LEN],
            retention_ms: 0,
        };
        let mut event = AuditEvent::new(EventKind::DeadLetter, "council");
        event.topic = "referrals".into();
        event.subscription = "council.inbox".into();
        event.message_id = "m-1".into();
        event.message_type = "joinery.v1.Test".into();
        event.digest = Some([3; 32]);
        event.sequence = 42;
        event.attempt = 5;
        event.reason = "max_deliveries".into();
        event.count = 2;
        let mut w = blocks::BlockWriter::default();
        assert_eq!(chain.append_to(event.clone(), 1_000, &mut w), 7);
        assert_eq!(
            chain.append_to(AuditEvent::new(EventKind::Ack, "x"), 1_001, &mut w),
            8
        );

        // What the records must be: the prost encoding of every field, then
        // its SHA-256; the second chained to the first.
        let first = AuditRecord {
            seq: 7,
            time_ms: 1_000,
            event: "dead_letter".into(),
            agency: "council".into(),
            topic: "referrals".into(),
            subscription: "council.inbox".into(),
            message_id: "m-1".into(),
            message_type: "joinery.v1.Test".into(),
            payload_sha256: vec![3; 32],
            sequence: 42,
            attempt: 5,
            reason: "max_deliveries".into(),
            prev_hash: vec![9; HASH_LEN],
            count: 2,
        };
        let mut first_stored = first.encode_to_vec();
        let first_hash = sha256(&first_stored);
        first_stored.extend_from_slice(&first_hash);
        let second = AuditRecord {
            seq: 8,
            time_ms: 1_001,
            event: "ack".into(),
            agency: "x".into(),
            prev_hash: first_hash.to_vec(),
            ..Default::default()
        };
        let mut second_stored = second.encode_to_vec();
        let second_hash = sha256(&second_stored);
        second_stored.extend_from_slice(&second_hash);

        let block = w.finish();
        assert_eq!(block.len(), 1);
        assert_eq!(block[0].0, keys::audit_block(7));
        assert_eq!(
            block[0].1,
            blocks::encode_block(&[&first_stored, &second_stored])
        );
        assert_eq!(chain.last_hash, second_hash);
        assert_eq!(chain.next_seq, 9);
        // `append` gives the same stored bytes, record by record.
        let mut again = Chain {
            next_seq: 7,
            last_hash: [9; HASH_LEN],
            retention_ms: 0,
        };
        assert_eq!(again.append(&event, 1_000), (7, first_stored));
    }

    #[test]
    fn pruning_keeps_the_rest_of_the_chain_verifiable() {
        // Every block in a segment of its own.
        let mut log = Log::new(1);
        for i in 0..10 {
            log.append_block(1_000 + i, 1);
        }
        for i in 0..5 {
            log.append_block(10_000_000 + i, 1);
        }
        log.checkpoint();
        assert_eq!(log.verify().unwrap().records, 15);

        // Segment 10 goes only once the first record after it is old.
        let anchor = segments::prune_plan(log.dir(), 0, 5_000_000, 100)
            .unwrap()
            .unwrap();
        assert_eq!(anchor.first_seq, 10);
        log.db
            .insert(keys::AUDIT_ANCHOR, anchor.encode_to_vec())
            .unwrap();
        // Verifies before the segments are removed (an interrupted prune)...
        assert_eq!(log.verify().unwrap().first_seq, Some(10));
        assert_eq!(log.segments.remove_before(anchor.first_seq).unwrap(), 9);
        // ...and after.
        let v = log.verify().unwrap();
        assert_eq!(
            (v.records, v.first_seq, v.anchored_at),
            (6, Some(10), Some(10))
        );

        // The chain goes on from its head after a reload.
        let tail = segments::read_tail(&log.db).unwrap();
        log.chain = Chain::load(&log.db, tail.as_ref(), Duration::from_secs(1)).unwrap();
        log.append_block(20_000_000, 1);
        log.checkpoint();
        assert_eq!(log.verify().unwrap().last_seq, Some(16));

        // Removing the first kept record is still caught.
        let first = segments::dir_of(log.dir()).join("00000000000000000010.seg");
        std::fs::remove_file(first).unwrap();
        match log.verify() {
            Err(AuditError::Broken { seq, .. }) => assert_eq!(seq, 10),
            other => panic!("expected record 10 broken, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_log_verifies_and_starts_at_one() {
        let log = Log::new(1 << 20);
        let v = log.verify().unwrap();
        assert_eq!((v.records, v.first_seq), (0, None));
        let mut chain = Chain::load(&log.db, None, Duration::from_secs(86400)).unwrap();
        let (seq, _) = chain.append(&AuditEvent::new(EventKind::Denied, "x"), 1);
        assert_eq!(seq, 1);
    }

    #[test]
    fn records_missing_from_the_end_are_caught_by_the_recorded_end() {
        let mut log = Log::new(1 << 20);
        log.append_block(1_000, 3);
        log.append_block(1_000, 2);
        log.checkpoint();
        assert_eq!(log.verify().unwrap().last_seq, Some(5));
        let (path, first, _, _) = segments::block_of(log.dir(), 5).unwrap().unwrap();
        segments::replace_block(&path, first, &[]).unwrap();
        match log.verify() {
            Err(AuditError::Broken { seq, problem }) => {
                assert_eq!(seq, 4);
                assert!(problem.contains("missing"), "{problem}");
            }
            other => panic!("expected the last records missing, got {other:?}"),
        }
    }

    /// A log of blocks of `sizes` records with record `seq` taken out of
    /// its block, by hand.
    fn log_without(sizes: &[usize], seq: u64) -> (Log, u64, usize) {
        let mut log = Log::new(1 << 20);
        for &n in sizes {
            log.append_block(1_000, n);
        }
        log.checkpoint();
        let (path, first, mut records, at) = segments::block_of(log.dir(), seq).unwrap().unwrap();
        records.remove(at);
        segments::replace_block(&path, first, &records).unwrap();
        (log, first, at)
    }

    fn assert_missing(log: &Log, expected: u64) {
        match log.verify() {
            Err(AuditError::Broken { seq, problem }) => {
                assert_eq!(seq, expected);
                assert!(problem.contains("missing"), "{problem}");
            }
            other => panic!("expected record {expected} missing, got {other:?}"),
        }
    }

    #[test]
    fn a_record_taken_out_of_a_block_is_named_missing() {
        let (log, first, at) = log_without(&[6, 2], 4);
        assert_eq!((first, at), (1, 3));
        assert_missing(&log, 4);
        // The last record of the first block: the next block shows the gap.
        let (log, _, _) = log_without(&[3, 3], 3);
        assert_missing(&log, 3);
    }
}
