//! The journal: makes a group durable with one write and one `fdatasync`.
//!
//! Making sled itself durable costs a `flush()` (a write and a
//! `sync_file_range` per log buffer) and then an fsync of its file: two
//! device syncs per group. Instead the flusher appends each group's writes
//! to this file and syncs it once, and only then applies them to sled, key
//! by key, without waiting for sled's disk. Now and then (a full journal, or
//! a [`super::Store::checkpoint`]) the flusher checkpoints: it flushes and
//! fsyncs sled, after which every record is covered by sled and the file is
//! written again from its start.
//!
//! # Record
//! `len u32 | crc32 u32 | pass u64 | lsn u64 | ops`, little-endian; `len`
//! counts the pass, lsn and ops, the CRC covers them. An op is `1 klen(u32)
//! key vlen(u32) value` (insert) or `0 klen(u32) key` (remove), one per key
//! the group wrote (its last write). `pass` names one pass over the file
//! (from its start, after an open or a checkpoint): every record of a pass
//! carries it.
//!
//! # Invariants
//! - A group's record is written and synced before any of its writes reaches
//!   sled: sled, which writes what it is given to disk whenever it likes,
//!   can never hold a write the journal lacks.
//! - Each group with writes ends with `J → lsn` in sled, the lsn one more
//!   than the previous group's, written after all its other writes.
//! - sled recovers a prefix of the operations applied to it, so at open it
//!   holds every group up to its `J` and perhaps part of the next; replaying
//!   every record with an lsn above `J`, in order, as blind inserts and
//!   removes, gives back the store as it was answered.
//! - Reading stops at the first record that is torn, fails its CRC, belongs
//!   to another pass than the first record or does not follow its
//!   predecessor's lsn: what is left of an earlier pass is never replayed,
//!   even where a record of the new pass ends exactly where an old one began.
//! - A new pass overwrites the file only once sled holds every record of the
//!   old one durably, and the audit segments every audit block of it (their
//!   end recorded in sled): a checkpoint, or at open ([`recover`] flushes
//!   and fsyncs sled whenever the journal held a record).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::{keys, StorageError};

/// The journal's file name in the data directory.
pub const FILE: &str = "journal";
/// Size the file is given up front (written, so that later writes within it
/// change no file metadata and `fdatasync` only has data to sync), and the
/// fill level at which the flusher checkpoints.
pub(super) const CAPACITY: u64 = 8 << 20;

/// Alignment of direct writes: the page size, a multiple of the logical
/// block size of every disk Linux drives.
const ALIGN: usize = 4096;

/// Length and CRC, then the pass and lsn that start every record's body.
const HEADER: usize = 24;
const BODY_MIN: usize = 16;
const INSERT: u8 = 1;
const REMOVE: u8 = 0;

/// The writes of one group: each key's last write (None: removed).
pub(super) type Changes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

