//! Message bodies in segment files, out of sled's tree.
//!
//! sled 0.34 copies a leaf node on every insert and removal, and writes
//! every value it is given into its log, so the bytes of a message stored in
//! the tree cost far more CPU than its 40-byte reference. A message with one
//! receiving subscription therefore lives in `messages/<segment>.seg`, and its
//! pending entry holds a [`BodyRef`]: segment, offset, length, CRC-32 and
//! the first [`HEAD`] bytes of the stored value (its format, publish and
//! expiry times), so the expiry sweep never reads the file.
//!
//! # Write path
//! The writer thread places each body ([`Placer`]): the segment and offset
//! are fixed when the group is built, so the pending entry can name them.
//! Each subscription writes segments of its own, so the bodies a
//! subscription leaves unconsumed never hold the space of other
//! subscriptions' acked bodies.
//! The body travels in the group's journal record under `B segment offset`
//! (never applied to sled). Once that record is synced, the flusher writes
//! the body at its place with `pwrite` ([`Files`]) before it applies the
//! group's sled writes, so no reference is readable before its body.
//!
//! # Durability and recovery
//! - A checkpoint fdatasyncs every segment written since the last one (and
//!   the folder, when a file was made) before sled's own flush; the journal
//!   starts a new pass only after that. So a body is always either in a
//!   synced segment or in the journal's current pass.
//! - At open, every body of the journal's pass is written again at its
//!   place (idempotent: the same bytes at the same offset), whether or not
//!   sled had its group, and the files synced. Nothing after the last
//!   checkpoint is trusted from the files.
//!
//! # Space
//! Each segment has a record in sled (`L segment` → [`SegmentInfo`]: live
//! bodies and their bytes, its subscription, its size), updated in the
//! same group as the pending entries that reference it. A segment is
//! removed once its count is zero and no subscription places bodies in it
//! any more, once the group that emptied it is durable and applied (before
//! that group is answered). At open,
//! segment files with no live count (emptied, or brought back by the
//! journal replay) are removed, and writing begins in a new segment.
//!
//! # Compaction
//! A segment's space goes only with its last body, so a few messages left
//! pending (held by a consumer, nacked with a long delay) would pin whole
//! segments. The writer's periodic sweep therefore compacts: a segment no
//! longer written whose live bytes are at most half its size has its live
//! bodies written again at the end of its subscription's current segment,
//! in one group with their pending entries' new references, as a publish
//! would write them; the emptied segment then goes as above. A sweep does
//! a bounded amount of this, so a segment may take several. So every
//! segment no longer written ends more than half live, short of one with a
//! damaged body.
//! A reader that met the old reference (the file gone) reads the entry
//! again and follows the new one ([`super::Store::pending_rows_of`]).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{io_error, keys, StorageError};

/// The folder of the segment files, in the data directory.
pub const DIR: &str = "messages";
/// Size past which a segment is closed and the next begun.
pub const SEGMENT_BYTES: u64 = 16 << 20;
/// How long a segment stays at most half live before compaction moves its
/// live bodies (a segment being consumed passes through half live within
/// moments; one pinned by a few messages stays so).
pub const COMPACT_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// Most segment files the flusher keeps open for writing.
const OPEN_FILES: usize = 64;
/// Bytes of the stored value kept in its reference: format, publish and
/// expiry times (what the expiry sweep reads).
pub const HEAD: usize = 17;

/// Where a message body lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyRef {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl BodyRef {
    /// First byte of an encoded reference: not a stored value's format byte,
    /// so a pending entry's tail tells an inline value from a reference.
    pub const TAG: u8 = 0xB0;
    /// Tag, segment, offset, length, CRC and the value's head.
    pub const ENCODED: usize = 1 + 8 + 8 + 4 + 4 + HEAD;

    /// The reference followed by the head of `value` (the stored value).
    pub fn encode_into(&self, value: &[u8], out: &mut Vec<u8>) {
        out.push(Self::TAG);
        out.extend_from_slice(&self.segment.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.crc.to_be_bytes());
        let mut head = [0u8; HEAD];
        let n = value.len().min(HEAD);
        head[..n].copy_from_slice(&value[..n]);
        out.extend_from_slice(&head);
    }

    /// A reference and the value's head, if `bytes` is one.
    pub fn decode(bytes: &[u8]) -> Option<(BodyRef, &[u8])> {
        if bytes.len() != Self::ENCODED || bytes.first() != Some(&Self::TAG) {
            return None;
        }
        Some((
            BodyRef {
                segment: keys::be_u64(&bytes[1..9])?,
                offset: keys::be_u64(&bytes[9..17])?,
                len: keys::be_u32(&bytes[17..21])?,
                crc: keys::be_u32(&bytes[21..25])?,
            },
            &bytes[25..],
        ))
    }

    /// Whether `next` lies right after this body in the same segment.
    fn followed_by(&self, next: &BodyRef) -> bool {
        self.segment == next.segment && self.offset + u64::from(self.len) == next.offset
    }
}

