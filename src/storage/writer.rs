//! The writer thread: turns [`Op`]s, in arrival order, into groups of
//! writes, one group at a time; the [`flusher`] thread makes each group
//! durable (one journal write + fdatasync for every group waiting), then
//! applies it to sled and only then answers it (group commit, pipelined: the
//! next group is built while one is made durable and applied). When no
//! group is in flight and no op waits, the writer completes the group
//! itself, which saves waking the flusher thread.
//!
//! Reads it makes while building a group (dedup lookups, "does another
//! subscription still hold this message?") see, newest first, the group's
//! own writes, then the groups handed to the flusher but not yet applied,
//! then sled. Range scans (sweeps, purge, redrive) first wait until every
//! group handed over is applied, so sled alone is complete for them.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use super::bodies::{self, BodyRef};
use super::journal::{self, Changes};
use super::keys;
use super::packed::{self, Block};
use super::records::{Body, DeadLetter, DeadReason, MessageHeader, Pending, StoredMessage};
use super::{
    now_ms, FlushStats, IdMap, Op, Outcome, Published, StorageError, StoreOptions, SubState,
    TopicState,
};
use crate::audit::{self, AuditEvent, Chain, EventKind};

mod compact;
mod flusher;
mod operator;

use flusher::{Applied, Failure, Flusher, Progress, Shared};

/// Most expired messages or dedup entries handled per sweep (the rest wait
/// for the next tick).
const SWEEP_LIMIT: usize = 10_000;
/// Most audit segments pruned per sweep.
const PRUNE_SEGMENTS: usize = 16;
/// How often a sweep looks for audit segments to prune: a sixteenth of the
/// retention, within these bounds.
const PRUNE_MIN: Duration = Duration::from_millis(50);
const PRUNE_MAX: Duration = Duration::from_secs(60);
/// How far ahead of its sequences the writer keeps the floor of a topic
/// that delivers before sync ([`keys::SEQ_FLOOR`]): it is raised to a
/// sequence this far ahead once one comes within half of it, so a restart
/// skips at most this many sequences, and a message goes to its dispatchers
/// after its sync only if half of this many were stored while one raise
/// waited for its sync.
pub(super) const SEQ_FLOOR_STEP: u64 = 1 << 16;

pub(super) struct Writer {
    db: sled::Db,
    /// The data directory.
    dir: PathBuf,
    /// When a sweep last looked for audit segments to prune.
    audit_pruned_at: Option<Instant>,
    rx: mpsc::Receiver<Op>,
    options: StoreOptions,
    topics: IdMap<u32, Arc<TopicState>>,
    next_seq: IdMap<u32, u64>,
    /// Sequence floor of each topic that delivers before sync, as written
    /// by the groups built so far (durable or not); empty when none does.
    seq_floors: IdMap<u32, u64>,
    /// Built groups on their way to the flusher thread (None once stopped).
    durable: Option<std::sync::mpsc::SyncSender<Applied>>,
    /// The flusher's state, which the writer may use itself when idle.
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
    /// A failed flush, seen by the writer at its next group.
    failure: Failure,
    /// Depth and dead-letter counts as of the groups built so far; a
    /// subscription's own counters move only once a group is durable.
    applied: IdMap<u32, (u64, u64)>,
    /// Expiry index entries before this instant have been swept.
    swept_until_ms: u64,
    /// Per topic, the first sequence the by-order expiry sweep has not
    /// passed yet (in memory: after a restart it starts from the oldest).
    order_swept: IdMap<u32, u64>,
    /// The same per subscription, for the messages inline in its pending
    /// entries.
    order_swept_inline: IdMap<u32, u64>,
    /// The same per subscription, for its packed entries.
    order_swept_packed: IdMap<u32, u64>,
    /// Set once a write failed: sled's errors are sticky, so refuse early.
    failed: Option<String>,
    /// Head of the audit chain (None: audit log off).
    audit: Option<Chain>,
    /// agency → its delivery-report topic and subscription.
    reports: HashMap<String, (Arc<TopicState>, Arc<SubState>)>,
    /// Journal lsn of the last group handed to the flusher.
    lsn: u64,
    /// Groups handed to the flusher and not yet applied to sled, oldest
    /// first, with their lsn: reads see them before sled.
    unapplied: VecDeque<(u64, Arc<Changes>)>,
    /// How far the flusher has applied (or refused) the groups.
    progress: Arc<Progress>,
    /// Per subscription, the sequence of the last message stored for it
    /// by this process (see [`super::Fresh`]).
    last_stored: IdMap<u32, u64>,
    /// Where the next message body of each subscription goes.
    placer: bodies::Placer,
    /// Per message segment, its bodies still referenced (and their bytes)
    /// as of the groups built so far (absent: none).
    segments: IdMap<u64, bodies::SegmentInfo>,
    /// Segments with a body compaction could not read, with their live
    /// count then: not tried again until that count changes.
    compact_tried: IdMap<u64, u64>,
    /// When each segment no longer written was first seen at most half live.
    sparse_since: IdMap<u64, Instant>,
    /// Reads bodies for the expiry sweep.
    bodies: Arc<bodies::Reader>,
}

/// Holds back every group commit while a test looks at what the writer did
/// before the sync.
#[cfg(test)]
pub(super) struct SyncGate(Arc<Shared>);

#[cfg(test)]
impl SyncGate {
    /// No group is synced (nor completed by the writer) until the returned
    /// sender is dropped: a thread holds the flusher's state till then.
    pub(super) fn hold(&self) -> std::sync::mpsc::Sender<()> {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (locked, is_locked) = std::sync::mpsc::channel();
        let shared = self.0.clone();
        std::thread::spawn(move || {
            let _core = shared.core.lock();
            let _ = locked.send(());
            // Err once the sender is dropped.
            let _ = released.recv();
        });
        let _ = is_locked.recv();
        release
    }
}

