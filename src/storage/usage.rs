//! What the store holds, by kind of key: how many keys and how many bytes
//! (key plus value), against what sled and the data directory take on disk.
//! Read by `joinery usage` from a stopped broker's data directory, so an
//! operator (and `benches/footprint.sh`) can see the disk's amplification
//! over the live bytes without working it out from the layout.

use std::path::Path;

use serde::Serialize;

use super::{keys, records::Pending, StorageError};

/// Keys and bytes of one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KindUsage {
    /// What the keys hold, in words.
    pub kind: &'static str,
    pub keys: u64,
    /// Key and value bytes together.
    pub bytes: u64,
}

/// The whole store's usage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// One row per kind that has keys, in key order, then the audit
    /// records in segment files (where `keys` counts records).
    pub kinds: Vec<KindUsage>,
    /// Sum of `bytes` over the kinds that hold queue state (messages,
    /// pending entries, dead letters, indexes, counters, names).
    pub queue_bytes: u64,
    /// Sum of `bytes` over the audit log's kinds (its segment files, and
    /// the anchor and recorded end in sled).
    pub audit_bytes: u64,
    /// Every key and value.
    pub live_bytes: u64,
    /// sled's own figure for its files.
    pub sled_bytes_on_disk: u64,
    /// Every file under the data directory, as allocated on disk (the
    /// journal, the certificates of a development PKI and the
    /// configuration's own files included).
    pub dir_bytes_on_disk: u64,
}

/// Kinds, by the first byte of their keys; `true` for the audit log's.
fn kind_of(first: u8) -> (&'static str, bool) {
    match first {
        keys::MESSAGE => ("topic copies of messages", false),
        keys::DEAD => ("dead letters", false),
        keys::DEDUP => ("dedup entries", false),
        keys::DEDUP_BY_TIME => ("dedup expiry index", false),
        keys::EXPIRY => ("message expiry index", false),
        keys::NEXT_SEQ | keys::SEQ_FLOOR => ("topic sequences", false),
        keys::COUNTERS => ("subscription counters", false),
        keys::NAME => ("names", false),
        keys::AUDIT => ("audit records (one per key)", true),
        keys::AUDIT_BLOCK => ("audit blocks", true),
        _ if first == keys::AUDIT_ANCHOR[0] => ("audit anchor", true),
        _ if first == keys::AUDIT_TAIL[0] => ("audit log's recorded end", true),
        keys::SCHEMA => ("schema packages", false),
        keys::BODY_LIVE => ("message segments' live counts", false),
        _ => ("store metadata", false),
    }
}

const PENDING_INLINE: &str = "pending entries holding their message";
const PENDING_PLAIN: &str = "pending entries";
const PENDING_REF: &str = "pending entries referring to a message segment";
const PENDING_PACKED: &str = "blocks of packed pending entries";
/// The message segments' row: `keys` counts the bodies pending entries
/// refer to, `bytes` their length.
const BODY_SEGMENTS: &str = "message bodies in segment files";
/// The audit segments' row: `keys` counts records, `bytes` their frames.
const AUDIT_SEGMENTS: &str = "audit records in segment files";

/// How many keys go by between calls of `usage`'s progress callback.
pub const PROGRESS_EVERY: u64 = 100_000;

