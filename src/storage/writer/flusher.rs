//! The flusher thread: makes handed-over groups durable, applies them to
//! sled and only then answers them. The writer builds group N+1 while this
//! thread journals and applies group N, so building groups (CPU) overlaps
//! waiting for the disk.
//!
//! # Invariants
//! - A group reaches sled only after its journal record is written and
//!   synced (see [`super::super::journal`]), and is answered only after it
//!   is applied: whatever a client was told is both durable and readable
//!   in sled.
//! - The messages a group stored are handed to their dispatchers once its
//!   journal record is synced, while sled is written: durable, they may be
//!   delivered. A dispatcher reads sled only up to the committed sequences,
//!   published once applied, and an ack or nack of such a delivery finds
//!   the entry in the writer's view of groups not yet applied.
//! - Groups are applied and answered in the order the writer built them.
//! - Several groups waiting together share one journal write and sync.
//! - The journal is written from its start again only after a checkpoint:
//!   the audit segments fsynced and their end recorded in sled, then sled's
//!   own flush + fsync; on a full journal, a group that asked for one, or a
//!   stop.
//! - A group with no writes (e.g. only duplicate publishes) is still answered
//!   in order, so it never overtakes the durability of an earlier group it
//!   depends on.
//! - Once a flush fails, every later group is refused: sled's errors are
//!   sticky, and nothing may be acknowledged that is not durable.
//! - [`Progress`] passes each group's lsn once it is applied or refused.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use super::super::journal::Changes;
use super::super::{
    keys, FlushStats, Op, Published, StorageError, StoredMessage, SubState, TopicState,
};

/// A group built by the writer, waiting to be journaled, applied to sled and answered.
pub(super) struct Applied {
    /// Its journal lsn and writes (None: it wrote nothing).
    pub record: Option<(u64, Arc<Changes>)>,
    /// It asked for sled itself to be made durable ([`crate::storage::Store::checkpoint`]).
    pub checkpoint: bool,
    pub replies: Vec<(oneshot::Sender<Result<Published, StorageError>>, Published)>,
    pub syncs: Vec<oneshot::Sender<Result<(), StorageError>>>,
    /// Topic sequences that become visible to dispatchers.
    pub committed: Vec<(Arc<TopicState>, u64)>,
    pub woken: Vec<Arc<SubState>>,
    /// Messages stored, handed to their dispatchers once durable (by
    /// [`Flusher::sync`], after the journal sync and the body writes), less
    /// those of topics that deliver before sync (handed over by the writer).
    pub fresh: Vec<(Arc<SubState>, u64, Arc<StoredMessage>)>,
    /// Sequence floors the group raises, which hold once it is durable.
    pub seq_floors: Vec<(Arc<TopicState>, u64)>,
    /// Counters as written in the group: (subscription, depth, dead letters).
    pub counts: Vec<(Arc<SubState>, u64, u64)>,
    pub publishes: u64,
    /// The group wrote something (or asked for a sync): it needs a flush.
    pub needs_flush: bool,
    /// Audit segments before this record go once the group is durable.
    pub prune_audit_before: Option<u64>,
    /// Message segments nothing references once the group is applied.
    pub remove_segments: Vec<u64>,
}

impl Applied {
    /// Answers every publish and sync of the group with `reason`: nothing of
    /// it is durable.
    pub(super) fn refuse(self, reason: &str) {
        for (reply, _) in self.replies {
            let _ = reply.send(Err(StorageError::Unavailable(reason.to_string())));
        }
        for reply in self.syncs {
            let _ = reply.send(Err(StorageError::Unavailable(reason.to_string())));
        }
    }
}

/// The first storage failure, shared by the writer and the flusher.
pub(super) type Failure = Arc<Mutex<Option<String>>>;

