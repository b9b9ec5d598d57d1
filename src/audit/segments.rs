//! Where audit records live: append-only **segment files** in `audit/`
//! under the data directory, one block of records ([`super::blocks`]) per
//! frame, outside sled.
//!
//! sled rewrote a tree node for every block it was given and did not reuse
//! the space of drained messages for them: the audit log made most of the
//! data directory's growth. A log that is only ever appended to and pruned
//! from the front needs none of that.
//!
//! # Files and frames
//! A segment is named by the sequence number of its first record, as 20
//! digits, `.seg`: `00000000000000000001.seg`. It holds frames, each one
//! block: `len u32 | crc32 u32 | first_seq u64 | block`, little-endian as
//! in the journal; `len` counts `first_seq` and the block, the CRC covers
//! them. A new segment is begun, at a block boundary, once the current one
//! reaches the configured size.
//!
//! # Durability
//! - A group's blocks go in its journal record with the rest of its writes,
//!   as keys `b first_seq`; the flusher appends them to the segment only
//!   once that record is synced, never to sled. The journal is what makes
//!   them durable.
//! - At each checkpoint the flusher fsyncs the segments (and the folder,
//!   when it made a file), then records their durable end, the [`Tail`], in
//!   sled under `T`, before sled's own flush: the journal starts over only
//!   once the tail covers every block in it.
//! - At open, [`recover`] cuts the segments back to the recorded tail,
//!   removes later segments and appends again every block of the journal's
//!   pass past the tail. Nothing written after the last checkpoint is
//!   trusted from the files: a crash can leave a torn frame, or pages of a
//!   later frame without an earlier one.
//! - Pruning removes whole segments, oldest first, only once the anchor that
//!   stands for them is journaled. A segment an interrupted prune left
//!   behind lies wholly before the anchor; readers step over it and the
//!   next prune removes it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use tracing::error;

use super::{blocks, AuditError, AuditRecord, HASH_LEN};
use crate::storage::{io_error, keys, sync_dir, StorageError};

/// The folder of segments in the data directory.
pub const DIR: &str = "audit";
/// Size at which a segment is closed and the next begun.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const EXT: &str = "seg";
/// Length, CRC, then the first sequence number.
const HEADER: usize = 16;

/// The segments' durable end, recorded in sled under `T` at each checkpoint
/// (prost encoding).
#[derive(Clone, PartialEq, Message)]
pub struct Tail {
    /// First sequence number (the name) of the last segment.
    #[prost(uint64, tag = "1")]
    pub segment: u64,
    /// Its length: every frame before this offset is durable.
    #[prost(uint64, tag = "2")]
    pub len: u64,
    /// The sequence number the next record takes.
    #[prost(uint64, tag = "3")]
    pub next_seq: u64,
    /// Hash of the last record.
    #[prost(bytes = "vec", tag = "4")]
    pub last_hash: Vec<u8>,
}

/// The tail recorded in `db`, if any.
pub fn read_tail(db: &sled::Db) -> Result<Option<Tail>, StorageError> {
    match db.get(keys::AUDIT_TAIL)? {
        None => Ok(None),
        Some(v) => Tail::decode(&v[..])
            .map(Some)
            .map_err(|_| StorageError::Corrupt {
                what: "the audit log's recorded end".into(),
            }),
    }
}

/// Records `tail` in `db` as the segments' durable end (under `T`).
pub fn record_tail(db: &sled::Db, tail: &Tail) -> Result<(), sled::Error> {
    db.insert(keys::AUDIT_TAIL, tail.encode_to_vec())
        .map(|_| ())
}

/// The folder of segments of the data directory `data_dir`.
pub fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join(DIR)
}

fn file_name(first: u64) -> String {
    format!("{first:020}.{EXT}")
}

/// The segments in `dir`, oldest first: (first sequence number, path).
/// Other files are ignored; a missing folder holds none.
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name();
        let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_suffix(&format!(".{EXT}")))
            .filter(|stem| stem.len() == 20)
            .and_then(|stem| stem.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((first, entry.path()));
    }
    out.sort_unstable_by_key(|(first, _)| *first);
    Ok(out)
}