pub fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(DIR).join(format!("{segment:020}.seg"))
}

/// The segment ids of the files in `dir`'s segment folder.
pub fn list(dir: &Path) -> Result<Vec<u64>, StorageError> {
    let folder = dir.join(DIR);
    let entries = match std::fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(&folder)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(&folder))?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        out.push(id);
    }
    out.sort_unstable();
    Ok(out)
}

/// What sled records of a segment under `L segment`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Bodies still referenced.
    pub count: u64,
    /// None: recorded by a build before compaction, which kept the count
    /// alone (such a segment is never compacted; it goes with its last body).
    pub extent: Option<Extent>,
}

/// What compaction needs to know of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes of the bodies still referenced.
    pub live_bytes: u64,
    /// End of its last body: the file's size.
    pub size: u64,
    /// The subscription whose bodies it holds.
    pub sub: u32,
    /// Lowest sequence of a body placed in it: its entries lie from there.
    pub first_seq: u64,
}

impl SegmentInfo {
    const ENCODED: usize = 8 + 8 + 8 + 4 + 8;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::ENCODED);
        out.extend_from_slice(&self.count.to_be_bytes());
        if let Some(e) = &self.extent {
            out.extend_from_slice(&e.live_bytes.to_be_bytes());
            out.extend_from_slice(&e.size.to_be_bytes());
            out.extend_from_slice(&e.sub.to_be_bytes());
            out.extend_from_slice(&e.first_seq.to_be_bytes());
        }
        out
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        let count = keys::be_u64(value.get(..8)?)?;
        let extent = match value.len() {
            8 => None,
            Self::ENCODED => Some(Extent {
                live_bytes: keys::be_u64(&value[8..16])?,
                size: keys::be_u64(&value[16..24])?,
                sub: keys::be_u32(&value[24..28])?,
                first_seq: keys::be_u64(&value[28..36])?,
            }),
            _ => return None,
        };
        Some(Self { count, extent })
    }
}

/// The segments recorded in sled.
pub fn segment_infos(db: &sled::Db) -> Result<super::IdMap<u64, SegmentInfo>, StorageError> {
    let mut out = super::IdMap::default();
    for item in db.scan_prefix([keys::BODY_LIVE]) {
        let (key, value) = item?;
        let corrupt = || StorageError::Corrupt {
            what: "a message segment's live count".into(),
        };
        let segment = keys::body_live_segment(&key).ok_or_else(corrupt)?;
        out.insert(segment, SegmentInfo::decode(&value).ok_or_else(corrupt)?);
    }
    Ok(out)
}

/// The live counts recorded in sled: segment → bodies still referenced.
pub fn live_counts(db: &sled::Db) -> Result<HashMap<u64, u64>, StorageError> {
    Ok(segment_infos(db)?
        .into_iter()
        .map(|(segment, info)| (segment, info.count))
        .collect())
}

/// Places bodies in segments for the writer: the segment and offset a body
/// will be written at. Each subscription has segments of its own, so a
/// subscription that is not consumed keeps only its own bodies' segments,
/// never those of busy subscriptions whose bodies would lie beside its own.
#[derive(Debug)]
pub struct Placer {
    /// Per subscription, the segment it writes and the offset of its next body.
    current: super::IdMap<u32, (u64, u64)>,
    /// The id the next new segment takes (ids only grow).
    next_segment: u64,
    segment_bytes: u64,
    /// Segments a subscription has moved on from since the last
    /// [`Placer::take_retired`].
    retired: Vec<u64>,
}

impl Placer {
    /// New segments are numbered from `next_segment`.
    pub fn new(next_segment: u64, segment_bytes: u64) -> Self {
        Self {
            current: super::IdMap::default(),
            next_segment,
            segment_bytes: segment_bytes.max(1),
            retired: Vec::new(),
        }
    }