/// Reads every key of `db` (blocking; a full scan), calling `progress` with
/// the keys read so far every [`PROGRESS_EVERY`] keys. `dir` is the data
/// directory, for its size on disk.
pub fn usage(
    db: &sled::Db,
    dir: &Path,
    mut progress: impl FnMut(u64),
) -> Result<Usage, StorageError> {
    let mut kinds: Vec<KindUsage> = Vec::new();
    let mut usage = Usage::default();
    let mut read = 0u64;
    // Bodies in segment files that pending entries refer to, and their bytes.
    let (mut bodies, mut body_bytes) = (0u64, 0u64);
    for item in db.iter() {
        let (key, value) = item?;
        read += 1;
        if read % PROGRESS_EVERY == 0 {
            progress(read);
        }
        let bytes = (key.len() + value.len()) as u64;
        let (kind, audit) = match key.first() {
            Some(&keys::PENDING) => match Pending::body_ref(&value) {
                Some(body) => {
                    bodies += 1;
                    body_bytes += u64::from(body.len);
                    (PENDING_REF, false)
                }
                None if Pending::is_inline(&value) => (PENDING_INLINE, false),
                None => (PENDING_PLAIN, false),
            },
            Some(&keys::PACKED) => {
                for (_, reference) in super::packed::records(&value)? {
                    if let Some((body, _)) = super::bodies::BodyRef::decode(reference) {
                        bodies += 1;
                        body_bytes += u64::from(body.len);
                    }
                }
                (PENDING_PACKED, false)
            }
            Some(&first) => kind_of(first),
            None => ("store metadata", false),
        };
        match kinds.iter_mut().find(|k| k.kind == kind) {
            Some(row) => {
                row.keys += 1;
                row.bytes += bytes;
            }
            None => kinds.push(KindUsage {
                kind,
                keys: 1,
                bytes,
            }),
        }
        if audit {
            usage.audit_bytes += bytes;
        } else {
            usage.queue_bytes += bytes;
        }
        usage.live_bytes += bytes;
    }
    // The message segment files: one row, counting referenced bodies.
    if bodies > 0 {
        kinds.push(KindUsage {
            kind: BODY_SEGMENTS,
            keys: bodies,
            bytes: body_bytes,
        });
        usage.queue_bytes += body_bytes;
        usage.live_bytes += body_bytes;
    }
    // The audit log's segment files: one row, counting records.
    let (records, bytes) =
        crate::audit::segments::usage(dir).map_err(|e| StorageError::Corrupt {
            what: e.to_string(),
        })?;
    if records > 0 {
        kinds.push(KindUsage {
            kind: AUDIT_SEGMENTS,
            keys: records,
            bytes,
        });
        usage.audit_bytes += bytes;
        usage.live_bytes += bytes;
    }
    usage.kinds = kinds;
    usage.sled_bytes_on_disk = db.size_on_disk()?;
    usage.dir_bytes_on_disk = allocated(dir).map_err(|source| StorageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(usage)
}

/// Bytes allocated on disk to every file under `dir` (st_blocks, as `du`).
fn allocated(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += allocated(&entry.path())?;
        } else {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_sums_each_kind_of_key_and_splits_audit_from_queue_state() {
        let tmp = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(tmp.path()).open().unwrap();
        let inline = Pending::default().encode_inline(&[7u8; 100]);
        db.insert(keys::pending(1, 1), inline.clone()).unwrap();
        db.insert(keys::pending(1, 2), inline.clone()).unwrap();
        db.insert(keys::pending(2, 1), &Pending::default().encode()[..])
            .unwrap();
        // A body of 400 bytes in a segment file.
        let body = crate::storage::bodies::BodyRef {
            segment: 0,
            offset: 0,
            len: 400,
            crc: 0,
        };
        let referring = Pending::default().encode_ref(&body, &[1u8; 400]);
        db.insert(keys::pending(2, 2), referring.clone()).unwrap();
        // A block of two packed entries, their bodies 300 and 200 bytes.
        let mut packed = crate::storage::packed::Block::default();
        for (seq, len) in [(3u64, 300u32), (4, 200)] {
            let body = crate::storage::bodies::BodyRef { len, ..body };
            let entry = Pending::default().encode_ref(&body, &[1u8; 10]);
            assert!(packed.insert(seq, &entry));
        }
        let packed = packed.encode();
        db.insert(keys::packed(2, 0), packed.clone()).unwrap();
        db.insert(keys::message(1, 1), &[1u8; 50][..]).unwrap();
        db.insert(keys::audit_block(1), &[2u8; 300][..]).unwrap();
        db.insert(keys::FORMAT, &2u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
        // Two records of 100 bytes in one frame of a segment file.
        let mut segments =
            crate::audit::segments::Appender::open(tmp.path(), None, 1 << 20).unwrap();
        let block = crate::audit::blocks::encode_block(&[[5u8; 100], [6u8; 100]]);
        segments.push(1, &block).unwrap();
        segments.sync().unwrap();

        let mut calls = 0;
        let u = usage(&db, tmp.path(), |_| calls += 1).unwrap();
        assert_eq!(calls, 0, "fewer keys than one progress step");
        let row = |kind: &str| u.kinds.iter().find(|k| k.kind == kind).cloned();
        let inline_bytes = 2 * (13 + inline.len() as u64);
        assert_eq!(
            row(PENDING_INLINE),
            Some(KindUsage {
                kind: PENDING_INLINE,
                keys: 2,
                bytes: inline_bytes
            })
        );
        assert_eq!(row(PENDING_PLAIN).map(|r| (r.keys, r.bytes)), Some((1, 25)));
        let ref_bytes = 13 + referring.len() as u64;
        assert_eq!(
            row(PENDING_REF).map(|r| (r.keys, r.bytes)),
            Some((1, ref_bytes))
        );
        let packed_bytes = 13 + packed.len() as u64;
        assert_eq!(
            row(PENDING_PACKED).map(|r| (r.keys, r.bytes)),
            Some((1, packed_bytes))
        );
        assert_eq!(
            row(BODY_SEGMENTS).map(|r| (r.keys, r.bytes)),
            Some((3, 900))
        );
        assert_eq!(
            row("topic copies of messages").map(|r| r.bytes),
            Some(13 + 50)
        );
        assert_eq!(row("audit blocks").map(|r| r.bytes), Some(9 + 300));
        // Each record with its length; the frame's 16-byte header once.
        assert_eq!(
            row(AUDIT_SEGMENTS).map(|r| (r.keys, r.bytes)),
            Some((2, 2 * 104 + 16))
        );
        assert_eq!(u.audit_bytes, 309 + 224);
        assert_eq!(
            u.queue_bytes,
            inline_bytes + 25 + ref_bytes + packed_bytes + 900 + 63 + 1 + 4
        );
        assert_eq!(u.live_bytes, u.queue_bytes + u.audit_bytes);
        assert!(u.sled_bytes_on_disk > 0);
        assert!(u.dir_bytes_on_disk >= u.sled_bytes_on_disk / 2);
    }

    #[test]
    fn a_long_scan_reports_its_progress() {
        let tmp = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(tmp.path()).open().unwrap();
        let n = 2 * PROGRESS_EVERY + 5;
        let mut batch = sled::Batch::default();
        for seq in 0..n {
            batch.insert(&keys::message(1, seq)[..], &b"x"[..]);
        }
        db.apply_batch(batch).unwrap();
        let mut seen = Vec::new();
        let u = usage(&db, tmp.path(), |read| seen.push(read)).unwrap();
        assert_eq!(seen, [PROGRESS_EVERY, 2 * PROGRESS_EVERY]);
        assert_eq!(u.kinds[0].keys, n);
        assert_eq!(u.queue_bytes, n * 14);
    }
}