/// State of one group commit being built.
#[derive(Default)]
struct Group {
    /// Each key's last write in the group (None: removed).
    changes: Changes,
    replies: Vec<(oneshot::Sender<Result<Published, StorageError>>, Published)>,
    syncs: Vec<oneshot::Sender<Result<(), StorageError>>>,
    /// Someone asked for sled itself to be made durable.
    checkpoint: bool,
    committed: IdMap<u32, u64>,
    woken: IdMap<u32, Arc<SubState>>,
    deltas: IdMap<u32, (Arc<SubState>, i64, i64)>,
    /// Next sequence of each topic that took one, written once per group.
    next_seqs: IdMap<u32, u64>,
    /// Sequence floors the group raises.
    seq_floors: IdMap<u32, u64>,
    /// Messages stored by the group, for their subscriptions' dispatchers:
    /// (subscription, sequence of its previous message, message).
    fresh: Vec<(Arc<SubState>, u64, Arc<StoredMessage>)>,
    /// Audit records of the group, in blocks.
    audit: audit::blocks::BlockWriter,
    /// Audit segments before this record go once the group is durable
    /// (its anchor is in `changes`).
    prune_audit_before: Option<u64>,
    publishes: u64,
    /// Per message segment, bodies referenced by the group's entries less
    /// those released.
    body_deltas: IdMap<u64, SegmentDelta>,
    /// Blocks of packed pending entries as of this group, by subscription
    /// and block; true once changed (written when the group is finished).
    blocks: IdMap<(u32, u64), (Block, bool)>,
}

/// What a group changes of one message segment.
#[derive(Default)]
struct SegmentDelta {
    count: i64,
    bytes: i64,
    /// Bodies placed in it: (subscription, lowest sequence, end of the last).
    placed: Option<(u32, u64, u64)>,
    /// Compaction has moved every body of it below this sequence.
    first_seq_at_least: Option<u64>,
}

impl Group {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.put_owned(key, value.to_vec());
    }

    /// [`Self::put`] of a value the caller built and no longer needs.
    fn put_owned(&mut self, key: &[u8], value: Vec<u8>) {
        self.changes.insert(key.to_vec(), Some(value));
    }

    fn del(&mut self, key: &[u8]) {
        self.changes.insert(key.to_vec(), None);
    }

    /// A pending entry of `sub` for `seq` now refers to `body`.
    fn place_body(&mut self, sub: u32, seq: u64, body: &BodyRef) {
        let delta = self.body_deltas.entry(body.segment).or_default();
        delta.count += 1;
        delta.bytes += i64::from(body.len);
        let end = body.offset + u64::from(body.len);
        let placed = delta.placed.get_or_insert((sub, seq, end));
        placed.1 = placed.1.min(seq);
        placed.2 = placed.2.max(end);
    }

    /// No entry below `seq` refers to `segment` any more.
    fn raise_first_seq(&mut self, segment: u64, seq: u64) {
        let delta = self.body_deltas.entry(segment).or_default();
        delta.first_seq_at_least = Some(delta.first_seq_at_least.unwrap_or(0).max(seq));
    }

    /// A pending entry no longer refers to `body`.
    fn release_body(&mut self, body: &BodyRef) {
        let delta = self.body_deltas.entry(body.segment).or_default();
        delta.count -= 1;
        delta.bytes -= i64::from(body.len);
    }

    fn delta(&mut self, sub: &Arc<SubState>, depth: i64, dead: i64) {
        let entry = self.deltas.entry(sub.id).or_insert((sub.clone(), 0, 0));
        entry.1 += depth;
        entry.2 += dead;
    }
}