    /// The place of a body of `len` bytes for subscription `sub`: after its
    /// last body, or at the start of a new segment when that one is full.
    pub fn place(&mut self, sub: u32, len: usize) -> (u64, u64) {
        let len = len as u64;
        let (segment, offset) = match self.current.get(&sub) {
            Some(&(segment, offset))
                if offset == 0 || offset.saturating_add(len) <= self.segment_bytes =>
            {
                (segment, offset)
            }
            other => {
                if let Some(&(full, _)) = other {
                    self.retired.push(full);
                }
                self.next_segment += 1;
                (self.next_segment - 1, 0)
            }
        };
        self.current.insert(sub, (segment, offset + len));
        (segment, offset)
    }

    /// Whether bodies are still placed in `segment`.
    pub fn is_current(&self, segment: u64) -> bool {
        self.current.values().any(|&(s, _)| s == segment)
    }

    /// The segments subscriptions have moved on from since the last call.
    pub fn take_retired(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.retired)
    }
}

/// The segment files as the flusher writes them. Bodies that lie one after
/// another are gathered and written with one `pwrite` ([`Files::flush`]).
#[derive(Debug)]
pub struct Files {
    dir: PathBuf,
    open: HashMap<u64, File>,
    /// Bodies gathered and not yet written: where they start, and their bytes.
    gathered: Option<(u64, u64)>,
    buf: Vec<u8>,
    /// Written since the last [`Files::sync`].
    dirty: BTreeSet<u64>,
    /// A file was made since the last sync: the folder needs one too.
    created: bool,
}

impl Files {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            open: HashMap::new(),
            gathered: None,
            buf: Vec::new(),
            dirty: BTreeSet::new(),
            created: false,
        }
    }

    /// Writes `body` at `offset` of `segment` (not synced): gathered with
    /// the bodies before it when it follows them, else after writing them.
    /// Written once [`Files::flush`] returns.
    pub fn write(&mut self, segment: u64, offset: u64, body: &[u8]) -> Result<(), StorageError> {
        match self.gathered {
            Some((s, start)) if s == segment && start + self.buf.len() as u64 == offset => {}
            _ => {
                self.flush()?;
                self.gathered = Some((segment, offset));
            }
        }
        self.buf.extend_from_slice(body);
        Ok(())
    }

    /// Writes the gathered bodies.
    pub fn flush(&mut self) -> Result<(), StorageError> {
        let Some((segment, offset)) = self.gathered.take() else {
            return Ok(());
        };
        let result = self.write_now(segment, offset);
        self.buf.clear();
        // A burst can leave a large buffer behind: do not keep it.
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        result
    }

    fn write_now(&mut self, segment: u64, offset: u64) -> Result<(), StorageError> {
        let path = segment_path(&self.dir, segment);
        if !self.open.contains_key(&segment) {
            let folder = self.dir.join(DIR);
            if !folder.exists() {
                std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
                super::sync_dir(&self.dir)?;
            }
            self.created |= !path.exists();
            let file = super::open_read_write(&path).map_err(io_error(&path))?;
            // Each subscription being published to writes a segment of its
            // own; past this many, the oldest is closed (a written one is
            // still synced at the next checkpoint: it stays in `dirty`).
            if self.open.len() >= OPEN_FILES {
                if let Some(&oldest) = self.open.keys().min() {
                    self.open.remove(&oldest);
                }
            }
            self.open.insert(segment, file);
        }
        let file = self
            .open
            .get(&segment)
            .ok_or_else(|| StorageError::Corrupt {
                what: format!("message segment {segment} is not open"),
            })?;
        file.write_all_at(&self.buf, offset)
            .map_err(io_error(&path))?;
        self.dirty.insert(segment);
        Ok(())
    }

    /// Writes what is gathered, then fdatasyncs every segment written since
    /// the last sync, and the folder when a file was made.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        self.flush()?;
        for segment in std::mem::take(&mut self.dirty) {
            let path = segment_path(&self.dir, segment);
            let result = match self.open.get(&segment) {
                Some(file) => file.sync_data(),
                None => match File::open(&path) {
                    Ok(file) => file.sync_data(),
                    // Removed since it was written: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                },
            };
            result.map_err(io_error(&path))?;
        }
        if std::mem::take(&mut self.created) {
            super::sync_dir(&self.dir.join(DIR))?;
        }
        Ok(())
    }

    /// Removes the files of `segments` (none of their bodies is referenced).
    pub fn remove(&mut self, segments: &[u64]) -> Result<(), StorageError> {
        if self.gathered.is_some_and(|(s, _)| segments.contains(&s)) {
            self.gathered = None;
            self.buf.clear();
        }
        for &segment in segments {
            self.open.remove(&segment);
            self.dirty.remove(&segment);
            let path = segment_path(&self.dir, segment);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        Ok(())
    }
}