/// Appends one frame holding `block` (records from `first_seq`) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, first_seq: u64, block: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&first_seq.to_le_bytes());
    out.extend_from_slice(block);
    let body = &out[start + 8..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One frame read back: its first sequence number, where its block lies in
/// the data, and where the next frame begins.
struct Frame {
    first_seq: u64,
    block: std::ops::Range<usize>,
    end: usize,
}

/// The frame at `at` in `data`: None at the end, Err if it is torn or fails
/// its CRC.
fn frame_at(data: &[u8], at: usize) -> Result<Option<Frame>, &'static str> {
    if at == data.len() {
        return Ok(None);
    }
    let Some(header) = data.get(at..at + HEADER) else {
        return Err("cut short");
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len < 8 {
        return Err("unreadable");
    }
    let end = at + 8 + len;
    let Some(body) = data.get(at + 8..end) else {
        return Err("cut short");
    };
    if crc32fast::hash(body) != crc {
        return Err("altered: its frame fails its checksum");
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&body[..8]);
    Ok(Some(Frame {
        first_seq: u64::from_le_bytes(first),
        block: at + HEADER..end,
        end,
    }))
}

/// Record count and last record's hash of a well-formed, non-empty block
/// (no allocation: this runs for every block the flusher appends).
fn block_summary(block: &[u8]) -> Option<(u64, [u8; HASH_LEN])> {
    let mut count = 0u64;
    let mut last = None;
    for range in blocks::ranges(block) {
        last = Some(range?);
        count += 1;
    }
    Some((count, super::split(&block[last?])?.1))
}

/// The segments of `data_dir` ([`list`]), for the readers.
fn list_of(data_dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let dir = dir_of(data_dir);
    list(&dir).map_err(|source| AuditError::Io { path: dir, source })
}

/// The segment being written.
struct Current {
    first: u64,
    path: PathBuf,
    file: File,
    /// Bytes written to the file.
    written: u64,
}

/// Appends blocks to the segments: owned by the storage flusher (and by
/// [`recover`] at open).
pub struct Appender {
    data_dir: PathBuf,
    dir: PathBuf,
    segment_bytes: u64,
    current: Option<Current>,
    /// Frames not yet written to the current segment.
    buf: Vec<u8>,
    /// Closed since the last sync, not yet fsynced.
    unsynced: Vec<(PathBuf, File)>,
    /// A file was created in (or removed from) the folder since the last sync.
    dir_dirty: bool,
    /// The folder itself was created since the last sync.
    parent_dirty: bool,
    /// Written since the last sync.
    dirty: bool,
    /// None: no record yet, and none known (a new log).
    next_seq: Option<u64>,
    last_hash: [u8; HASH_LEN],
    /// The segment of the end recorded in sled: never removed by pruning,
    /// since recovery cuts back to it.
    recorded_segment: Option<u64>,
}

impl Appender {
    /// Opens the segments of `data_dir` for appending after `tail`: the
    /// files must already end there ([`recover`]).
    pub fn open(
        data_dir: &Path,
        tail: Option<&Tail>,
        segment_bytes: u64,
    ) -> Result<Appender, StorageError> {
        let dir = dir_of(data_dir);
        let mut appender = Appender {
            data_dir: data_dir.to_path_buf(),
            dir: dir.clone(),
            segment_bytes: segment_bytes.max(1),
            current: None,
            buf: Vec::new(),
            unsynced: Vec::new(),
            dir_dirty: false,
            parent_dirty: false,
            dirty: false,
            next_seq: None,
            last_hash: [0; HASH_LEN],
            recorded_segment: None,
        };
        if let Some(tail) = tail {
            appender.recorded_segment = Some(tail.segment);
            appender.next_seq = Some(tail.next_seq);
            appender.last_hash =
                tail.last_hash
                    .as_slice()
                    .try_into()
                    .map_err(|_| StorageError::Corrupt {
                        what: "the audit log's recorded end".into(),
                    })?;
            // Appending goes on in the recorded segment only where it ends
            // exactly at the recorded end (always, after a crash and
            // [`recover`]); a file someone cut or removed is left as it is
            // and the next block begins a new segment.
            let path = dir.join(file_name(tail.segment));
            let file = match std::fs::OpenOptions::new().write(true).open(&path) {
                Ok(file) => Some(file),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => return Err(StorageError::Io { path, source }),
            };
            if let Some(file) = file {
                let len = file.metadata().map_err(io_error(&path))?.len();
                if len == tail.len {
                    appender.current = Some(Current {
                        first: tail.segment,
                        path,
                        file,
                        written: tail.len,
                    });
                }
            }
        }
        Ok(appender)
    }

    /// The sequence number the next record takes, when known.
    pub fn next_seq(&self) -> Option<u64> {
        self.next_seq
    }

    /// Appends a block of records from `first_seq`, which must follow the
    /// last record. Buffered: [`Appender::write`] writes it out.
    pub fn push(&mut self, first_seq: u64, block: &[u8]) -> Result<(), StorageError> {
        if let Some(next) = self.next_seq.filter(|next| *next != first_seq) {
            return Err(StorageError::Corrupt {
                what: format!(
                    "audit block of record {first_seq} does not follow the log, which ends before record {next}"
                ),
            });
        }
        let (count, hash) = block_summary(block).ok_or_else(|| StorageError::Corrupt {
            what: format!("audit block of record {first_seq} is unreadable"),
        })?;
        let next = first_seq
            .checked_add(count)
            .ok_or_else(|| StorageError::Corrupt {
                what: format!(
                    "audit block of record {first_seq} runs past the last sequence number"
                ),
            })?;
        self.frame(first_seq, block)?;
        self.next_seq = Some(next);
        self.last_hash = hash;
        Ok(())
    }

    /// Appends a block of an earlier version's log as it is, readable or
    /// not (moving a damaged log, for `joinery audit verify` to name what is
    /// wrong): the position is known again after the next readable block.
    pub(crate) fn push_as_is(&mut self, first_seq: u64, block: &[u8]) -> Result<(), StorageError> {
        self.frame(first_seq, block)?;
        match block_summary(block).and_then(|(n, h)| Some((first_seq.checked_add(n)?, h))) {
            Some((next, hash)) => {
                self.next_seq = Some(next);
                self.last_hash = hash;
            }
            None => self.next_seq = None,
        }
        Ok(())
    }

    /// Frames `block` into the buffer, beginning a new segment first when
    /// the current one is full.
    fn frame(&mut self, first_seq: u64, block: &[u8]) -> Result<(), StorageError> {
        let full = self
            .current
            .as_ref()
            .is_some_and(|c| c.written + self.buf.len() as u64 >= self.segment_bytes);
        if self.current.is_none() || full {
            self.begin(first_seq)?;
        }
        encode_frame(&mut self.buf, first_seq, block);
        self.dirty = true;
        Ok(())
    }

    /// Closes the current segment (writing out what is buffered) and
    /// begins a new one whose first record is `first`.
    fn begin(&mut self, first: u64) -> Result<(), StorageError> {
        self.write()?;
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
            self.parent_dirty = true;
        }
        let path = self.dir.join(file_name(first));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error(&path))?;
        if let Some(old) = self.current.replace(Current {
            first,
            path,
            file,
            written: 0,
        }) {
            self.unsynced.push((old.path, old.file));
        }
        self.dir_dirty = true;
        Ok(())
    }

    /// Writes the buffered frames to the current segment (not synced).
    pub fn write(&mut self) -> Result<(), StorageError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(current) = self.current.as_mut() else {
            return Ok(());
        };
        current
            .file
            .write_all_at(&self.buf, current.written)
            .map_err(io_error(&current.path))?;
        current.written += self.buf.len() as u64;
        self.buf.clear();
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Writes and fsyncs everything appended (and the folder, when a file
    /// was made in it). Returns the durable end to record, or None when
    /// nothing changed since the last sync.
    pub fn sync(&mut self) -> Result<Option<Tail>, StorageError> {
        if !self.dirty && !self.dir_dirty {
            return Ok(None);
        }
        self.write()?;
        for (path, file) in self.unsynced.drain(..) {
            file.sync_all().map_err(io_error(&path))?;
        }
        if let Some(current) = &self.current {
            current.file.sync_data().map_err(io_error(&current.path))?;
        }
        if self.dir_dirty {
            sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        if self.parent_dirty {
            sync_dir(&self.data_dir)?;
            self.parent_dirty = false;
        }
        self.dirty = false;
        let tail = self.tail();
        if let Some(t) = &tail {
            self.recorded_segment = Some(t.segment);
        }
        Ok(tail)
    }

    /// Where the segments end, once everything is written.
    fn tail(&self) -> Option<Tail> {
        let current = self.current.as_ref()?;
        Some(Tail {
            segment: current.first,
            len: current.written + self.buf.len() as u64,
            next_seq: self.next_seq?,
            last_hash: self.last_hash.to_vec(),
        })
    }

    /// Removes the segments wholly before record `first_kept`, which must
    /// begin a segment (a pruning anchor's first record); never the
    /// current one, nor the one the end recorded in sled names (until the
    /// next checkpoint records a later one). Returns how many went.
    pub fn remove_before(&mut self, first_kept: u64) -> Result<usize, StorageError> {
        let keep_from = [
            Some(first_kept),
            self.current.as_ref().map(|c| c.first),
            self.recorded_segment,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(first_kept);
        let mut removed = 0;
        for (first, path) in list(&self.dir).map_err(io_error(&self.dir))? {
            if first >= keep_from {
                break;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StorageError::Io { path, source }),
            }
        }
        Ok(removed)
    }
}

/// Brings the segments of `data_dir` to exactly the chain the journal
/// answered for: cuts them back to `tail` (the end recorded at the last
/// checkpoint; None: nothing recorded, every segment goes), then appends
/// the journal's `blocks` past it, in order, and syncs. Returns the new
/// end to record in sled, or None when it did not change.
///
/// A recorded segment that is shorter than recorded, or gone, is not what
/// a crash leaves: someone cut it, or the disk lost synced data. That is
/// logged as an error and left for `joinery audit verify` to name; the
/// chain goes on from its recorded head in a new segment, and the broker
/// does not stop for it.
pub(crate) fn recover<'a>(
    data_dir: &Path,
    tail: Option<&Tail>,
    blocks: impl IntoIterator<Item = (u64, &'a [u8])>,
    segment_bytes: u64,
) -> Result<Option<Tail>, StorageError> {
    let dir = dir_of(data_dir);
    let mut cut = false;
    let mut found_tail = false;
    for (first, path) in list(&dir).map_err(io_error(&dir))? {
        match tail {
            Some(t) if first < t.segment => {}
            Some(t) if first == t.segment => {
                found_tail = true;
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_error(&path))?;
                let len = file.metadata().map_err(io_error(&path))?.len();
                if len < t.len {
                    error!(
                        segment = %path.display(),
                        bytes = len,
                        recorded = t.len,
                        "an audit segment is shorter than recorded as durable: \
                         the audit log has been altered; run `joinery audit verify`"
                    );
                } else if len > t.len {
                    file.set_len(t.len).map_err(io_error(&path))?;
                    file.sync_all().map_err(io_error(&path))?;
                    cut = true;
                }
            }
            _ => {
                std::fs::remove_file(&path).map_err(io_error(&path))?;
                cut = true;
            }
        }
    }
    if let Some(t) = tail.filter(|_| !found_tail) {
        error!(
            segment = file_name(t.segment),
            "the last audit segment is missing: the audit log has been altered; \
             run `joinery audit verify`"
        );
    }
    if cut {
        sync_dir(&dir)?;
    }
    let mut appender = Appender::open(data_dir, tail, segment_bytes)?;
    for (first, block) in blocks {
        if appender.next_seq().is_some_and(|next| first < next) {
            continue;
        }
        appender.push(first, block)?;
    }
    appender.sync()
}