pub(super) fn failure_of(failed: &Failure) -> Option<String> {
    match failed.lock() {
        Ok(f) => f.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn fail(failed: &Failure, reason: &str) {
    let mut slot = match failed.lock() {
        Ok(f) => f,
        Err(poisoned) => poisoned.into_inner(),
    };
    slot.get_or_insert_with(|| reason.to_string());
}

/// The lsn of the last group the flusher has applied to sled or refused,
/// for the writer to wait on.
pub(super) struct Progress {
    lsn: AtomicU64,
    lock: Mutex<()>,
    advanced: Condvar,
}

impl Progress {
    pub(super) fn new(lsn: u64) -> Self {
        Self {
            lsn: AtomicU64::new(lsn),
            lock: Mutex::new(()),
            advanced: Condvar::new(),
        }
    }

    pub(super) fn lsn(&self) -> u64 {
        self.lsn.load(Ordering::Acquire)
    }

    fn advance(&self, lsn: u64) {
        self.lsn.fetch_max(lsn, Ordering::AcqRel);
        let _guard = match self.lock.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.advanced.notify_all();
    }

    /// Waits until `lsn` is passed, or `alive()` says the flusher is gone.
    pub(super) fn wait_for(&self, lsn: u64, alive: impl Fn() -> bool) {
        let mut guard = match self.lock.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        while self.lsn() < lsn && alive() {
            guard = match self
                .advanced
                .wait_timeout(guard, std::time::Duration::from_millis(50))
            {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// The flusher's state and how many groups wait for its thread. The thread
/// takes the state for the groups handed to it; the writer takes it to
/// complete a group itself when no group is in flight and no op waits
/// behind it: under light load that saves a thread hand-off (about 30 µs
/// on the development VM), under load the two threads still overlap.
pub(super) struct Shared {
    pub core: Mutex<Flusher>,
    pub in_flight: AtomicUsize,
    /// The writer holds back a group nobody waits on.
    pub holding: AtomicBool,
    /// To nudge the writer into finishing that group (weak: it does not
    /// keep the writer's queue open).
    nudge: tokio::sync::mpsc::WeakSender<Op>,
}

/// How long the flusher stays idle before it nudges the writer to finish a
/// group it holds back: a consumer's ack is durable within about this.
const HOLD: std::time::Duration = std::time::Duration::from_millis(50);

impl Shared {
    pub(super) fn new(flusher: Flusher, nudge: tokio::sync::mpsc::WeakSender<Op>) -> Self {
        Self {
            core: Mutex::new(flusher),
            in_flight: AtomicUsize::new(0),
            holding: AtomicBool::new(false),
            nudge,
        }
    }

    /// The flusher thread: completes handed-over groups, every group
    /// waiting at once together; after [`HOLD`] without one, nudges the
    /// writer if it holds a group back.
    pub(super) fn run(&self, rx: mpsc::Receiver<Applied>) {
        loop {
            let first = match rx.recv_timeout(HOLD) {
                Ok(group) => group,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.holding.load(Ordering::Acquire) {
                        if let Some(tx) = self.nudge.upgrade() {
                            let _ = tx.try_send(Op::Nudge);
                        }
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut groups = vec![first];
            while let Ok(next) = rx.try_recv() {
                groups.push(next);
            }
            let n = groups.len();
            let mut core = match self.core.lock() {
                Ok(core) => core,
                Err(poisoned) => poisoned.into_inner(),
            };
            core.complete(groups);
            drop(core);
            self.in_flight.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Completes `group` on the calling thread if no group is in flight
    /// and the flusher's state is free; else gives it back.
    pub(super) fn complete_here(&self, group: Applied) -> Option<Applied> {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return Some(group);
        }
        let mut core = match self.core.try_lock() {
            Ok(core) => core,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Some(group),
        };
        core.complete(vec![group]);
        None
    }
}

pub(super) struct Flusher {
    pub db: sled::Db,
    pub progress: Arc<Progress>,
    pub dir: PathBuf,
    pub db_file: std::fs::File,
    pub journal: super::journal::Journal,
    /// The audit log's segment files: the groups' audit blocks go there.
    pub audit: crate::audit::segments::Appender,
    pub stats: Arc<FlushStats>,
    pub failed: Failure,
    pub synced_blobs: HashSet<std::ffi::OsString>,
    /// Modification time of `blobs/` when it was last listed in full.
    pub blobs_listed_at: Option<std::time::SystemTime>,
    /// The message segment files: the groups' bodies go there.
    pub bodies: crate::storage::bodies::Files,
    /// The readers' open segments, closed as segments are removed.
    pub reader: Arc<crate::storage::bodies::Reader>,
}

/// How old the `blobs/` folder's modification time must be when a listing
/// begins for an unchanged time to mean, later, that no file came or went.
const BLOB_DIR_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

impl Flusher {
    pub(super) fn complete(&mut self, mut groups: Vec<Applied>) {
        let started = Instant::now();
        let needs_flush = groups.iter().any(|g| g.needs_flush);
        let result = match failure_of(&self.failed) {
            Some(reason) => Err(StorageError::Unavailable(reason)),
            None if needs_flush => self.sync(&mut groups),
            None => Ok(()),
        };
        if let Some(last) = groups.iter().filter_map(|g| g.record.as_ref()).next_back() {
            self.progress.advance(last.0);
        }
        if let Err(e) = &result {
            error!(cause = %e, "group commit failed; publishes are refused until restart");
            fail(&self.failed, &e.to_string());
        } else if needs_flush {
            let publishes: u64 = groups.iter().map(|g| g.publishes).sum();
            let micros = started.elapsed().as_micros() as u64;
            ::metrics::histogram!(crate::metrics::FLUSH_SECONDS)
                .record(started.elapsed().as_secs_f64());
            ::metrics::histogram!(crate::metrics::FLUSH_MESSAGES).record(publishes as f64);
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            self.stats.flush_micros.fetch_add(micros, Ordering::Relaxed);
            self.stats.publishes.fetch_add(publishes, Ordering::Relaxed);
            self.stats
                .max_publishes_per_flush
                .fetch_max(publishes, Ordering::Relaxed);
            debug!(publishes, groups = groups.len(), micros, "group commit");
        }
        let prune = groups.iter().filter_map(|g| g.prune_audit_before).max();
        let emptied: Vec<u64> = groups
            .iter()
            .flat_map(|g| g.remove_segments.iter().copied())
            .collect();
        if !emptied.is_empty() && result.is_ok() {
            // Applied: no entry refers to them (so what was acked has freed
            // its space by the time it is answered). A crash before the
            // next checkpoint may bring one back from the journal; the
            // next open removes it again (it has no live count).
            // Unlinked before the readers drop their handles: a reader
            // opening one meanwhile would keep its space until restart.
            match self.bodies.remove(&emptied) {
                Ok(()) => debug!(segments = emptied.len(), "message segments removed"),
                // Left behind, it has no live count: the next open removes it.
                Err(e) => warn!(cause = %e, "removing emptied message segments failed"),
            }
            self.reader.forget(&emptied);
        }
        for group in groups {
            answer(group, &result);
        }
        if let Some(first_kept) = prune.filter(|_| result.is_ok()) {
            // The anchor standing for them is journaled: the records can
            // go (after the answers, so no publish waits on the unlinks).
            match self.audit.remove_before(first_kept) {
                Ok(n) => debug!(segments = n, first_kept, "audit segments removed"),
                // Left behind, they lie before the anchor: readers step over
                // them and the next removal takes them.
                Err(e) => warn!(cause = %e, "removing pruned audit segments failed"),
            }
        }
    }

    /// Journals the groups' writes, applies them to sled, and checkpoints
    /// when the journal is full or a group asked for it.
    fn sync(&mut self, groups: &mut [Applied]) -> Result<(), StorageError> {
        #[cfg(debug_assertions)]
        hold_before_sync();
        self.journal.append(
            groups
                .iter()
                .filter_map(|g| g.record.as_ref())
                .map(|(lsn, changes)| (*lsn, &**changes)),
        )?;
        // The bodies next, of every group: a full disk or a failing file
        // shows here, before anything is delivered.
        for (_, changes) in groups.iter().filter_map(|g| g.record.as_ref()) {
            write_bodies(&mut self.bodies, changes)?;
        }
        self.bodies.flush()?;
        // Durable and in their files: the dispatchers may deliver while
        // sled is written (if that fails, the publish is refused although
        // its message may have been delivered: it is in the journal, and
        // comes back with it at the next start).
        hand_over(groups.iter_mut().flat_map(|g| g.fresh.drain(..)));
        let records = || groups.iter().filter_map(|g| g.record.as_ref());
        let applying = Instant::now();
        for (lsn, changes) in records() {
            apply(&self.db, &mut self.audit, changes, *lsn)?;
        }
        self.audit.write()?;
        ::metrics::histogram!(crate::metrics::APPLY_SECONDS)
            .record(applying.elapsed().as_secs_f64());
        if self.journal.full() || groups.iter().any(|g| g.checkpoint) {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// sled's flush, then an fsync of its data file (sled's own flush uses
    /// `sync_file_range`, which leaves the disk's write cache unflushed) and
    /// of new blob files. Every group applied before it is then durable in
    /// sled, so the journal starts over.
    fn checkpoint(&mut self) -> Result<(), StorageError> {
        let started = Instant::now();
        // The audit segments first: their recorded end goes in with sled's
        // flush, and must not claim what is not on disk.
        if let Some(tail) = self.audit.sync()? {
            crate::audit::segments::record_tail(&self.db, &tail)?;
        }
        // The message bodies too: sled's references to them become durable
        // with its flush, and the journal that holds them is written over.
        self.bodies.sync()?;
        self.db.flush()?;
        self.db_file
            .sync_data()
            .map_err(|source| StorageError::Io {
                path: self.dir.join("db"),
                source,
            })?;
        self.sync_new_blobs()?;
        self.journal.reset();
        ::metrics::histogram!(crate::metrics::CHECKPOINT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// sled writes values too large for its log segments to `blobs/` without
    /// syncing them: fsync every blob file not yet synced, then the folder.
    ///
    /// Listing the folder costs an open and two getdents per flush, so it is
    /// skipped while the folder's modification time is the one seen at the
    /// last full listing: every file created or removed there sets it. That
    /// time comes from a coarse clock, so a later change within the same
    /// tick would leave it unchanged; a listing therefore only counts when
    /// the time it saw was already [`BLOB_DIR_SETTLE`] old when it began.
    fn sync_new_blobs(&mut self) -> Result<(), StorageError> {
        let dir = self.dir.join("blobs");
        let modified = match std::fs::metadata(&dir) {
            Ok(meta) => meta.modified().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) => None,
        };
        if modified.is_some() && modified == self.blobs_listed_at {
            return Ok(());
        }
        let listing_began = std::time::SystemTime::now();
        self.blobs_listed_at = None;
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StorageError::Io { path: dir, source }),
        };
        let mut seen = HashSet::new();
        let mut synced_any = false;
        for entry in entries {
            let entry = entry.map_err(|source| StorageError::Io {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                let path = entry.path();
                match std::fs::File::open(&path).and_then(|f| f.sync_all()) {
                    Ok(()) => synced_any = true,
                    // sled may have removed it since we listed it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(StorageError::Io { path, source }),
                }
            }
            seen.insert(name);
        }
        self.synced_blobs = seen;
        if synced_any {
            std::fs::File::open(&dir)
                .and_then(|f| f.sync_all())
                .map_err(|source| StorageError::Io {
                    path: dir.clone(),
                    source,
                })?;
        }
        self.blobs_listed_at = modified.filter(|m| {
            listing_began
                .duration_since(*m)
                .is_ok_and(|age| age >= BLOB_DIR_SETTLE)
        });
        Ok(())
    }
}

/// Applies a durable group's writes to sled as single-key operations, then
/// its journal lsn; its audit blocks go to the segment files instead
/// (buffered, written by the caller), and its message bodies to theirs.
///
/// Not a `sled::Batch`: sled writes out its log buffer at the start of every
/// batch (two `pwrite` + `sync_file_range` rounds on its I/O threads per
/// group). The journal gives the group's atomicity across a crash instead:
/// sled recovers a prefix of its operations, `J` comes last, and the replay
/// rewrites a group sled holds only part of. Readers can see a group half
/// applied, so the order keeps what they rely on: inserts in key order (a
/// message `m` before its pending entries `p`), then removals in reverse key
/// order (pending entries before their message). Dispatchers deliver no
/// sequence past the committed one, published once its group is applied.
/// The group's bodies are already in their files ([`write_bodies`]).
fn apply(
    db: &sled::Db,
    audit: &mut crate::audit::segments::Appender,
    changes: &Changes,
    lsn: u64,
) -> Result<(), StorageError> {
    for (key, value) in changes {
        let Some(value) = value else { continue };
        if keys::parse_body(key).is_some() {
            continue;
        } else if keys::is_audit_block(key) {
            let first = keys::audit_seq(key).ok_or_else(|| StorageError::Corrupt {
                what: "an audit block's key".into(),
            })?;
            audit.push(first, value)?;
        } else {
            db.insert(&key[..], &value[..])?;
        }
    }
    for (key, _) in changes.iter().rev().filter(|(_, v)| v.is_none()) {
        db.remove(&key[..])?;
    }
    db.insert(keys::JOURNAL_LSN, &lsn.to_be_bytes())?;
    Ok(())
}

/// Writes a group's message bodies at their places (gathered; written once
/// the caller flushes `bodies`): each is in its file before the pending
/// entry that refers to it is in sled.
fn write_bodies(
    bodies: &mut crate::storage::bodies::Files,
    changes: &Changes,
) -> Result<(), StorageError> {
    for (key, value) in changes.range(vec![keys::BODY]..vec![keys::BODY + 1]) {
        if let (Some((segment, offset)), Some(value)) = (keys::parse_body(key), value) {
            bodies.write(segment, offset, value)?;
        }
    }
    Ok(())
}

/// Debug builds only (`cargo test` builds the binary so): with
/// `JOINERY_TEST_HOLD_SYNC_MS` set, every group commit waits that long before
/// its journal write. The crash test sets it for a topic delivering before
/// sync, so that its SIGKILL lands, most times, between a message handed
/// over early and that message's sync. Release builds have no such knob.
#[cfg(debug_assertions)]
fn hold_before_sync() {
    static HOLD: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let hold = HOLD.get_or_init(|| {
        std::env::var("JOINERY_TEST_HOLD_SYNC_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(std::time::Duration::from_millis)
    });
    if let Some(hold) = hold {
        std::thread::sleep(*hold);
    }
}

/// Hands stored messages to their subscriptions' dispatchers, each
/// (subscription, sequence of its previous message, message), and wakes
/// each of those subscriptions once.
pub(super) fn hand_over(fresh: impl IntoIterator<Item = (Arc<SubState>, u64, Arc<StoredMessage>)>) {
    let mut handed: Vec<Arc<SubState>> = Vec::new();
    for (sub, after, message) in fresh {
        sub.push_fresh(after, message);
        if !handed.iter().any(|s| s.id == sub.id) {
            handed.push(sub);
        }
    }
    for sub in handed {
        sub.notify.notify_one();
    }
}

/// Publishes counters and sequences, then answers and wakes (or refuses).
fn answer(group: Applied, result: &Result<(), StorageError>) {
    match result {
        Ok(()) => {
            for (sub, depth, dead) in &group.counts {
                sub.depth.store(*depth, Ordering::Relaxed);
                sub.dead_letters.store(*dead, Ordering::Relaxed);
            }
            for (topic, seq) in &group.committed {
                topic.committed.fetch_max(*seq, Ordering::AcqRel);
            }
            for (topic, floor) in &group.seq_floors {
                topic.seq_floor.fetch_max(*floor, Ordering::AcqRel);
            }
            // Dispatchers first: a delivery's path is longer than a reply's.
            for sub in &group.woken {
                sub.notify.notify_one();
            }
            for (reply, published) in group.replies {
                let _ = reply.send(Ok(published));
            }
            for reply in group.syncs {
                let _ = reply.send(Ok(()));
            }
        }
        Err(e) => group.refuse(&e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn flusher(dir: &std::path::Path) -> Flusher {
        let db = sled::Config::new().path(dir.join("store")).open().unwrap();
        Flusher {
            db,
            progress: Arc::new(Progress::new(0)),
            dir: dir.to_path_buf(),
            db_file: std::fs::File::open(dir.join("store").join("db")).unwrap(),
            journal: super::super::journal::Journal::open(&dir.join("store")).unwrap(),
            audit: crate::audit::segments::Appender::open(&dir.join("store"), None, 1 << 20)
                .unwrap(),
            stats: Arc::default(),
            failed: Failure::default(),
            synced_blobs: HashSet::new(),
            blobs_listed_at: None,
            bodies: crate::storage::bodies::Files::new(&dir.join("store")),
            reader: Arc::new(crate::storage::bodies::Reader::new(&dir.join("store"))),
        }
    }

    fn set_mtime(dir: &std::path::Path, at: SystemTime) {
        std::fs::File::open(dir).unwrap().set_modified(at).unwrap();
    }

    fn synced(f: &Flusher) -> Vec<String> {
        let mut names: Vec<String> = f
            .synced_blobs
            .iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn blob_folder_is_listed_until_its_time_has_settled_then_only_when_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut f = flusher(tmp.path());
        let blobs = tmp.path().join("blobs");
        // No folder: nothing to do.
        f.sync_new_blobs().unwrap();
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(blobs.join("1"), b"x").unwrap();
        f.sync_new_blobs().unwrap();
        assert_eq!(synced(&f), ["1"]);
        // A fresh modification time is not trusted: the next flush lists again.
        assert_eq!(f.blobs_listed_at, None);
        std::fs::write(blobs.join("2"), b"x").unwrap();
        f.sync_new_blobs().unwrap();
        assert_eq!(synced(&f), ["1", "2"]);

        // Settled: a listing records the time, and an unchanged time skips it.
        let old = SystemTime::now() - Duration::from_secs(10);
        set_mtime(&blobs, old);
        f.sync_new_blobs().unwrap();
        assert_eq!(f.blobs_listed_at, Some(old));
        std::fs::write(blobs.join("3"), b"x").unwrap();
        set_mtime(&blobs, old); // as if created within the same clock tick
        f.sync_new_blobs().unwrap();
        assert_eq!(
            synced(&f),
            ["1", "2"],
            "an unchanged time skips the listing"
        );

        // Any change to the time lists again and syncs what is new.
        set_mtime(&blobs, old + Duration::from_secs(1));
        f.sync_new_blobs().unwrap();
        assert_eq!(synced(&f), ["1", "2", "3"]);
        std::fs::remove_file(blobs.join("1")).unwrap();
        f.sync_new_blobs().unwrap();
        assert_eq!(synced(&f), ["2", "3"]);
    }
}