impl Writer {
    // Called once, from Store::open, with everything the thread owns.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        db: sled::Db,
        dir: &Path,
        rx: mpsc::Receiver<Op>,
        nudge: mpsc::WeakSender<Op>,
        options: StoreOptions,
        topics: Vec<Arc<TopicState>>,
        stats: Arc<FlushStats>,
        audit: Option<Chain>,
        reports: HashMap<String, (Arc<TopicState>, Arc<SubState>)>,
        reader: Arc<bodies::Reader>,
    ) -> Result<Self, StorageError> {
        let path = dir.join("db");
        let db_file = std::fs::File::open(&path).map_err(|source| StorageError::Io {
            path: path.clone(),
            source,
        })?;
        // After a restart a topic's sequences go on from its floor, if that
        // is higher: those below it may have been delivered and then lost.
        let next_seq = topics
            .iter()
            .map(|t| (t.id, (t.committed() + 1).max(t.seq_floor())))
            .collect();
        let seq_floors = topics
            .iter()
            .filter(|t| t.deliver_before_sync)
            .map(|t| (t.id, t.seq_floor()))
            .collect();
        let body_segment_bytes = options.body_segment_bytes;
        let lsn = journal::applied_lsn(&db)?;
        let failure = Failure::default();
        let progress = Arc::new(Progress::new(lsn));
        let audit_tail = audit::segments::read_tail(&db)?;
        let segments = bodies::segment_infos(&db)?;
        let first_segment = bodies::next_segment(dir, segments.keys().copied())?;
        let flusher = Flusher {
            db: db.clone(),
            progress: progress.clone(),
            dir: dir.to_path_buf(),
            db_file,
            journal: journal::Journal::open(dir)?,
            audit: audit::segments::Appender::open(
                dir,
                audit_tail.as_ref(),
                options.audit_segment_bytes,
            )?,
            stats,
            failed: failure.clone(),
            synced_blobs: HashSet::new(),
            blobs_listed_at: None,
            bodies: bodies::Files::new(dir),
            reader: reader.clone(),
        };
        // No room: while the flusher works on what it has, the writer holds
        // the next group, finished, in `send`, and ops pile up in its queue
        // into the group after. Each group buffered between the two would
        // split a publisher's window into one more, smaller group: with
        // room for one, 256 publishes in flight made about 63 publishes a
        // sync, without it about 75: fewer syncs and fewer rounds of
        // per-group work (window 256: about +8% in A/B, with less CPU).
        let (durable, applied_rx) = std::sync::mpsc::sync_channel(0);
        let shared = Arc::new(Shared::new(flusher, nudge));
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("joinery-flusher".into())
            .spawn(move || thread_shared.run(applied_rx))
            .map_err(|source| StorageError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            db,
            dir: dir.to_path_buf(),
            audit_pruned_at: None,
            rx,
            options,
            topics: topics.into_iter().map(|t| (t.id, t)).collect(),
            next_seq,
            seq_floors,
            durable: Some(durable),
            flusher: Some(handle),
            shared,
            failure,
            applied: IdMap::default(),
            swept_until_ms: 0,
            order_swept: IdMap::default(),
            order_swept_inline: IdMap::default(),
            order_swept_packed: IdMap::default(),
            failed: None,
            audit,
            reports,
            lsn,
            unapplied: VecDeque::new(),
            progress,
            last_stored: IdMap::default(),
            placer: bodies::Placer::new(first_segment, body_segment_bytes),
            segments,
            compact_tried: IdMap::default(),
            sparse_since: IdMap::default(),
            bodies: reader,
        })
    }

    /// Lets a test hold every group between the writer and its sync.
    #[cfg(test)]
    pub(super) fn sync_gate(&self) -> SyncGate {
        SyncGate(self.shared.clone())
    }

    pub(super) fn run(mut self) {
        let max = self.options.max_batch.max(1);
        let mut ops = Vec::with_capacity(max);
        // A group nobody waits on (consumer acks, delivery records, sweeps),
        // held back so that later ops join it and share its sync.
        let mut held: Option<Group> = None;
        loop {
            match self.rx.blocking_recv() {
                Some(op) => push_op(&mut ops, op),
                None => break,
            }
            while ops.len() < max {
                match self.rx.try_recv() {
                    Ok(op) => push_op(&mut ops, op),
                    Err(_) => break,
                }
            }
            let nudged = ops.iter().any(|op| matches!(op, Op::Nudge));
            let mut group = held.take().unwrap_or_default();
            let stop = self.commit(&mut ops, &mut group);
            let awaited = !group.replies.is_empty() || !group.syncs.is_empty() || group.checkpoint;
            if stop || awaited || nudged || group.changes.len() >= max {
                self.shared
                    .holding
                    .store(false, std::sync::atomic::Ordering::Release);
                self.finish(group);
            } else {
                self.shared
                    .holding
                    .store(true, std::sync::atomic::Ordering::Release);
                held = Some(group);
            }
            if stop {
                break;
            }
        }
        if let Some(group) = held.take() {
            self.finish(group);
        }
        // Every group handed over answered before the final flush.
        self.durable = None;
        if let Some(flusher) = self.flusher.take() {
            if flusher.join().is_err() {
                error!("the flusher thread panicked");
            }
        }
        if let Err(e) = self.db.flush() {
            error!(cause = %e, "final flush failed");
        }
    }

    /// Builds `ops` into `group`; returns true when told to stop.
    fn commit(&mut self, ops: &mut Vec<Op>, group: &mut Group) -> bool {
        if self.failed.is_none() {
            self.failed = flusher::failure_of(&self.failure);
        }
        let applied = self.progress.lsn();
        while self
            .unapplied
            .front()
            .is_some_and(|(lsn, _)| *lsn <= applied)
        {
            self.unapplied.pop_front();
        }
        let now = now_ms();
        let mut stop = false;
        for op in ops.drain(..) {
            let result = match op {
                Op::Publish(p) => self.publish(group, p, now),
                Op::Settle {
                    sub,
                    topic,
                    message,
                    outcome,
                    agency,
                } => self.settle(group, &sub, &topic, &message, outcome, agency, now),
                Op::Audit(event) => {
                    self.record(group, *event, now);
                    Ok(())
                }
                Op::Requeue { sub, seq, pending } => {
                    // Only while still pending: an ack may have overtaken it.
                    // An inline message stays in the entry.
                    match self.pending_entry(group, sub, seq) {
                        Ok(Some((old, packed))) => {
                            self.put_pending(group, sub, seq, pending.reencode(&old), packed)
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Op::Tick => {
                    self.wait_applied();
                    self.sweep(group, now).and_then(|()| self.compact(group))
                }
                Op::Redrive(op) => {
                    self.wait_applied();
                    self.redrive(group, op, now)
                }
                Op::Purge(op) => {
                    self.wait_applied();
                    self.purge(group, op, now)
                }
                Op::Sync(reply) => {
                    group.syncs.push(reply);
                    Ok(())
                }
                Op::Checkpoint(reply) => {
                    group.syncs.push(reply);
                    group.checkpoint = true;
                    Ok(())
                }
                Op::Stop => {
                    // A clean stop leaves sled and the audit segments
                    // durable, with nothing for the next open to replay.
                    group.checkpoint = true;
                    stop = true;
                    Ok(())
                }
                Op::Nudge => Ok(()),
                Op::Many(_) => {
                    // `push_op` takes every one apart before this.
                    error!("a batch of ops reached the group whole; ignored");
                    Ok(())
                }
            };
            if let Err(e) = result {
                error!(cause = %e, "storage read failed while building a batch");
                self.failed.get_or_insert_with(|| e.to_string());
            }
        }
        stop
    }

    /// The last write to `key` not yet in sled: in this group, else in
    /// the newest unapplied group that wrote it (None: sled has the latest).
    fn unapplied<'a>(&'a self, group: &'a Group, key: &[u8]) -> Option<Option<&'a [u8]>> {
        if let Some(v) = group.changes.get(key) {
            return Some(v.as_deref());
        }
        self.unapplied
            .iter()
            .rev()
            .find_map(|(_, changes)| changes.get(key))
            .map(|v| v.as_deref())
    }

    fn exists(&self, group: &Group, key: &[u8]) -> Result<bool, StorageError> {
        match self.unapplied(group, key) {
            Some(value) => Ok(value.is_some()),
            None => Ok(self.db.contains_key(key)?),
        }
    }

    /// `sub`'s block `block` as of this group, read into it on first use.
    fn block<'g>(
        &self,
        group: &'g mut Group,
        sub: u32,
        block: u64,
    ) -> Result<&'g mut (Block, bool), StorageError> {
        use std::collections::hash_map::Entry;
        let key = keys::packed(sub, block);
        let loaded = match group.blocks.contains_key(&(sub, block)) {
            true => None,
            false => Some(match self.unapplied(group, &key) {
                Some(stored) => Block::decode(stored)?,
                None => Block::decode(self.db.get(key)?.as_deref())?,
            }),
        };
        Ok(match group.blocks.entry((sub, block)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert((loaded.unwrap_or_default(), false)),
        })
    }

    /// `sub`'s pending entry `seq` as of this group, as its own key would
    /// hold it, and whether it is packed in a block (else it is its own
    /// key). An entry is in one place only (see [`packed`]).
    fn pending_entry(
        &self,
        group: &mut Group,
        sub: u32,
        seq: u64,
    ) -> Result<Option<(Vec<u8>, bool)>, StorageError> {
        if let Some(value) = self.block(group, sub, packed::block_of(seq))?.0.get(seq) {
            return Ok(Some((value, true)));
        }
        Ok(self
            .get(group, &keys::pending(sub, seq))?
            .map(|value| (value, false)))
    }

    /// Removes `sub`'s pending entry `seq`, from its block if `packed`.
    fn remove_pending(
        &self,
        group: &mut Group,
        sub: u32,
        seq: u64,
        packed: bool,
    ) -> Result<(), StorageError> {
        if packed {
            let block = self.block(group, sub, packed::block_of(seq))?;
            block.1 |= block.0.remove(seq);
        } else {
            group.del(&keys::pending(sub, seq));
        }
        Ok(())
    }

    /// Stores `sub`'s pending entry `seq` as `value` in its own key, taking
    /// it out of its block if it was `packed` there (the own key is written
    /// to sled first, so readers find it in one place or both).
    fn put_pending(
        &self,
        group: &mut Group,
        sub: u32,
        seq: u64,
        value: Vec<u8>,
        packed: bool,
    ) -> Result<(), StorageError> {
        if packed {
            self.remove_pending(group, sub, seq, true)?;
        }
        group.put_owned(&keys::pending(sub, seq), value);
        Ok(())
    }

    fn get(&self, group: &Group, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.unapplied(group, key) {
            Some(value) => Ok(value.map(<[u8]>::to_vec)),
            None => Ok(self.db.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// Waits until every group handed to the flusher is applied to sled (or
    /// refused), so that a range scan of sled misses nothing.
    fn wait_applied(&mut self) {
        let flusher_alive = || self.flusher.as_ref().is_some_and(|f| !f.is_finished());
        self.progress.wait_for(self.lsn, flusher_alive);
        self.unapplied.clear();
    }

    fn publish(
        &mut self,
        group: &mut Group,
        p: super::PublishOp,
        now: u64,
    ) -> Result<(), StorageError> {
        if let Some(reason) = &self.failed {
            let _ = p.reply.send(Err(StorageError::Unavailable(reason.clone())));
            return Ok(());
        }
        let topic = p.topic.id;
        if let Some(dedup_key) = &p.dedup_key {
            // A publish earlier in this very batch wins over what is stored.
            let existing = match self.get(group, dedup_key) {
                Ok(v) => v,
                Err(e) => {
                    let _ = p.reply.send(Err(StorageError::Unavailable(e.to_string())));
                    return Err(e);
                }
            };
            if let Some(v) = existing {
                let seq = keys::be_u64(&v);
                let at = v.get(8..).and_then(keys::be_u64);
                if let (Some(seq), Some(at)) = (seq, at) {
                    let window = self.options.dedup_window.as_millis() as u64;
                    if now.saturating_sub(at) < window {
                        group.replies.push((
                            p.reply,
                            Published {
                                seq,
                                duplicate: true,
                            },
                        ));
                        return Ok(());
                    }
                }
            }
        }

        let digest = audit::payload_digest(&p.envelope.payload);
        let header = MessageHeader {
            publish_ms: p.publish_ms,
            expires_ms: p.expires_ms,
            digest: &digest,
            message_id: &p.envelope.message_id,
            message_type: &p.envelope.message_type,
            expiry_by_order: p.expiry_by_order,
        };
        let seq = self.append(group, topic, &p.targets, header, &p.envelope);
        if let Some(dedup_key) = &p.dedup_key {
            let mut value = seq.to_be_bytes().to_vec();
            value.extend_from_slice(&p.publish_ms.to_be_bytes());
            group.put(dedup_key, &value);
            group.put(&keys::dedup_by_time(p.publish_ms, dedup_key), &[]);
        }
        let event = publish_event(&p.envelope, &p.topic.name, digest, seq);
        self.record(group, event, now);
        group.publishes += 1;
        group.replies.push((
            p.reply,
            Published {
                seq,
                duplicate: false,
            },
        ));
        Ok(())
    }

    /// Gives a message the next sequence of `topic` and stores it for
    /// `targets`. With no target, nothing would ever release the topic copy:
    /// the sequence is taken but no copy stored.
    fn append(
        &mut self,
        group: &mut Group,
        topic: u32,
        targets: &[Arc<SubState>],
        header: MessageHeader<'_>,
        envelope: &crate::proto::Envelope,
    ) -> u64 {
        let next = self.next_seq.entry(topic).or_insert(1);
        let seq = *next;
        *next += 1;
        group.next_seqs.insert(topic, seq + 1);
        if let Some(floor) = self.seq_floors.get_mut(&topic) {
            if seq.saturating_add(SEQ_FLOOR_STEP / 2) >= *floor {
                *floor = seq.saturating_add(SEQ_FLOOR_STEP);
                group.seq_floors.insert(topic, *floor);
            }
        }
        if !targets.is_empty() {
            let value = StoredMessage::encode_value_of(header, envelope);
            // Decoded from what is stored, so it is what a read would give;
            // not built when no target has room for it.
            let message = if targets.iter().any(|sub| sub.wants_fresh()) {
                StoredMessage::decode(topic, seq, &value).ok().map(Arc::new)
            } else {
                None
            };
            let indexed_expiry = header.expires_ms != 0 && !header.expiry_by_order;
            // One receiver and no expiry-index entry: no topic copy; the
            // body goes to a segment file and its pending entry refers to
            // it (see [`Pending`]).
            let inline = targets.len() == 1 && !indexed_expiry;
            let mut inline_entry = None;
            if let Some(sub) = targets.first().filter(|_| inline) {
                let (segment, offset) = self.placer.place(sub.id, value.len());
                let body = BodyRef {
                    segment,
                    offset,
                    // Messages are bounded by `max_message_bytes`, far below 4 GiB.
                    len: value.len() as u32,
                    crc: crc32fast::hash(&value),
                };
                inline_entry = Some((body, Pending::default().encode_ref(&body, &value)));
                group.place_body(sub.id, seq, &body);
                group.put_owned(&keys::body(segment, offset), value);
            } else {
                group.put_owned(&keys::message(topic, seq), value);
            }
            let empty = Pending::default().encode();
            for sub in targets {
                // The first since start may follow entries stored before
                // it (or by an earlier process): claim only `seq - 1`, so
                // a dispatcher takes it only once it has read up to it.
                let after = self
                    .last_stored
                    .insert(sub.id, seq)
                    .unwrap_or(seq.saturating_sub(1));
                if let Some(message) = message.as_ref().filter(|_| sub.wants_fresh()) {
                    group.fresh.push((sub.clone(), after, message.clone()));
                }
                match inline_entry.take() {
                    Some((body, entry)) => {
                        // Packed into its block; its own key if the block
                        // cannot be read (the store then fails anyway).
                        let packed = match self.block(group, sub.id, packed::block_of(seq)) {
                            Ok(block) => {
                                let packed = block.0.insert(seq, &entry);
                                block.1 |= packed;
                                packed
                            }
                            Err(e) => {
                                warn!(cause = %e, segment = body.segment, "a block of pending entries is unreadable");
                                false
                            }
                        };
                        if !packed {
                            group.put_owned(&keys::pending(sub.id, seq), entry);
                        }
                    }
                    None => group.put(&keys::pending(sub.id, seq), &empty),
                }
                group.delta(sub, 1, 0);
                group.woken.insert(sub.id, sub.clone());
            }
            if indexed_expiry {
                group.put(&keys::expiry(header.expires_ms, topic, seq), &[]);
            }
        }
        group.committed.insert(topic, seq);
        seq
    }

    /// Tells the sender of a dead-lettered or expired message, on its report
    /// topic, in the same batch as the dead letter.
    #[allow(clippy::too_many_arguments)]
    fn report(
        &mut self,
        group: &mut Group,
        message: &StoredMessage,
        topic: &TopicState,
        sub: &SubState,
        owner: &str,
        reason: DeadReason,
        attempts: u32,
        now: u64,
    ) {
        use prost::Message;
        let Ok(original) = crate::proto::Envelope::decode(message.envelope.clone()) else {
            return; // unreadable: nobody to tell
        };
        let Some((report_topic, report_sub)) = self.reports.get(&original.sender).cloned() else {
            return;
        };
        if report_topic.id == topic.id {
            return; // never report on reports
        }
        let time = crate::broker::timestamp_from_ms(now);
        let report = crate::proto::DeliveryReport {
            message_id: message.message_id.clone(),
            message_type: message.message_type.clone(),
            sequence: message.seq,
            topic: topic.name.clone(),
            subscription: sub.name.clone(),
            owner_agency: owner.to_string(),
            reason: reason.as_str().to_string(),
            attempts,
            time: Some(time),
        };
        let envelope = crate::proto::Envelope {
            message_id: format!("report:{}:{}:{}", topic.name, message.seq, sub.name),
            message_type: REPORT_TYPE.into(),
            payload: report.encode_to_vec().into(),
            correlation_id: original.correlation_id,
            causation_id: message.message_id.clone(),
            created_at: Some(time),
            marking: crate::proto::Marking::Official as i32,
            sender: REPORT_SENDER.into(),
            ..Default::default()
        };
        let digest = audit::payload_digest(&envelope.payload);
        let header = MessageHeader {
            publish_ms: now,
            expires_ms: now.saturating_add(REPORT_RETENTION_MS),
            digest: &digest,
            message_id: &envelope.message_id,
            message_type: REPORT_TYPE,
            expiry_by_order: false,
        };
        let seq = self.append(group, report_topic.id, &[report_sub], header, &envelope);
        let mut event = publish_event(&envelope, &report_topic.name, digest, seq);
        event.reason = format!("delivery report for {}", message.message_id);
        self.record(group, event, now);
    }

    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        group: &mut Group,
        sub: &Arc<SubState>,
        topic: &Arc<TopicState>,
        message: &StoredMessage,
        outcome: Outcome,
        agency: String,
        now: u64,
    ) -> Result<(), StorageError> {
        let seq = message.seq;
        let Some((value, packed)) = self.pending_entry(group, sub.id, seq)? else {
            return Ok(()); // already settled (e.g. expired and acked at once)
        };
        let entry = EntryState::of(&value);
        self.remove_pending(group, sub.id, seq, packed)?;
        if let Some(body) = &entry.body {
            group.release_body(body);
        }
        let mut event = match outcome {
            Outcome::Ack => AuditEvent::new(EventKind::Ack, agency),
            Outcome::DeadLetter { reason, attempts } => {
                let kind = match reason {
                    DeadReason::Expired => EventKind::Expired,
                    _ => EventKind::DeadLetter,
                };
                let mut event = AuditEvent::new(kind, agency);
                event.reason = reason.as_str().to_string();
                event.attempt = attempts;
                event
            }
        }
        .about(message);
        event.topic = topic.name.clone();
        event.subscription = sub.name.clone();
        let owner = match outcome {
            Outcome::Ack => None,
            Outcome::DeadLetter { .. } => Some(event.agency.clone()),
        };
        self.record(group, event, now);
        match outcome {
            Outcome::Ack => group.delta(sub, -1, 0),
            Outcome::DeadLetter { reason, attempts } => {
                let dead = DeadLetter {
                    reason,
                    attempts,
                    dead_ms: now,
                    message: message.clone(),
                };
                group.put(&keys::dead(sub.id, seq), &dead.encode());
                group.delta(sub, -1, 1);
                let owner = owner.unwrap_or_default();
                self.report(group, message, topic, sub, &owner, reason, attempts, now);
            }
        }
        if entry.own_copy {
            return Ok(()); // no topic copy to release
        }
        self.release(group, sub.id, topic, seq, Some(message))
    }

    /// Removes the topic copy of `seq` (and its expiry-index entry, if it
    /// has one) unless a subscription other than `sub` still has it
    /// pending. Without `known` the copy is read to find its expiry entry;
    /// an expiry entry left behind is dropped by the sweep when its time
    /// comes.
    fn release(
        &self,
        group: &mut Group,
        sub: u32,
        topic: &TopicState,
        seq: u64,
        known: Option<&StoredMessage>,
    ) -> Result<(), StorageError> {
        for other in topic.subs.iter().filter(|s| s.id != sub) {
            if self.exists(group, &keys::pending(other.id, seq))? {
                return Ok(()); // still wanted by another subscription
            }
        }
        let key = keys::message(topic.id, seq);
        let indexed_expiry = match known {
            Some(message) => message.indexed_expiry(),
            None => self
                .get(group, &key)?
                .and_then(|v| StoredMessage::indexed_expiry_of(&v)),
        };
        group.del(&key);
        if let Some(at) = indexed_expiry {
            group.del(&keys::expiry(at, topic.id, seq));
        }
        Ok(())
    }

    /// Appends an audit record to the group (when the audit log is on).
    fn record(&mut self, group: &mut Group, event: AuditEvent, now: u64) {
        if let Some(chain) = self.audit.as_mut() {
            chain.append_to(event, now, &mut group.audit);
        }
    }

    /// Finds expired messages and stale dedup entries; prunes old audit records.
    fn sweep(&mut self, group: &mut Group, now: u64) -> Result<(), StorageError> {
        if let Some(chain) = &self.audit {
            let every =
                Duration::from_millis(chain.retention_ms() / 16).clamp(PRUNE_MIN, PRUNE_MAX);
            if self.audit_pruned_at.is_none_or(|at| at.elapsed() >= every) {
                self.audit_pruned_at = Some(Instant::now());
                let cutoff = now.saturating_sub(chain.retention_ms());
                let plan = audit::read_anchor(&self.db).and_then(|anchor| {
                    let anchored_at = anchor.map_or(0, |a| a.first_seq);
                    audit::segments::prune_plan(&self.dir, anchored_at, cutoff, PRUNE_SEGMENTS)
                });
                match plan {
                    Ok(Some(anchor)) => {
                        debug!(first_kept = anchor.first_seq, "audit records pruned");
                        group.prune_audit_before = Some(anchor.first_seq);
                        group.put(keys::AUDIT_ANCHOR, &prost::Message::encode_to_vec(&anchor));
                    }
                    Ok(None) => {}
                    Err(e) => warn!(cause = %e, "audit pruning failed"),
                }
            }
        }
        // Expiry: tell each subscription still holding an expired message; its
        // dispatcher dead-letters it (it knows what is in flight).
        let from = keys::expiry(self.swept_until_ms, 0, 0);
        let to = keys::expiry(now, 0, 0);
        let mut last = None;
        let mut count = 0;
        for item in self.db.range(from..to) {
            let (key, _) = item?;
            let Some((expires_ms, topic_id, seq)) = keys::parse_expiry(&key) else {
                continue;
            };
            count += 1;
            last = Some(expires_ms);
            if count > SWEEP_LIMIT {
                break;
            }
            let Some(topic) = self.topics.get(&topic_id) else {
                continue;
            };
            let Some(value) = self.db.get(keys::message(topic_id, seq))? else {
                group.del(&key); // message already gone
                continue;
            };
            self.expired(group, topic, seq, &value)?;
        }
        self.swept_until_ms = match last {
            Some(at) if count > SWEEP_LIMIT => at,
            _ => now,
        };
        self.sweep_by_order(group, now, SWEEP_LIMIT.saturating_sub(count))?;

        // Dedup window: forget ids published before the window.
        let window = self.options.dedup_window.as_millis() as u64;
        let cutoff = now.saturating_sub(window);
        let from = [keys::DEDUP_BY_TIME];
        let to = keys::dedup_by_time(cutoff, &[]);
        for item in self.db.range(from.to_vec()..to).take(SWEEP_LIMIT) {
            let (key, _) = item?;
            let Some((at, dedup_key)) = keys::parse_dedup_by_time(&key) else {
                continue;
            };
            if let Some(v) = self.db.get(dedup_key)? {
                if v.get(8..).and_then(keys::be_u64) == Some(at) {
                    group.del(dedup_key);
                }
            }
            group.del(&key);
        }
        Ok(())
    }

    /// Tells each subscription still holding message `seq` (stored as
    /// `value`) that it has expired; its dispatcher dead-letters it (it
    /// knows what is in flight).
    fn expired(
        &self,
        group: &mut Group,
        topic: &TopicState,
        seq: u64,
        value: &[u8],
    ) -> Result<(), StorageError> {
        let message = Arc::new(StoredMessage::decode(topic.id, seq, value)?);
        for sub in &topic.subs {
            if self.exists(group, &keys::pending(sub.id, seq))? {
                sub.push_expired(message.clone());
                group.woken.insert(sub.id, sub.clone());
            }
        }
        Ok(())
    }

    /// Expiry from topic retention: such messages have no expiry-index
    /// entry (two tree operations a message saved). A topic's later
    /// sequences were published no earlier, so they expire no earlier: each
    /// topic is walked in sequence order from where the last sweep stopped,
    /// up to the first message not yet expired. Messages with an index
    /// entry, or none, are stepped over. If the retention is shortened or
    /// the clock steps back, a message can wait behind an older one for at
    /// most that difference; a dispatcher never delivers an expired
    /// message meanwhile.
    fn sweep_by_order(
        &mut self,
        group: &mut Group,
        now: u64,
        mut budget: usize,
    ) -> Result<(), StorageError> {
        let bodies = self.bodies.clone();
        let topics: Vec<Arc<TopicState>> = self
            .topics
            .values()
            .filter(|t| !t.subs.is_empty())
            .cloned()
            .collect();
        for topic in topics {
            // Only what is applied to the tree: sequences taken by this
            // group are above every stored one and are not passed.
            let from = self.order_swept.get(&topic.id).copied().unwrap_or(0);
            let range = keys::message(topic.id, from)..=keys::message(topic.id, u64::MAX);
            let cursor = walk_by_order(&self.db, range, from, &mut budget, |seq, _, value| {
                match expired_by_order(value, now) {
                    Some(false) => return Ok(Walk::Stop),
                    Some(true) => self.expired(group, &topic, seq, value)?,
                    None => {}
                }
                Ok(Walk::Past)
            })?;
            self.order_swept.insert(topic.id, cursor);
            // Inline messages have no topic copy: walk each subscription's
            // pending entries the same way, stepping over those whose
            // message is the topic copy (walked above); then its packed
            // entries (in sequence order too, so their own walk).
            for sub in &topic.subs {
                let from = self.order_swept_inline.get(&sub.id).copied().unwrap_or(0);
                let range = keys::pending(sub.id, from)..=keys::pending(sub.id, u64::MAX);
                let cursor =
                    walk_by_order(&self.db, range, from, &mut budget, |seq, key, value| {
                        // The group's own writes come first: an entry it has
                        // removed (acked, dead-lettered) is not pending any more.
                        let value = match self.unapplied(group, key) {
                            Some(None) => return Ok(Walk::Past),
                            Some(Some(newer)) => Cow::Owned(newer.to_vec()),
                            None => Cow::Borrowed(value),
                        };
                        self.expire_by_order(group, &bodies, sub, seq, &value, now)
                    })?;
                self.order_swept_inline.insert(sub.id, cursor);
                let from = self.order_swept_packed.get(&sub.id).copied().unwrap_or(0);
                let cursor = self.walk_packed(group, &bodies, sub, from, &mut budget, now)?;
                self.order_swept_packed.insert(sub.id, cursor);
            }
        }
        Ok(())
    }

    /// [`Self::sweep_by_order`] over `sub`'s packed entries from `from`:
    /// returns where the next walk starts.
    fn walk_packed(
        &self,
        group: &mut Group,
        bodies: &bodies::Reader,
        sub: &Arc<SubState>,
        from: u64,
        budget: &mut usize,
        now: u64,
    ) -> Result<u64, StorageError> {
        let mut cursor = from;
        let range = keys::packed(sub.id, packed::block_of(from))..=keys::packed(sub.id, u64::MAX);
        for item in self.db.range(range) {
            let (key, _) = item?;
            let Some(block) = keys::seq_of(&key) else {
                continue;
            };
            // The group's own writes come first.
            let (stored, _) = self.block(group, sub.id, block)?;
            let entries: Vec<(u64, Vec<u8>)> =
                stored.entries().filter(|(seq, _)| *seq >= from).collect();
            for (seq, value) in entries {
                if *budget == 0 {
                    return Ok(cursor);
                }
                *budget -= 1;
                if let Walk::Stop = self.expire_by_order(group, bodies, sub, seq, &value, now)? {
                    return Ok(cursor);
                }
                cursor = seq + 1;
            }
        }
        Ok(cursor)
    }

    /// One pending entry of `sub` in a by-order expiry walk: tells its
    /// subscription if its message has expired by order.
    fn expire_by_order(
        &self,
        group: &mut Group,
        bodies: &bodies::Reader,
        sub: &Arc<SubState>,
        seq: u64,
        value: &[u8],
        now: u64,
    ) -> Result<Walk, StorageError> {
        let (head, body) = match Pending::split(value)?.1 {
            Body::TopicCopy => return Ok(Walk::Past),
            Body::Inline(stored) => (stored, None),
            Body::Segment(body, head) => (head, Some(body)),
        };
        match expired_by_order(head, now) {
            Some(false) => return Ok(Walk::Stop),
            Some(true) => {
                let stored = match body {
                    None => Some(Cow::Borrowed(head)),
                    // Not fatal to the store: the dispatcher meets the same
                    // error when it reads the entry, and names it.
                    // Moved by a compaction in this very group: not in its
                    // file yet.
                    Some(body) => {
                        match self.unapplied(group, &keys::body(body.segment, body.offset)) {
                            Some(Some(moved)) => Some(Cow::Owned(moved.to_vec())),
                            _ => match bodies.read_one(body) {
                                Ok(read) => read.map(Cow::Owned),
                                Err(e) => {
                                    warn!(cause = %e, seq, "an expired message's body is unreadable");
                                    None
                                }
                            },
                        }
                    }
                };
                // A body whose file is gone cannot be delivered either: the
                // dispatcher drops its entry when it reads it.
                if let Some(stored) = stored {
                    let message = StoredMessage::decode(sub.topic, seq, &stored)?;
                    sub.push_expired(Arc::new(message));
                    group.woken.insert(sub.id, sub.clone());
                }
            }
            None => {}
        }
        Ok(Walk::Past)
    }

    /// Hands the messages of topics that deliver before sync to their
    /// dispatchers now, as their group goes to be synced, and leaves the
    /// rest in `fresh` for after the sync. A message whose sequence is not
    /// below its topic's durable floor waits for the sync too: a crash could
    /// otherwise hand its sequence to another message after the restart.
    /// Should a held message come after one handed over early, the
    /// dispatcher sees the gap and reads the store ([`SubState::take_fresh`]).
    /// Returns whether it handed any over.
    fn deliver_early(&self, fresh: &mut Vec<(Arc<SubState>, u64, Arc<StoredMessage>)>) -> bool {
        let (early, held): (Vec<_>, Vec<_>) = fresh.drain(..).partition(|(sub, _, message)| {
            self.topics
                .get(&sub.topic)
                .is_some_and(|topic| topic.deliverable_early(message.seq))
        });
        *fresh = held;
        let any = !early.is_empty();
        flusher::hand_over(early);
        any
    }

    /// Depth and dead letters of `sub` as of the groups built so far.
    fn counts(&self, sub: &SubState) -> (u64, u64) {
        self.applied
            .get(&sub.id)
            .copied()
            .unwrap_or_else(|| (sub.depth(), sub.dead_letters()))
    }

    /// Hands the group to the flusher, which makes it durable, applies it
    /// to sled, then answers and wakes.
    fn finish(&mut self, group: Group) {
        let Group {
            mut changes,
            replies,
            syncs,
            checkpoint,
            committed,
            woken,
            deltas,
            next_seqs,
            seq_floors,
            publishes,
            audit,
            prune_audit_before,
            fresh,
            body_deltas,
            blocks,
            ..
        } = group;
        for ((sub, block), (entries, changed)) in blocks {
            if changed {
                let stored = (!entries.is_empty()).then(|| entries.encode());
                changes.insert(keys::packed(sub, block).to_vec(), stored);
            }
        }
        let mut put = |key: &[u8], value: &[u8]| {
            changes.insert(key.to_vec(), Some(value.to_vec()));
        };
        for (key, value) in audit.finish() {
            put(&key, &value);
        }
        for (topic, next) in next_seqs {
            put(&keys::next_seq(topic), &next.to_be_bytes());
        }
        for (topic, floor) in &seq_floors {
            put(&keys::seq_floor(*topic), &floor.to_be_bytes());
        }
        let mut counts = Vec::with_capacity(deltas.len());
        for (sub, depth, dead) in deltas.into_values() {
            let (old_depth, old_dead) = self.counts(&sub);
            let depth = apply_delta(old_depth, depth);
            let dead = apply_delta(old_dead, dead);
            let mut value = depth.to_be_bytes().to_vec();
            value.extend_from_slice(&dead.to_be_bytes());
            put(&keys::counters(sub.id), &value);
            counts.push((sub, depth, dead));
        }
        // Live counts of the message segments the group touched; a segment
        // nothing references any more goes once the group is applied, unless
        // bodies are still being placed in it.
        let mut remove_segments = Vec::new();
        for (segment, delta) in body_deltas {
            let mut info = self.segments.get(&segment).copied().unwrap_or_default();
            info.count = apply_delta(info.count, delta.count);
            if let Some((sub, first_seq, end)) = delta.placed {
                let extent = info.extent.get_or_insert(bodies::Extent {
                    live_bytes: 0,
                    size: 0,
                    sub,
                    first_seq,
                });
                extent.first_seq = extent.first_seq.min(first_seq);
                extent.size = extent.size.max(end);
            }
            if let Some(extent) = info.extent.as_mut() {
                extent.live_bytes = apply_delta(extent.live_bytes, delta.bytes);
                if let Some(floor) = delta.first_seq_at_least {
                    extent.first_seq = extent.first_seq.max(floor);
                }
            }
            if info.count == 0 {
                self.segments.remove(&segment);
                self.compact_tried.remove(&segment);
                self.sparse_since.remove(&segment);
                changes.insert(keys::body_live(segment).to_vec(), None);
                if !self.placer.is_current(segment) {
                    remove_segments.push(segment);
                }
            } else {
                self.segments.insert(segment, info);
                changes.insert(keys::body_live(segment).to_vec(), Some(info.encode()));
            }
        }
        // Segments a subscription has moved on from since the last group:
        // those emptied while they were being written go now.
        for segment in self.placer.take_retired() {
            if !self.segments.contains_key(&segment) && !remove_segments.contains(&segment) {
                remove_segments.push(segment);
            }
        }
        let record = if changes.is_empty() || self.failed.is_some() {
            None
        } else {
            // Every lsn handed out must reach the journal: recovery stops
            // at a gap.
            self.lsn += 1;
            let changes = Arc::new(changes);
            self.unapplied.push_back((self.lsn, changes.clone()));
            Some((self.lsn, changes))
        };
        let needs_flush = record.is_some() || !syncs.is_empty() || checkpoint;
        let mut fresh = fresh;
        let handed_early = self.failed.is_none()
            && !fresh.is_empty()
            && !self.seq_floors.is_empty()
            && self.deliver_early(&mut fresh);
        let applied = Applied {
            checkpoint,
            record,
            replies,
            syncs,
            committed: committed
                .into_iter()
                .filter_map(|(id, seq)| self.topics.get(&id).map(|t| (t.clone(), seq)))
                .collect(),
            woken: woken.into_values().collect(),
            fresh,
            seq_floors: seq_floors
                .into_iter()
                .filter_map(|(id, floor)| self.topics.get(&id).map(|t| (t.clone(), floor)))
                .collect(),
            counts,
            publishes,
            needs_flush,
            prune_audit_before,
            remove_segments,
        };
        if let Some(reason) = &self.failed {
            applied.refuse(reason);
            return;
        }
        for (sub, depth, dead) in &applied.counts {
            self.applied.insert(sub.id, (*depth, *dead));
        }
        // Nothing else waiting: complete it here rather than wake the
        // flusher thread. Unless the group handed messages over before its
        // sync: the flusher syncs it while this thread goes on storing (and
        // handing over) what comes next, so a slow sync holds up no delivery
        // (`lat 5000 1024 rate=1000`, six alternating pairs: publish→deliver
        // p50 273 against 301 µs, p99 684 against 867 µs; the publisher's
        // answer p50 704 against 643 µs).
        let applied = if self.rx.is_empty() && !handed_early {
            match self.shared.complete_here(applied) {
                None => return,
                Some(applied) => applied,
            }
        } else {
            applied
        };
        self.shared
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let sent = match &self.durable {
            Some(durable) => durable.send(applied).map_err(|e| e.0),
            None => Err(applied),
        };
        if let Err(applied) = sent {
            self.shared
                .in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            // The flusher is gone: nothing more can be made durable.
            let reason = "the flusher thread stopped".to_string();
            applied.refuse(&reason);
            self.failed.get_or_insert(reason);
        }
    }
}

/// Adds `op` to `ops`, the ops of an [`Op::Many`] one by one.
fn push_op(ops: &mut Vec<Op>, op: Op) {
    match op {
        Op::Many(many) => {
            for op in many {
                push_op(ops, op);
            }
        }
        op => ops.push(op),
    }
}

/// What a pending entry carries of its message.
#[derive(Debug, Clone, Copy)]
pub(super) struct EntryState {
    /// The message is inline or in a segment file: there is no topic copy.
    pub own_copy: bool,
    /// Where its body lies in a segment file.
    pub body: Option<BodyRef>,
}

impl EntryState {
    pub(super) fn of(value: &[u8]) -> Self {
        Self {
            own_copy: Pending::is_inline(value),
            body: Pending::body_ref(value),
        }
    }
}

/// What a by-order expiry walk does after one entry.
enum Walk {
    /// Go past it to the next.
    Past,
    /// Stop before it: it has not expired, nor has anything after it.
    Stop,
}

/// Walks `range` (a topic's copies, or a subscription's pending entries)
/// in sequence order from `from`, one entry of `budget` each, handing each
/// to `visit` (sequence, key, value); returns where the next sweep starts.
fn walk_by_order(
    db: &sled::Db,
    range: std::ops::RangeInclusive<[u8; 13]>,
    from: u64,
    budget: &mut usize,
    mut visit: impl FnMut(u64, &[u8], &[u8]) -> Result<Walk, StorageError>,
) -> Result<u64, StorageError> {
    let mut cursor = from;
    for item in db.range(range) {
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        let (key, value) = item?;
        let Some(seq) = keys::seq_of(&key) else {
            continue;
        };
        if let Walk::Stop = visit(seq, &key, &value)? {
            break;
        }
        cursor = seq + 1;
    }
    Ok(cursor)
}

/// For a stored message value that expires by order: whether it has
/// expired at `now` (None: it has an index entry, or no expiry).
fn expired_by_order(stored: &[u8], now: u64) -> Option<bool> {
    StoredMessage::expiry_by_order_of(stored)
        .then(|| StoredMessage::expires_ms_of(stored).is_none_or(|at| at <= now))
}

fn apply_delta(value: u64, delta: i64) -> u64 {
    if delta >= 0 {
        value.saturating_add(delta as u64)
    } else {
        let result = value.checked_sub(delta.unsigned_abs());
        if result.is_none() {
            warn!(value, delta, "counter would go below zero; clamped");
        }
        result.unwrap_or(0)
    }
}

/// The type, sender and lifetime of delivery reports.
const REPORT_TYPE: &str = "joinery.v1.DeliveryReport";
const REPORT_SENDER: &str = "joinery";
const REPORT_RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;

/// The audit record of `envelope`, stored as `seq` of `topic`.
fn publish_event(
    envelope: &crate::proto::Envelope,
    topic: &str,
    digest: [u8; audit::HASH_LEN],
    seq: u64,
) -> AuditEvent {
    let mut event = AuditEvent::new(EventKind::Publish, envelope.sender.clone());
    event.topic = topic.to_string();
    event.message_id = envelope.message_id.clone();
    event.message_type = envelope.message_type.clone();
    event.digest = Some(digest);
    event.sequence = seq;
    event
}