/// One stored record, as read from a segment.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its sequence number by where it is stored: its block's first
    /// sequence number plus its position in the block.
    pub seq: u64,
    block: Arc<[u8]>,
    range: std::ops::Range<usize>,
    /// The last record of its block.
    pub last_in_block: bool,
}

impl Stored {
    /// Its stored bytes: encoding then hash.
    pub fn bytes(&self) -> &[u8] {
        &self.block[self.range.clone()]
    }

    /// Its encoding and stored hash, or None if shorter than a hash.
    pub fn split(&self) -> Option<(&[u8], [u8; HASH_LEN])> {
        super::split(self.bytes())
    }

    /// Bytes it takes in its segment: its share of the block, plus the
    /// frame's header once per block.
    pub fn stored_len(&self) -> u64 {
        let header = if self.last_in_block { HEADER } else { 0 };
        (self.range.len() + 4 + header) as u64
    }
}

/// Every stored record in sequence order, segment by segment, from the
/// first record at or after `from_seq` (segments wholly before it, left by
/// an interrupted prune, are not read). An error names where reading
/// failed; the next item comes from the next frame or segment that reads.
pub struct Records {
    segments: std::vec::IntoIter<(u64, PathBuf)>,
    /// The segment being read, and where its next frame begins.
    data: Vec<u8>,
    path: PathBuf,
    at: usize,
    pending: std::vec::IntoIter<Stored>,
    /// The sequence number the next frame should begin with (for errors).
    expect: u64,
    from_seq: u64,
}