fn put_slice(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The open journal, owned by the flusher.
///
/// Records go to the file with direct I/O where the filesystem allows it
/// (`O_DIRECT`: from our buffer to the disk, skipping the page cache). The
/// device does the same work, but the copy into the page cache and its
/// writeback go: on this project's reference machine, large groups came
/// out 5–11% faster with less CPU, and single-publish groups no slower.
/// A direct write covers whole blocks, so each one starts at the block
/// holding the end of the previous record and writes that record's last
/// bytes again (the same bytes; the page cache rewrites a partly filled
/// page the same way).
pub(super) struct Journal {
    file: File,
    /// The file opened for direct writes (None: the filesystem refused
    /// them; `file` is written through the page cache).
    direct: Option<File>,
    /// The file's bytes from the start of the block holding `offset` up to
    /// `offset`, which the next direct write begins with.
    tail: Vec<u8>,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    buf: Vec<u8>,
    /// This pass over the file.
    pass: u64,
}

impl Journal {
    /// Opens (creating and sizing if needed) the journal in `dir`. Its
    /// records must already have been replayed ([`recover`]): writing starts
    /// at the beginning.
    pub(super) fn open(dir: &Path) -> Result<Journal, StorageError> {
        let path = dir.join(FILE);
        let io = |source| StorageError::Io {
            path: path.clone(),
            source,
        };
        let file = super::open_read_write(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < CAPACITY {
            let zeros = vec![0u8; 64 << 10];
            let mut at = len;
            while at < CAPACITY {
                let n = (CAPACITY - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at).map_err(io)?;
                at += n as u64;
            }
            file.sync_all().map_err(io)?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| StorageError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        let direct = open_direct(&path);
        Ok(Journal {
            file,
            direct,
            tail: Vec::new(),
            path,
            offset: 0,
            buf: Vec::new(),
            pass: new_pass(0),
        })
    }

    /// Writes the records and syncs the file: once this returns, they (and
    /// every record before them) survive a crash.
    pub(super) fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'a Changes)>,
    ) -> Result<(), StorageError> {
        let records: Vec<(u64, &Changes)> = records.into_iter().collect();
        if records.is_empty() {
            return Ok(());
        }
        let estimate: usize = records.iter().map(|(_, c)| encoded_len(c)).sum();
        self.buf.clear();
        // Room for the tail, the records and the padding to a whole block,
        // from an aligned start, so that nothing below reallocates.
        let lead = self.tail.len();
        self.buf
            .reserve((lead + estimate).next_multiple_of(ALIGN) + ALIGN);
        let skip = self.buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        self.buf.resize(skip, 0);
        self.buf.extend_from_slice(&self.tail);
        for (lsn, changes) in records {
            encode(&mut self.buf, self.pass, lsn, changes);
        }
        let end = self.buf.len();
        let size = end - skip - lead;
        debug_assert_eq!(size, estimate);
        self.buf
            .resize(skip + (lead + size).next_multiple_of(ALIGN), 0);
        // Still aligned unless the estimate fell short and the buffer moved
        // (then this write goes through the page cache).
        let aligned = self.buf[skip..].as_ptr().align_offset(ALIGN) == 0;
        let io = |source| StorageError::Io {
            path: self.path.clone(),
            source,
        };
        let mut refused = false;
        let written = match &self.direct {
            Some(direct) if aligned => {
                let block = self.offset - lead as u64;
                match direct.write_all_at(&self.buf[skip..], block) {
                    Ok(()) => Some(direct.sync_data()),
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        warn!(
                            path = %self.path.display(),
                            "direct writes to the journal refused; writing through the page cache"
                        );
                        refused = true;
                        None
                    }
                    Err(e) => Some(Err(e)),
                }
            }
            _ => None,
        };
        if refused {
            self.direct = None;
        }
        match written {
            Some(result) => result.map_err(io)?,
            None => {
                self.file
                    .write_all_at(&self.buf[skip + lead..end], self.offset)
                    .map_err(io)?;
                self.file.sync_data().map_err(io)?;
            }
        }
        self.offset += size as u64;
        let partial = (self.offset % ALIGN as u64) as usize;
        self.tail.clear();
        self.tail.extend_from_slice(&self.buf[end - partial..end]);
        // A burst can leave a large buffer behind: do not keep it.
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// True once the file is full enough to checkpoint.
    pub(super) fn full(&self) -> bool {
        self.offset >= CAPACITY
    }

    /// After a checkpoint (sled flushed and fsynced after every recorded
    /// group was applied): start over from the beginning.
    pub(super) fn reset(&mut self) {
        self.offset = 0;
        self.tail.clear();
        self.pass = new_pass(self.pass);
    }
}

/// A pass id no earlier pass had: the clock's nanoseconds, and always more
/// than the previous one.
fn new_pass(previous: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    now.max(previous.wrapping_add(1))
}

/// The journal file opened for direct writes, where the system allows it.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = rustix::fs::OFlags::DIRECT.bits();
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(flags as i32)
        .open(path)
    {
        Ok(file) => Some(file),
        Err(e) => {
            info!(path = %path.display(), cause = %e, "no direct writes to the journal");
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// What [`encode`] appends for one record.
fn encoded_len(changes: &Changes) -> usize {
    HEADER
        + changes
            .iter()
            .map(|(key, value)| 5 + key.len() + value.as_ref().map_or(0, |v| 4 + v.len()))
            .sum::<usize>()
}

fn encode(out: &mut Vec<u8>, pass: u64, lsn: u64, changes: &Changes) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]); // len and crc, filled in below
    out.extend_from_slice(&pass.to_le_bytes());
    out.extend_from_slice(&lsn.to_le_bytes());
    for (key, value) in changes {
        match value {
            Some(value) => {
                out.push(INSERT);
                put_slice(out, key);
                put_slice(out, value);
            }
            None => {
                out.push(REMOVE);
                put_slice(out, key);
            }
        }
    }
    let body = &out[start + 8..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The intact records at the start of `data`, in order: (lsn, ops).
pub(super) fn records(data: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut prev: Option<(u64, u64)> = None;
    while let Some(header) = data.get(at..at + HEADER) {
        let len = u32_at(header, 0) as usize;
        let crc = u32_at(header, 4);
        if len < BODY_MIN {
            break;
        }
        let Some(body) = data.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        let pass = u64_at(body, 0);
        let lsn = u64_at(body, 8);
        if prev.is_some_and(|(p, l)| p != pass || l.checked_add(1) != Some(lsn)) {
            break;
        }
        prev = Some((pass, lsn));
        out.push((lsn, &body[BODY_MIN..]));
        at += 8 + len;
    }
    out
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// One op of a record: key, and value (None: removed).
type RecordOp<'a> = (&'a [u8], Option<&'a [u8]>);

/// Decodes one record's ops.
fn ops_of(lsn: u64, mut ops: &[u8]) -> Result<Vec<RecordOp<'_>>, StorageError> {
    let corrupt = || StorageError::Corrupt {
        what: format!("journal record {lsn}"),
    };
    fn take<'a>(ops: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(ops.get(..4)?.try_into().ok()?) as usize;
        let bytes = ops.get(4..4 + len)?;
        *ops = &ops[4 + len..];
        Some(bytes)
    }
    let mut out = Vec::new();
    while let Some((&tag, rest)) = ops.split_first() {
        ops = rest;
        let key = take(&mut ops).ok_or_else(corrupt)?;
        match tag {
            INSERT => out.push((key, Some(take(&mut ops).ok_or_else(corrupt)?))),
            REMOVE => out.push((key, None)),
            _ => return Err(corrupt()),
        }
    }
    Ok(out)
}

/// One record's ops as a sled batch (without message bodies, nor audit
/// blocks when they go to segments), then its lsn.
fn batch_of(ops: &[RecordOp<'_>], lsn: u64, blocks_in_sled: bool) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for &(key, value) in ops {
        if (!blocks_in_sled && keys::is_audit_block(key)) || keys::parse_body(key).is_some() {
            continue;
        }
        match value {
            Some(value) => batch.insert(key, value),
            None => batch.remove(key),
        }
    }
    batch.insert(keys::JOURNAL_LSN, &lsn.to_be_bytes());
    batch
}

/// The lsn of the last group applied to `db` (0: none yet).
pub(super) fn applied_lsn(db: &sled::Db) -> Result<u64, StorageError> {
    Ok(super::read_u64(db, keys::JOURNAL_LSN, || {
        "the store's journal position".into()
    })?
    .unwrap_or(0))
}

/// Replays into `db` the journal records sled lost, then makes them durable
/// in sled. Returns how many were replayed. Call right after opening sled,
/// before anything reads it.
///
/// The audit log's segments are brought to the journal's end too
/// ([`crate::audit::segments::recover`]): every audit block of the pass
/// past their recorded end is appended again, whether or not sled had its
/// group, and the new end recorded. A store of format 2 or before still
/// keeps its blocks in sled, until they are moved ([`super::Store::open`]).
pub(super) fn recover(
    db: &sled::Db,
    dir: &Path,
    audit_segment_bytes: u64,
) -> Result<usize, StorageError> {
    let path = dir.join(FILE);
    let data = match std::fs::read(&path) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(StorageError::Io { path, source }),
    };
    // A store without a format yet is new (or one sled lost, which opening
    // then refuses): its segments, if any, are left alone.
    let blocks_in_sled = super::format_of(db)?.is_none_or(|v| v < super::FORMAT_SEGMENTS);
    let applied = applied_lsn(db)?;
    let mut expected = applied.saturating_add(1);
    let mut replayed = 0;
    let found = records(&data);
    let mut decoded = Vec::with_capacity(found.len());
    for &(lsn, ops) in &found {
        decoded.push((lsn, ops_of(lsn, ops)?));
    }
    for (lsn, ops) in &decoded {
        let lsn = *lsn;
        if lsn <= applied {
            continue;
        }
        if lsn != expected {
            return Err(StorageError::Corrupt {
                what: format!(
                    "the journal continues at group {lsn} but the store ends at group {applied}: \
                     groups in between are in neither"
                ),
            });
        }
        db.apply_batch(batch_of(ops, lsn, blocks_in_sled))?;
        expected = lsn.saturating_add(1);
        replayed += 1;
    }
    let mut tail_moved = false;
    if !blocks_in_sled {
        let blocks = decoded.iter().flat_map(|(_, ops)| {
            ops.iter()
                .filter(|(key, _)| keys::is_audit_block(key))
                .filter_map(|&(key, value)| Some((keys::audit_seq(key)?, value?)))
        });
        let tail = crate::audit::segments::read_tail(db)?;
        if let Some(tail) =
            crate::audit::segments::recover(dir, tail.as_ref(), blocks, audit_segment_bytes)?
        {
            crate::audit::segments::record_tail(db, &tail)?;
            tail_moved = true;
        }
    }
    // Message bodies: every one of the pass, at its place again (sled may
    // hold a reference whose body the file lost), then the segments no
    // live count names are removed.
    let bodies = decoded.iter().flat_map(|(_, ops)| {
        ops.iter().filter_map(|&(key, value)| {
            let (segment, offset) = keys::parse_body(key)?;
            Some((segment, offset, value?))
        })
    });
    super::bodies::recover(dir, db, bodies)?;
    // The writer will write the journal over from its start: sled must hold
    // these records durably first, replayed or not (after a clean stop or a
    // kill, sled's last writes may still be only in the page cache).
    if !found.is_empty() || tail_moved {
        db.flush()?;
        sync_store_files(dir)?;
    }
    if replayed > 0 {
        info!(
            groups = replayed,
            from = applied + 1,
            "replayed journal records the store had not made durable"
        );
    }
    Ok(replayed)
}

/// Makes the journal in `dir` read as empty (zeros over its first record's
/// header, synced). Only once sled holds everything in it durably.
pub(super) fn invalidate(dir: &Path) -> Result<(), StorageError> {
    let path = dir.join(FILE);
    let file = match std::fs::OpenOptions::new().write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(StorageError::Io { path, source }),
    };
    file.write_all_at(&[0u8; HEADER], 0)
        .and_then(|()| file.sync_data())
        .map_err(|source| StorageError::Io { path, source })
}