/// Reads bodies for the dispatchers and operator commands; keeps the
/// segments it has read open.
#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    open: Mutex<HashMap<u64, Arc<File>>>,
}

/// Most bytes read with one `pread` for a run of bodies that lie one after
/// another.
const RUN_BYTES: u64 = 1 << 20;

impl Reader {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, segment: u64) -> Result<Option<Arc<File>>, StorageError> {
        let mut open = match self.open.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(file) = open.get(&segment) {
            return Ok(Some(file.clone()));
        }
        let path = segment_path(&self.dir, segment);
        match File::open(&path) {
            Ok(file) => {
                let file = Arc::new(file);
                open.insert(segment, file.clone());
                Ok(Some(file))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    /// Closes the reader's handle on removed segments.
    pub fn forget(&self, segments: &[u64]) {
        let mut open = match self.open.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        for segment in segments {
            open.remove(segment);
        }
    }

    /// The bodies of `refs`, in order: None where the segment file is gone
    /// or too short (its entry was settled meanwhile, or the file was cut).
    /// A body that fails its CRC is an error. Bodies that lie one after
    /// another are read together.
    pub fn read(&self, refs: &[BodyRef]) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        let mut out = Vec::with_capacity(refs.len());
        let mut i = 0;
        while i < refs.len() {
            let first = refs[i];
            let mut end = i + 1;
            let mut len = u64::from(first.len);
            while end < refs.len()
                && refs[end - 1].followed_by(&refs[end])
                && len + u64::from(refs[end].len) <= RUN_BYTES
            {
                len += u64::from(refs[end].len);
                end += 1;
            }
            let run = self.read_at(first.segment, first.offset, len as usize)?;
            let mut at = 0usize;
            for body in &refs[i..end] {
                let n = body.len as usize;
                let bytes = run.as_ref().and_then(|run| run.get(at..at + n));
                at += n;
                match bytes {
                    Some(bytes) if crc32fast::hash(bytes) == body.crc => {
                        out.push(Some(bytes.to_vec()))
                    }
                    Some(_) => {
                        return Err(StorageError::Corrupt {
                            what: format!(
                                "message body at {} of segment {} fails its checksum",
                                body.offset, body.segment
                            ),
                        })
                    }
                    None => out.push(None),
                }
            }
            i = end;
        }
        Ok(out)
    }

    /// One body ([`Reader::read`]).
    pub fn read_one(&self, body: BodyRef) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.read(&[body])?.pop().flatten())
    }

    /// `len` bytes at `offset` of `segment`, or fewer where the file ends
    /// (None: no such file).
    fn read_at(
        &self,
        segment: u64,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(file) = self.file(segment)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(&segment_path(&self.dir, segment))(e)),
            }
        }
        buf.truncate(done);
        Ok(Some(buf))
    }
}

/// The first segment id above every one in use (`live`) or on disk in
/// `dir`: where writing begins (what a crash left of the last segment is
/// never appended to).
pub fn next_segment(dir: &Path, live: impl IntoIterator<Item = u64>) -> Result<u64, StorageError> {
    Ok(list(dir)?
        .into_iter()
        .chain(live)
        .max()
        .map_or(0, |last| last + 1))
}