impl Records {
    pub fn new(data_dir: &Path, from_seq: u64) -> Result<Records, AuditError> {
        let mut segments = list_of(data_dir)?;
        // A segment is wholly before `from_seq` when the next one begins at
        // or before it.
        let skip = segments
            .windows(2)
            .take_while(|w| w[1].0 <= from_seq)
            .count();
        segments.drain(..skip);
        Ok(Records {
            segments: segments.into_iter(),
            data: Vec::new(),
            path: PathBuf::new(),
            at: 0,
            pending: Vec::new().into_iter(),
            expect: 0,
            from_seq,
        })
    }

    fn next_inner(&mut self) -> Option<Result<Stored, AuditError>> {
        loop {
            if let Some(stored) = self.pending.next() {
                if stored.seq < self.from_seq {
                    continue;
                }
                return Some(Ok(stored));
            }
            match frame_at(&self.data, self.at) {
                Ok(Some(frame)) => {
                    self.at = frame.end;
                    match records_of(&self.data[frame.block], frame.first_seq) {
                        Ok(records) => {
                            self.expect = frame.first_seq.saturating_add(records.len() as u64);
                            self.pending = records.into_iter();
                        }
                        Err(e) => return Some(Err(e)),
                    }
                }
                Ok(None) => {
                    let (first, path) = self.segments.next()?;
                    self.data = match std::fs::read(&path) {
                        Ok(data) => data,
                        Err(source) => return Some(Err(AuditError::Io { path, source })),
                    };
                    self.path = path;
                    self.at = 0;
                    self.expect = first;
                    if self.data.is_empty() {
                        return Some(Err(AuditError::Broken {
                            seq: first,
                            problem: format!("its segment {} is empty", self.path.display()),
                        }));
                    }
                }
                Err(problem) => {
                    // The rest of this segment cannot be framed; the next
                    // segment is read on.
                    let at = self.at;
                    self.at = self.data.len();
                    return Some(Err(AuditError::Broken {
                        seq: self.expect,
                        problem: format!(
                            "a block of segment {} at byte {at} is {problem}",
                            self.path.display(),
                        ),
                    }));
                }
            }
        }
    }
}