/// fsyncs sled's data file and any blob files, after a `flush()`.
pub(super) fn sync_store_files(dir: &Path) -> Result<(), StorageError> {
    let sync = |path: PathBuf| {
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|source| StorageError::Io { path, source })
    };
    sync(dir.join("db"))?;
    let blobs = dir.join("blobs");
    if let Ok(entries) = std::fs::read_dir(&blobs) {
        for entry in entries.flatten() {
            sync(entry.path())?;
        }
        sync(blobs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(pairs: &[(&[u8], Option<&[u8]>)]) -> Changes {
        pairs
            .iter()
            .map(|(key, value)| (key.to_vec(), value.map(<[u8]>::to_vec)))
            .collect()
    }

    fn get(db: &sled::Db, key: &[u8]) -> Option<Vec<u8>> {
        db.get(key).unwrap().map(|v| v.to_vec())
    }

    #[test]
    fn records_stop_at_a_torn_tail_and_at_an_earlier_pass() {
        let a = ops(&[(b"k1", Some(b"v1"))]);
        let b = ops(&[(b"k1", None), (b"k2", Some(b"v2"))]);
        let mut data = Vec::new();
        encode(&mut data, 1, 7, &a);
        encode(&mut data, 1, 8, &b);
        let whole = data.len();
        // What an earlier pass left: a valid record, but not lsn 9.
        encode(&mut data, 0, 3, &a);
        // Or lsn 9 exactly where it belongs, but of another pass.
        let mut other_pass = data[..whole].to_vec();
        encode(&mut other_pass, 0, 9, &a);
        let found = records(&data);
        assert_eq!(found.iter().map(|r| r.0).collect::<Vec<_>>(), [7, 8]);
        assert_eq!(records(&other_pass).len(), 2);

        // The second record torn: only the first counts.
        let torn = &data[..whole - 1];
        assert_eq!(records(torn).len(), 1);
        // A flipped byte in the second record: the same.
        let mut flipped = data[..whole].to_vec();
        flipped[whole - 2] ^= 0xFF;
        assert_eq!(records(&flipped).len(), 1);
        // Zeros (a fresh file) hold no record.
        assert!(records(&[0u8; 64]).is_empty());
    }

    #[test]
    fn appends_read_back_whole_across_blocks_and_passes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(tmp.path()).unwrap();
        // Where the filesystem allows direct I/O (ext4, xfs), it is used.
        let direct = journal.direct.is_some();
        // Records of many sizes: some end inside a block, some cross one,
        // one spans several.
        let values: Vec<Vec<u8>> = [1usize, 700, 3000, 4096, 13_000, 5, 4071]
            .iter()
            .enumerate()
            .map(|(i, &n)| vec![i as u8 + 1; n])
            .collect();
        let groups: Vec<Changes> = values
            .iter()
            .map(|v| ops(&[(b"k", Some(v.as_slice())), (b"gone", None)]))
            .collect();
        let mut lsn = 0;
        for pair in groups.chunks(2) {
            let batch: Vec<(u64, &Changes)> = pair
                .iter()
                .map(|c| {
                    lsn += 1;
                    (lsn, c)
                })
                .collect();
            journal.append(batch).unwrap();
        }
        assert_eq!(journal.direct.is_some(), direct, "no fallback on the way");
        let data = std::fs::read(tmp.path().join(FILE)).unwrap();
        let found = records(&data);
        assert_eq!(found.len(), groups.len());
        for (i, (lsn, ops)) in found.iter().enumerate() {
            assert_eq!(*lsn, i as u64 + 1);
            let decoded = ops_of(*lsn, ops).unwrap();
            assert_eq!(decoded[1], (&b"k"[..], Some(values[i].as_slice())));
        }
        assert_eq!(
            journal.offset,
            groups.iter().map(encoded_len).sum::<usize>() as u64
        );

        // A new pass over the file: only its own records are read back,
        // though the first pass's lie beyond them.
        journal.reset();
        journal.append([(1, &groups[3])]).unwrap();
        journal.append([(2, &groups[0])]).unwrap();
        let data = std::fs::read(tmp.path().join(FILE)).unwrap();
        let found = records(&data);
        assert_eq!(found.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn recovery_replays_exactly_what_sled_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(tmp.path()).open().unwrap();
        // sled holds groups up to 5.
        db.insert(b"k1", b"from 5").unwrap();
        db.insert(keys::JOURNAL_LSN, &5u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
        let mut journal = Journal::open(tmp.path()).unwrap();
        let g4 = ops(&[(b"k1", Some(b"from 4")), (b"old", Some(b"x"))]);
        let g5 = ops(&[(b"k1", Some(b"from 5"))]);
        let g6 = ops(&[(b"k1", None), (b"k2", Some(b"from 6"))]);
        let g7 = ops(&[(b"k2", Some(b"from 7")), (b"k3", Some(b"from 7"))]);
        journal
            .append([(4, &g4), (5, &g5), (6, &g6), (7, &g7)])
            .unwrap();

        assert_eq!(recover(&db, tmp.path(), 1 << 20).unwrap(), 2);
        assert_eq!(get(&db, b"k1"), None);
        assert_eq!(get(&db, b"k2").as_deref(), Some(&b"from 7"[..]));
        assert_eq!(get(&db, b"k3").as_deref(), Some(&b"from 7"[..]));
        // Groups sled already had are not applied again.
        assert_eq!(get(&db, b"old"), None);
        assert_eq!(applied_lsn(&db).unwrap(), 7);
        // A second recovery finds nothing left to do.
        assert_eq!(recover(&db, tmp.path(), 1 << 20).unwrap(), 0);
    }

    #[test]
    fn recovery_completes_a_group_sled_holds_only_in_part() {
        let tmp = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(tmp.path()).open().unwrap();
        // Group 5 is whole in sled; group 6 was being applied key by key
        // when the process died: its first insert reached sled, its second
        // insert, its removal and its J did not.
        db.insert(b"gone", b"from 5").unwrap();
        db.insert(keys::JOURNAL_LSN, &5u64.to_be_bytes()).unwrap();
        db.insert(b"a", b"from 6").unwrap();
        db.flush().unwrap();
        let mut journal = Journal::open(tmp.path()).unwrap();
        let g6 = ops(&[
            (b"a", Some(b"from 6")),
            (b"b", Some(b"from 6")),
            (b"gone", None),
        ]);
        journal.append([(6, &g6)]).unwrap();

        assert_eq!(recover(&db, tmp.path(), 1 << 20).unwrap(), 1);
        assert_eq!(get(&db, b"a").as_deref(), Some(&b"from 6"[..]));
        assert_eq!(get(&db, b"b").as_deref(), Some(&b"from 6"[..]));
        assert_eq!(get(&db, b"gone"), None);
        assert_eq!(applied_lsn(&db).unwrap(), 6);
    }

    #[test]
    fn a_gap_between_the_store_and_the_journal_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(tmp.path()).open().unwrap();
        db.insert(keys::JOURNAL_LSN, &5u64.to_be_bytes()).unwrap();
        let mut journal = Journal::open(tmp.path()).unwrap();
        let g = ops(&[(b"k", Some(b"v"))]);
        journal.append([(7, &g), (8, &g)]).unwrap();
        let err = recover(&db, tmp.path(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("group 7"), "{err}");
        assert_eq!(get(&db, b"k"), None);
    }

    #[test]
    fn a_reset_journal_overwrites_from_the_start() {
        let tmp = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(tmp.path()).open().unwrap();
        let mut journal = Journal::open(tmp.path()).unwrap();
        let big = ops(&[(b"k", Some(&[1u8; 300][..]))]);
        journal.append([(1, &big), (2, &big), (3, &big)]).unwrap();
        // Checkpoint: sled has everything.
        db.insert(b"k", &[1u8; 300][..]).unwrap();
        db.insert(keys::JOURNAL_LSN, &3u64.to_be_bytes()).unwrap();
        journal.reset();
        let small = ops(&[(b"k", Some(b"4"))]);
        journal.append([(4, &small)]).unwrap();
        assert_eq!(recover(&db, tmp.path(), 1 << 20).unwrap(), 1);
        assert_eq!(get(&db, b"k").as_deref(), Some(&b"4"[..]));
    }
}