/// At open, after the journal's sled writes are replayed: writes every body
/// of the journal's pass at its place again, syncs what it wrote, then
/// removes the segments no live count names.
pub fn recover<'a>(
    dir: &Path,
    db: &sled::Db,
    bodies: impl IntoIterator<Item = (u64, u64, &'a [u8])>,
) -> Result<(), StorageError> {
    let mut files = Files::new(dir);
    for (segment, offset, body) in bodies {
        files.write(segment, offset, body)?;
    }
    files.sync()?;
    drop(files);
    let live = live_counts(db)?;
    let mut removed = false;
    for segment in list(dir)? {
        if live.get(&segment).copied().unwrap_or(0) == 0 {
            let path = segment_path(dir, segment);
            std::fs::remove_file(&path).map_err(io_error(&path))?;
            removed = true;
        }
    }
    if removed {
        super::sync_dir(&dir.join(DIR))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_ref(segment: u64, offset: u64, bytes: &[u8]) -> BodyRef {
        BodyRef {
            segment,
            offset,
            len: bytes.len() as u32,
            crc: crc32fast::hash(bytes),
        }
    }

    #[test]
    fn segment_records_round_trip_and_a_count_alone_reads_as_never_compacted() {
        let info = SegmentInfo {
            count: 3,
            extent: Some(Extent {
                live_bytes: 3 * 157,
                size: 16 << 20,
                sub: 7,
                first_seq: 42,
            }),
        };
        assert_eq!(SegmentInfo::decode(&info.encode()), Some(info));
        let legacy = SegmentInfo::decode(&5u64.to_be_bytes()).unwrap();
        assert_eq!((legacy.count, legacy.extent), (5, None));
        assert_eq!(SegmentInfo::decode(&[0; 12]), None);
    }

    #[test]
    fn a_reference_round_trips_with_the_head_of_its_value() {
        let r = body_ref(7, 4096, b"abc");
        let mut out = Vec::new();
        let value: Vec<u8> = (0..60).collect();
        r.encode_into(&value, &mut out);
        assert_eq!(out.len(), BodyRef::ENCODED);
        let (back, head) = BodyRef::decode(&out).unwrap();
        assert_eq!(back, r);
        assert_eq!(head, &value[..HEAD]);
        assert!(BodyRef::decode(&out[1..]).is_none());
        assert!(BodyRef::decode(&value[..BodyRef::ENCODED]).is_none());
    }

    #[test]
    fn bodies_are_placed_in_order_per_subscription_and_a_full_segment_rolls() {
        let mut p = Placer::new(3, 100);
        assert_eq!(p.place(1, 60), (3, 0));
        assert_eq!(
            p.place(2, 10),
            (4, 0),
            "another subscription, another segment"
        );
        assert_eq!(p.place(1, 40), (3, 60));
        assert_eq!(p.place(2, 10), (4, 10));
        assert!(p.take_retired().is_empty());
        assert_eq!(p.place(1, 1), (5, 0));
        // A body larger than a segment gets a segment of its own.
        assert_eq!(p.place(1, 500), (6, 0));
        assert_eq!(p.place(1, 1), (7, 0));
        assert_eq!(p.take_retired(), [3, 5, 6]);
        assert!(p.is_current(7) && p.is_current(4) && !p.is_current(3));
    }

    #[test]
    fn bodies_written_are_read_back_together_and_damage_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let mut files = Files::new(tmp.path());
        let a = b"first body".to_vec();
        let b = b"second".to_vec();
        let c = b"in another segment".to_vec();
        files.write(1, 0, &a).unwrap();
        files.write(1, a.len() as u64, &b).unwrap();
        files.write(2, 0, &c).unwrap();
        files.flush().unwrap();
        assert_eq!(list(tmp.path()).unwrap(), [1, 2]);
        files.sync().unwrap();
        let refs = [
            body_ref(1, 0, &a),
            body_ref(1, a.len() as u64, &b),
            body_ref(2, 0, &c),
            body_ref(9, 0, &c),
            body_ref(2, 100, &c),
        ];
        let reader = Reader::new(tmp.path());
        let got = reader.read(&refs).unwrap();
        assert_eq!(got, vec![Some(a.clone()), Some(b), Some(c), None, None]);

        files.remove(&[2]).unwrap();
        reader.forget(&[2]);
        assert_eq!(reader.read(&refs[2..3]).unwrap(), vec![None]);

        files.write(1, 0, b"FIRST").unwrap();
        files.flush().unwrap();
        let err = reader.read(&refs[..1]).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn recovery_rewrites_the_journal_bodies_and_removes_segments_nobody_uses() {
        let tmp = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(tmp.path().join("db"))
            .open()
            .unwrap();
        let mut files = Files::new(tmp.path());
        files.write(4, 0, b"gone").unwrap();
        files.write(5, 0, b"torn").unwrap();
        files.sync().unwrap();
        drop(files);
        db.insert(keys::body_live(5), &1u64.to_be_bytes()[..])
            .unwrap();
        recover(tmp.path(), &db, [(5u64, 0u64, &b"kept"[..])]).unwrap();
        let next = next_segment(tmp.path(), live_counts(&db).unwrap().into_keys()).unwrap();
        assert_eq!(next, 6);
        assert_eq!(list(tmp.path()).unwrap(), vec![5]);
        let reader = Reader::new(tmp.path());
        assert_eq!(
            reader.read(&[body_ref(5, 0, b"kept")]).unwrap(),
            vec![Some(b"kept".to_vec())]
        );
    }
}