/// The records of a block whose first is `first`, in order; never empty.
fn records_of(block: &[u8], first: u64) -> Result<Vec<Stored>, AuditError> {
    let Some(ranges) = blocks::block_ranges(block).filter(|r| !r.is_empty()) else {
        return Err(AuditError::Broken {
            seq: first,
            problem: "its block is cut short or empty".into(),
        });
    };
    let shared: Arc<[u8]> = Arc::from(block);
    let last = ranges.len() - 1;
    Ok(ranges
        .into_iter()
        .enumerate()
        .map(|(i, range)| Stored {
            seq: first.saturating_add(i as u64),
            block: shared.clone(),
            range,
            last_in_block: i == last,
        })
        .collect())
}

impl Iterator for Records {
    type Item = Result<Stored, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_inner()
    }
}

/// The first record of the segment at `path`, if it reads.
fn first_record(path: &Path) -> Option<AuditRecord> {
    let file = File::open(path).ok()?;
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, 0).ok()?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    // The length is read from disk: never allocate past the file's end.
    let file_len = file.metadata().ok()?.len();
    if (8 + len) as u64 > file_len {
        return None;
    }
    let mut data = vec![0u8; 8 + len];
    file.read_exact_at(&mut data, 0).ok()?;
    let frame = frame_at(&data, 0).ok()??;
    let block = &data[frame.block];
    let first = blocks::ranges(block).next()??;
    let (body, _) = super::split(&block[first])?;
    AuditRecord::decode(body).ok()
}

/// What pruning by `cutoff_ms` may remove: the anchor for the first record
/// it keeps, or None. Whole segments only, oldest first, at most
/// `max_segments` past `anchored_at` (the current anchor's first record;
/// segments wholly before it, left by an interrupted prune, do not count
/// and go with the next removal): a segment can go once the first record of
/// the next one is older than the cutoff (its own records are older still),
/// and the last segment never goes.
pub fn prune_plan(
    data_dir: &Path,
    anchored_at: u64,
    cutoff_ms: u64,
    max_segments: usize,
) -> Result<Option<super::AuditAnchor>, AuditError> {
    let segments = list_of(data_dir)?;
    let mut anchor = None;
    let newest = segments.last().map(|(first, _)| *first);
    let candidates = segments
        .iter()
        .skip(1)
        .filter(|(first, _)| *first > anchored_at)
        .take(max_segments);
    for (first, path) in candidates {
        match first_record(path) {
            Some(record) if record.seq == *first => {
                if record.time_ms >= cutoff_ms {
                    break;
                }
                anchor = Some(super::AuditAnchor {
                    first_seq: record.seq,
                    prev_hash: record.prev_hash,
                    pruned_at_ms: crate::storage::now_ms(),
                });
            }
            // The newest segment may be one the flusher has just begun,
            // its first frame not yet written: not yet.
            _ if Some(*first) == newest => break,
            _ => {
                // Pruning stops here until the segment is repaired: nothing
                // after an unreadable record can be anchored.
                tracing::warn!(
                    segment = %path.display(),
                    "audit pruning stopped: this segment's first record is unreadable \
                     or not the one its name says; run `joinery audit verify`"
                );
                break;
            }
        }
    }
    Ok(anchor)
}

/// The block holding record `seq`, for tools and tests that inspect or
/// repair the log by hand: its segment's path, the block's first sequence
/// number and its records (stored bytes), and the position of the record
/// asked for.
pub type FoundBlock = (PathBuf, u64, Vec<Vec<u8>>, usize);

pub fn block_of(data_dir: &Path, seq: u64) -> Result<Option<FoundBlock>, AuditError> {
    let segments = list_of(data_dir)?;
    let Some((_, path)) = segments.iter().rev().find(|(first, _)| *first <= seq) else {
        return Ok(None);
    };
    let data = std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.clone(),
        source,
    })?;
    let mut at = 0;
    while let Ok(Some(frame)) = frame_at(&data, at) {
        at = frame.end;
        let records = records_of(&data[frame.block], frame.first_seq)?;
        if let Some(i) = records.iter().position(|r| r.seq == seq) {
            let bytes = records.iter().map(|r| r.bytes().to_vec()).collect();
            return Ok(Some((path.clone(), frame.first_seq, bytes, i)));
        }
    }
    Ok(None)
}

/// Rewrites the segment at `path` with the block of `first_seq` replaced by
/// `records` (dropped when empty), frames and all: what someone with write
/// access to the data directory could do. For tests of verification only:
/// not atomic.
#[doc(hidden)]
pub fn replace_block(path: &Path, first_seq: u64, records: &[Vec<u8>]) -> std::io::Result<()> {
    let data = std::fs::read(path)?;
    let mut out = Vec::with_capacity(data.len());
    let mut at = 0;
    while let Ok(Some(frame)) = frame_at(&data, at) {
        if frame.first_seq == first_seq {
            if !records.is_empty() {
                encode_frame(&mut out, first_seq, &blocks::encode_block(records));
            }
        } else {
            out.extend_from_slice(&data[at..frame.end]);
        }
        at = frame.end;
    }
    std::fs::write(path, out)
}

/// Records and bytes of the segments of `data_dir` that read (a damaged
/// frame is `joinery audit verify`'s to report): (records, bytes).
pub fn usage(data_dir: &Path) -> Result<(u64, u64), AuditError> {
    let mut records = 0;
    let mut bytes = 0;
    for stored in Records::new(data_dir, 0)?.flatten() {
        records += 1;
        bytes += stored.stored_len();
    }
    Ok((records, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of `n` made-up records from `first` (each ends in a hash).
    fn block(first: u64, n: u64) -> Vec<u8> {
        let records: Vec<Vec<u8>> = (first..first + n)
            .map(|seq| {
                let mut r = AuditRecord {
                    seq,
                    ..Default::default()
                }
                .encode_to_vec();
                r.extend_from_slice(&[seq as u8; HASH_LEN]);
                r
            })
            .collect();
        blocks::encode_block(&records)
    }

    fn seqs(data_dir: &Path, from: u64) -> Vec<u64> {
        Records::new(data_dir, from)
            .unwrap()
            .map(|r| r.unwrap().seq)
            .collect()
    }

    #[test]
    fn blocks_roll_into_new_segments_and_read_back_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = Appender::open(tmp.path(), None, 200).unwrap();
        let mut seq = 1;
        for n in [3, 2, 4, 1, 5] {
            a.push(seq, &block(seq, n)).unwrap();
            seq += n;
        }
        let tail = a.sync().unwrap().unwrap();
        assert_eq!(tail.next_seq, 16);
        assert_eq!(tail.last_hash, vec![15u8; HASH_LEN]);
        let names: Vec<u64> = list(&dir_of(tmp.path()))
            .unwrap()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert!(names.len() > 1, "{names:?}");
        assert_eq!(names[0], 1);
        assert_eq!(tail.segment, *names.last().unwrap());
        assert_eq!(seqs(tmp.path(), 0), (1..16).collect::<Vec<_>>());
        // A block that does not follow is refused.
        assert!(a.push(20, &block(20, 1)).is_err());
        // Nothing new: no tail to record.
        assert_eq!(a.sync().unwrap(), None);
    }

    #[test]
    fn recovery_cuts_back_to_the_tail_and_appends_the_journals_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = Appender::open(tmp.path(), None, 1 << 20).unwrap();
        a.push(1, &block(1, 3)).unwrap();
        let tail = a.sync().unwrap().unwrap();
        // Written after the checkpoint, then a crash: a block, and garbage.
        a.push(4, &block(4, 2)).unwrap();
        a.write().unwrap();
        let seg = dir_of(tmp.path()).join(file_name(1));
        let mut data = std::fs::read(&seg).unwrap();
        data.extend_from_slice(&[0xAB; 10]);
        std::fs::write(&seg, &data).unwrap();
        // And a later segment that never got into the chain.
        std::fs::write(dir_of(tmp.path()).join(file_name(9)), b"junk").unwrap();
        drop(a);

        // The journal's pass: the block before the tail, then two after it.
        let (b1, b4, b6) = (block(1, 3), block(4, 2), block(6, 1));
        let journal = [(1, &b1[..]), (4, &b4[..]), (6, &b6[..])];
        let new = recover(tmp.path(), Some(&tail), journal, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!((new.segment, new.next_seq), (1, 7));
        assert_eq!(seqs(tmp.path(), 0), (1..7).collect::<Vec<_>>());
        assert_eq!(list(&dir_of(tmp.path())).unwrap().len(), 1);
        // Again: nothing changes.
        let again = recover(tmp.path(), Some(&new), journal, 1 << 20).unwrap();
        assert_eq!(again, None);
        assert_eq!(seqs(tmp.path(), 0), (1..7).collect::<Vec<_>>());

        // A gap between the files and the journal is refused.
        let b9 = block(9, 1);
        let err = recover(tmp.path(), Some(&new), [(9, &b9[..])], 1 << 20).unwrap_err();
        assert!(err.to_string().contains("record 9"), "{err}");
        // A file cut shorter than recorded (not what a crash does): the
        // log goes on from the recorded head in a new segment, for
        // verification to find the cut; reading goes on past it.
        let seg = dir_of(tmp.path()).join(file_name(1));
        let data = std::fs::read(&seg).unwrap();
        std::fs::write(&seg, &data[..data.len() - 5]).unwrap();
        let b7 = block(7, 1);
        let cut = recover(tmp.path(), Some(&new), [(7, &b7[..])], 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!((cut.segment, cut.next_seq), (7, 8));
        let read: Vec<_> = Records::new(tmp.path(), 0).unwrap().collect();
        assert!(read.iter().any(|r| r.is_err()), "the cut frame is reported");
        let last = read.last().unwrap().as_ref().unwrap();
        assert_eq!(last.seq, 7, "records after the cut still read");
        // A missing last segment: the same, in a new segment.
        let mut gone = cut.clone();
        gone.segment = 3;
        let b8 = block(8, 1);
        let again = recover(tmp.path(), Some(&gone), [(8, &b8[..])], 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!((again.segment, again.next_seq), (8, 9));
    }

    #[test]
    fn pruning_takes_whole_segments_and_readers_step_over_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = Appender::open(tmp.path(), None, 1).unwrap();
        for (seq, t) in (1..).zip(0..4u64) {
            // One record per block; every block its own segment (size 1).
            let mut r = AuditRecord {
                seq,
                time_ms: 1_000 * (t + 1),
                prev_hash: vec![t as u8; HASH_LEN],
                ..Default::default()
            }
            .encode_to_vec();
            r.extend_from_slice(&[seq as u8; HASH_LEN]);
            a.push(seq, &blocks::encode_block(&[r])).unwrap();
        }
        a.sync().unwrap();
        assert_eq!(list(&dir_of(tmp.path())).unwrap().len(), 4);
        // Records at 1000, 2000, 3000, 4000: cutoff 3500 keeps from record 3.
        let anchor = prune_plan(tmp.path(), 0, 3_500, 16).unwrap().unwrap();
        assert_eq!(anchor.first_seq, 3);
        assert_eq!(anchor.prev_hash, vec![2u8; HASH_LEN]);
        assert_eq!(prune_plan(tmp.path(), 0, 1_500, 16).unwrap(), None);
        // The last segment never goes.
        let all = prune_plan(tmp.path(), 0, 99_999, 16).unwrap().unwrap();
        assert_eq!(all.first_seq, 4);
        // Segments before the current anchor (left by an interrupted prune)
        // do not count against the limit, and the anchor never goes back.
        let next = prune_plan(tmp.path(), 2, 99_999, 1).unwrap().unwrap();
        assert_eq!(next.first_seq, 3);
        // Before the removal, readers from the anchor skip what it covers.
        assert_eq!(seqs(tmp.path(), 3), [3, 4]);
        assert_eq!(a.remove_before(3).unwrap(), 2);
        assert_eq!(seqs(tmp.path(), 3), [3, 4]);
        assert_eq!(a.remove_before(99).unwrap(), 1, "never the current segment");
        assert_eq!(seqs(tmp.path(), 0), [4]);
    }

    #[test]
    fn the_segment_of_the_recorded_end_outlives_pruning_until_a_later_end_is_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = Appender::open(tmp.path(), None, 1).unwrap();
        a.push(1, &block(1, 1)).unwrap();
        let recorded = a.sync().unwrap().unwrap();
        assert_eq!(recorded.segment, 1);
        // More segments, no checkpoint: recovery would still cut back to 1.
        a.push(2, &block(2, 1)).unwrap();
        a.push(3, &block(3, 1)).unwrap();
        a.write().unwrap();
        assert_eq!(a.remove_before(3).unwrap(), 0);
        assert_eq!(list(&dir_of(tmp.path())).unwrap().len(), 3);
        // Once a later end is recorded, it can go.
        assert_eq!(a.sync().unwrap().unwrap().segment, 3);
        assert_eq!(a.remove_before(3).unwrap(), 2);
        assert_eq!(seqs(tmp.path(), 0), [3]);
    }

    #[test]
    fn a_torn_or_altered_frame_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = Appender::open(tmp.path(), None, 1 << 20).unwrap();
        a.push(1, &block(1, 2)).unwrap();
        a.push(3, &block(3, 2)).unwrap();
        a.sync().unwrap();
        let seg = dir_of(tmp.path()).join(file_name(1));
        let mut data = std::fs::read(&seg).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&seg, &data).unwrap();
        let items: Vec<_> = Records::new(tmp.path(), 0).unwrap().collect();
        assert_eq!(items.len(), 3);
        match &items[2] {
            Err(AuditError::Broken { seq, problem }) => {
                assert_eq!(*seq, 3);
                assert!(problem.contains("checksum"), "{problem}");
            }
            other => panic!("expected a broken block, got {other:?}"),
        }
    }
}
