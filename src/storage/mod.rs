//! Durable storage on sled 0.34: topics, subscriptions, dead letters, the
//! dedup index and the expiry index, all in one sled tree.
//!
//! # Layout (see [`keys`])
//! A message is stored **once per topic** (`m topic seq`) and referenced by a
//! small pending entry per subscription that should receive it (`p sub seq`,
//! 12 bytes: attempts and not-before). Acking removes the pending entry; the
//! topic copy is removed when no other subscription of the topic still has a
//! pending entry for it (a few point lookups, no reference counts to keep in
//! step). Dead letters copy the message (`d sub seq`) so the topic copy can go;
//! an operator's redrive ([`operator`]) puts the copy back with a pending entry.
//! Keys are big-endian, so a subscription's pending entries iterate in
//! publish order and the expiry index in time order.
//!
//! A message with exactly one receiving subscription and no expiry-index
//! entry (the common case: one owner, retention expiry) has no topic copy:
//! its body goes to a segment file ([`bodies`]) and that subscription's
//! pending entry holds, after its 12 bytes, a 42-byte reference to it
//! ([`Pending`], [`bodies::BodyRef`]). Storing it is then one small tree
//! insert and acking it one removal, and sled never copies its bytes.
//! Stores of formats 2 and 3 held such a message **inline** in the entry
//! instead; those entries are still read. Everything that reads a pending
//! entry takes any form; a requeue keeps the reference or inline message;
//! a dead letter copies the message into sled as any other; a redrive puts
//! it back as a topic copy.
//!
//! Expiry: a message whose expiry is its topic's retention (most of them)
//! has no expiry-index entry; the sweep walks each topic's messages in
//! sequence order, where expiry times only grow, and each subscription's
//! pending entries the same way for the ones without a topic copy (the
//! reference keeps the head of the stored value, so the sweep reads no
//! segment file until it finds an expired one). Earlier expiries (an
//! envelope's `expires_at`) are in the expiry index (`x`).
//!
//! Message bodies and audit records are not in sled: both travel in the
//! journal and are written to segment files of their own once it is synced
//! ([`bodies`]; [`crate::audit::segments`], in blocks of consecutive
//! records). sled copies a tree node on every insert and writes every value
//! into its log, so the fewer and smaller the keys a message costs, the
//! faster the writer.
//!
//! Depth and dead-letter counts are kept per subscription (`k sub`), updated in
//! the same batch as the entries they count, never computed by scanning.
//!
//! # Writes: one writer thread, group commit
//! Every mutation goes to a single writer thread ([`writer`]) as an [`Op`]. It
//! takes everything queued (up to `max_batch` operations) and builds it into
//! one group of writes; the flusher thread appends the group to the
//! [`journal`] with one `pwrite` and one `fdatasync`, and only then applies
//! it to sled and answers the group's publishes and wakes its subscriptions.
//! The journal gives a group its atomicity across a crash: a publish's
//! message, pending entries and dedup entry are in the journal together
//! before sled sees any of them, and a group sled holds only in part at a
//! crash is replayed whole at open. Publishes that arrive during a sync wait
//! for the next one, so under load one sync covers many publishes. sled
//! itself is flushed and fsynced only at checkpoints (its own flush uses
//! `sync_file_range`, which does not flush the disk's write cache, and it
//! writes large values to blob files without syncing them).
//!
//! # Invariants
//! - A publish is answered OK only after the journal sync covering it, and
//!   after its writes are applied to sled.
//! - A subscription is only ever shown messages at or below its topic's
//!   `committed` sequence, i.e. durable ones, unless its topic delivers
//!   before sync (`deliver_before_sync`): then a message goes to the
//!   dispatchers once it is in a group, if its sequence is below the
//!   topic's durable floor (`S topic`), which the writer keeps raised ahead
//!   of the sequences it hands out, so that none delivered and then lost
//!   in a crash is ever handed out again.
//! - Reads (`scan_pending`, `load_message`, ...) are blocking sled calls:
//!   call them from `spawn_blocking`.

pub mod bodies;
mod journal;
pub mod keys;
mod operator;
pub mod packed;
pub mod records;
mod usage;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{info, warn};

pub use operator::Redriven;
pub use records::{DeadLetter, DeadReason, MessageHeader, Pending, StoredMessage};
pub use usage::{usage, KindUsage, Usage};

use crate::audit::{AuditEvent, Chain};

/// A map keyed by the store's own ids (topics, subscriptions, segments,
/// blocks), looked up several times per message by the writer: hashed with
/// foldhash rather than SipHash, since no key comes from a client.
pub(crate) type IdMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("failed to open the data directory {dir}")]
    Open {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the data directory {dir} is in use by another process (sled could not lock it)")]
    Locked { dir: PathBuf },
    #[error("the data directory {dir} could not be opened: sled panicked while reading it ({reason}); move it aside or restore it from a backup")]
    OpenPanicked { dir: PathBuf, reason: String },
    #[error("storage i/o failed on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage operation failed")]
    Sled(#[from] sled::Error),
    #[error("stored data is corrupt: {what}")]
    Corrupt { what: String },
    #[error("subscription {name:?} is stored for topic {stored:?} but configured for topic {configured:?}; give the subscription a new name")]
    SubscriptionMoved {
        name: String,
        stored: String,
        configured: String,
    },
    #[error("too many topics and subscriptions for one data directory")]
    IdsExhausted,
    /// A write could not be made durable; the reason is logged by the writer.
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
    #[error("storage is shut down")]
    Closed,
}

/// Settings of the store (from `[broker]`).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub cache_capacity: u64,
    pub dedup_window: Duration,
    pub max_batch: usize,
    /// Audit log retention; None turns the audit log off.
    pub audit_retention: Option<Duration>,
    /// Size at which an audit segment file is closed and the next begun
    /// (pruning removes whole segments); normally
    /// [`crate::audit::segments::SEGMENT_BYTES`].
    pub audit_segment_bytes: u64,
    /// Size past which a message segment is closed and the next begun
    /// (normally [`bodies::SEGMENT_BYTES`]).
    pub body_segment_bytes: u64,
    /// How long a message segment stays at most half live before it is
    /// compacted (normally [`bodies::COMPACT_AFTER`]): a segment being
    /// consumed passes through half live on its way to empty.
    pub compact_after: Duration,
    /// (agency, report topic, report subscription): where delivery reports
    /// about the agency's messages go.
    pub reports: Vec<(String, String, String)>,
    /// Topics whose messages go to their dispatchers as soon as they are
    /// stored, before their group is synced (`deliver_before_sync`).
    pub deliver_before_sync: Vec<String>,
}

/// A topic as the store sees it.
#[derive(Debug)]
pub struct TopicState {
    pub id: u32,
    pub name: String,
    /// Subscriptions bound to this topic.
    pub subs: Vec<Arc<SubState>>,
    /// Highest sequence that is durable (0 = none yet).
    committed: AtomicU64,
    /// Whether its messages are handed to the dispatchers before their
    /// group is synced.
    pub deliver_before_sync: bool,
    /// Durable sequence floor ([`keys::SEQ_FLOOR`]): a sequence below it may
    /// be delivered before its sync, as no later process hands it out again.
    seq_floor: AtomicU64,
}

impl TopicState {
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Its durable sequence floor (0: none).
    fn seq_floor(&self) -> u64 {
        self.seq_floor.load(Ordering::Acquire)
    }

    /// Whether the message with sequence `seq` may go to the dispatchers
    /// before its group is synced.
    fn deliverable_early(&self, seq: u64) -> bool {
        self.deliver_before_sync && seq < self.seq_floor()
    }
}

/// A subscription as the store sees it.
#[derive(Debug)]
pub struct SubState {
    pub id: u32,
    pub name: String,
    pub topic: u32,
    depth: AtomicU64,
    dead_letters: AtomicU64,
    /// Woken after a flush that made new messages or expiries visible.
    pub notify: Notify,
    /// Deliveries awaiting ack, as last reported by the dispatcher.
    in_flight: AtomicU64,
    /// Publish time of the oldest pending message the dispatcher holds
    /// (ms since epoch; 0: none).
    oldest_pending_ms: AtomicU64,
    expired: Mutex<Vec<Arc<StoredMessage>>>,
    /// Messages just made durable for it, handed to its dispatcher from
    /// memory (see [`Fresh`]).
    fresh: Mutex<Fresh>,
    /// Set while [`Fresh`] is full, so the writer need not build entries
    /// that would be dropped (a hint: dropping one is always safe).
    fresh_full: AtomicBool,
}

/// Most messages a subscription's [`Fresh`] holds: about one dispatcher
/// refill. It holds them even while the dispatcher takes none (no
/// consumer, or a backlog), so this and the next bound what it costs in
/// memory per subscription.
const FRESH_MAX_MESSAGES: usize = 512;
/// Most envelope bytes a subscription's [`Fresh`] holds.
const FRESH_MAX_BYTES: usize = 512 << 10;

/// Messages just made durable for a subscription, in sequence order, so that
/// its dispatcher need not read them back from sled.
///
/// Each entry carries `after`: the sequence of the message stored for the
/// subscription just before it by this process (for the first, one below
/// its own: entries stored before start are unknown). No pending entry of the
/// subscription lies strictly between the two, so for a dispatcher whose
/// store cursor `c` satisfies `after < c <= seq`, the entry is exactly the
/// next pending entry it would read, as written by the publish (first
/// attempt, no delay). Entries that do not satisfy this are of no use to it
/// and it reads the store instead; when the list is full, new entries are
/// dropped, which leaves such a gap. Only pending entries at or above the
/// cursor matter, and only the dispatcher itself removes those (purge), so
/// an entry cannot go stale behind its back.
#[derive(Debug, Default)]
struct Fresh {
    entries: VecDeque<(u64, Arc<StoredMessage>)>,
    bytes: usize,
}

impl SubState {
    /// Messages pending (published to it, neither acked nor dead-lettered).
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }

    /// Messages in its dead letters.
    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.load(Ordering::Relaxed)
    }

    /// Deliveries awaiting ack.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Age of the oldest pending message (zero when there is none).
    pub fn oldest_pending_age(&self) -> Duration {
        match self.oldest_pending_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            at => Duration::from_millis(now_ms().saturating_sub(at)),
        }
    }

    /// Called by the dispatcher with what it holds.
    pub fn report(&self, in_flight: u64, oldest_pending_ms: u64) {
        self.in_flight.store(in_flight, Ordering::Relaxed);
        self.oldest_pending_ms
            .store(oldest_pending_ms, Ordering::Relaxed);
    }

    /// Messages the expiry sweep found past their expiry, to be dead-lettered.
    pub fn take_expired(&self) -> Vec<Arc<StoredMessage>> {
        match self.expired.lock() {
            Ok(mut list) => std::mem::take(&mut *list),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    fn push_expired(&self, message: Arc<StoredMessage>) {
        match self.expired.lock() {
            Ok(mut list) => list.push(message),
            Err(poisoned) => poisoned.into_inner().push(message),
        }
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, Fresh> {
        self.fresh.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands over a message just made durable for this subscription (called
    /// once the group that wrote it is journaled, before its sequence is
    /// published as committed).
    fn push_fresh(&self, after: u64, message: Arc<StoredMessage>) {
        let mut fresh = self.fresh();
        let size = message.envelope.len();
        if fresh.entries.len() >= FRESH_MAX_MESSAGES
            || fresh.bytes.saturating_add(size) > FRESH_MAX_BYTES
        {
            self.fresh_full.store(true, Ordering::Relaxed);
            return;
        }
        fresh.bytes += size;
        fresh.entries.push_back((after, message));
    }

    /// Whether [`Fresh`] holds anything for the dispatcher to look at.
    pub fn has_fresh(&self) -> bool {
        !self.fresh().entries.is_empty()
    }

    /// Whether a message just stored would find room in [`Fresh`].
    fn wants_fresh(&self) -> bool {
        !self.fresh_full.load(Ordering::Relaxed)
    }

    /// The dispatcher takes, in order, the messages that continue its store
    /// cursor `cursor` (at most `limit`), dropping those below it. Returns
    /// them; the caller moves its cursor past the last.
    pub fn take_fresh(&self, cursor: u64, limit: usize) -> Vec<Arc<StoredMessage>> {
        let mut fresh = self.fresh();
        let mut out = Vec::new();
        let mut cursor = cursor;
        while out.len() < limit {
            let Some((after, message)) = fresh.entries.front() else {
                break;
            };
            let (after, seq) = (*after, message.seq);
            if seq >= cursor && after >= cursor {
                break; // a gap: the store has entries this list lacks
            }
            let Some((_, message)) = fresh.entries.pop_front() else {
                break;
            };
            fresh.bytes = fresh.bytes.saturating_sub(message.envelope.len());
            self.fresh_full.store(false, Ordering::Relaxed);
            if seq >= cursor {
                cursor = seq + 1;
                out.push(message);
            }
        }
        out
    }
}

/// The outcome of a durable publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub duplicate: bool,
}

/// A publish handed to the writer.
pub struct PublishOp {
    pub topic: Arc<TopicState>,
    /// Subscriptions that get a pending entry (after recipient filtering).
    pub targets: Vec<Arc<SubState>>,
    /// Dedup key (`keys::dedup`), or None when the broker chose the message id.
    pub dedup_key: Option<Vec<u8>>,
    pub publish_ms: u64,
    pub expires_ms: u64,
    /// `expires_ms` is `publish_ms` plus the topic's retention: the message
    /// needs no expiry-index entry (the sweep walks each topic in sequence
    /// order for these, as later sequences expire no earlier).
    pub expiry_by_order: bool,
    /// The envelope as the broker checked and completed it: its `sender`
    /// (the publishing agency), `message_id` and `message_type` are the
    /// publish's. The writer encodes it for storage and takes its payload's
    /// SHA-256 (for the message header and the audit log) on its own
    /// thread: the runtime thread that decoded the publish has enough to do.
    pub envelope: crate::proto::Envelope,
    pub reply: oneshot::Sender<Result<Published, StorageError>>,
}

/// How a subscription is done with a message.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Ack,
    DeadLetter { reason: DeadReason, attempts: u32 },
}

/// Operations the writer applies, in order, in group commits.
pub(crate) enum Op {
    Publish(PublishOp),
    Settle {
        sub: Arc<SubState>,
        topic: Arc<TopicState>,
        message: Arc<StoredMessage>,
        outcome: Outcome,
        /// The subscription's owner (for the audit log).
        agency: String,
    },
    /// An audit record with no other change (delivery, nack, refusal, reload).
    Audit(Box<AuditEvent>),
    /// Persist a pending entry's attempts / not-before (redelivery, nack).
    Requeue {
        sub: u32,
        seq: u64,
        pending: Pending,
    },
    /// Periodic work: expiry and dedup-window sweeps.
    Tick,
    /// Dead letters back to their subscription (operator action).
    Redrive(operator::RedriveOp),
    /// Some of a subscription's pending entries removed (operator action).
    Purge(operator::PurgeOp),
    /// Answered once what came before is durable.
    Sync(oneshot::Sender<Result<(), StorageError>>),
    /// Answered after the next checkpoint (sled flushed and fsynced).
    Checkpoint(oneshot::Sender<Result<(), StorageError>>),
    /// Commit what came before, then end the writer thread.
    Stop,
    /// From the flusher when it has been idle a while: finish the group the
    /// writer holds back ([`writer`]: groups nobody waits on).
    Nudge,
    /// Several ops sent at once (a dispatcher's acks or delivery records),
    /// taken by the writer as if sent one by one.
    Many(Vec<Op>),
}

/// One settlement of [`Store::settle_all`].
pub struct Settlement {
    pub sub: Arc<SubState>,
    pub topic: Arc<TopicState>,
    pub message: Arc<StoredMessage>,
    pub outcome: Outcome,
    /// The subscription's owner (for the audit log).
    pub agency: String,
}

/// A pending entry as read by [`Store::scan_pending`]: sequence, entry, and
/// the message (None if its topic copy is missing).
pub type PendingRow = (u64, Pending, Option<Arc<StoredMessage>>);

/// Group-commit figures since start.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub flushes: AtomicU64,
    pub publishes: AtomicU64,
    pub max_publishes_per_flush: AtomicU64,
    pub flush_micros: AtomicU64,
}

impl FlushStats {
    /// (flushes, publishes, max publishes in one flush, mean flush time in µs)
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        let flushes = self.flushes.load(Ordering::Relaxed);
        let micros = self.flush_micros.load(Ordering::Relaxed);
        (
            flushes,
            self.publishes.load(Ordering::Relaxed),
            self.max_publishes_per_flush.load(Ordering::Relaxed),
            micros.checked_div(flushes).unwrap_or(0),
        )
    }
}

/// Cheap-clone handle to the store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    tree: sled::Db,
    tx: mpsc::Sender<Op>,
    topics: HashMap<String, Arc<TopicState>>,
    subs: HashMap<String, Arc<SubState>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<FlushStats>,
    audit_enabled: bool,
    /// Reads message bodies from their segment files.
    bodies: Arc<bodies::Reader>,
    #[cfg(test)]
    sync_gate: writer::SyncGate,
}

/// 2: pending entries may carry their message inline ([`Pending`]). A
/// version 1 store (only references to topic copies) is read as it is.
/// 3: the audit log is in segment files ([`crate::audit::segments`]), not
/// in sled. Opening a version 1 or 2 store moves its audit records there
/// and marks it version 3, after which older builds refuse it.
/// 4: a message for one subscription has its body in a segment file
/// ([`bodies`]), referenced from its pending entry. A version 3 store needs
/// nothing moved (its inline entries are still read): it is marked 4.
/// 5: fresh pending entries of such messages are packed, 64 sequences to
/// a key ([`packed`]). A version 3 or 4 store needs nothing moved (its own
/// keys are still read): it is marked 5, after which older builds would
/// miss the packed entries and refuse it.
const FORMAT_VERSION: u32 = 5;
const FORMAT_VERSIONS_READ: [u32; 5] = [1, 2, 3, 4, 5];
/// The first format whose audit log is in segment files.
const FORMAT_SEGMENTS: u32 = 3;
/// File beside sled's that marks a durably initialised store.
const FORMAT_MARKER: &str = "JOINERY_STORE";
const WRITER_QUEUE: usize = 16 * 1024;

impl Store {
    /// Opens (creating if needed) the store in `dir`, registers the configured
    /// topics and `(subscription, topic)` pairs, and starts the writer thread.
    /// Blocking: call from `spawn_blocking` in async code.
    pub fn open(
        dir: &Path,
        options: StoreOptions,
        topics: &[String],
        subscriptions: &[(String, String)],
    ) -> Result<Store, StorageError> {
        let created = !dir.join("db").exists();
        let marker = dir.join(FORMAT_MARKER);
        let initialised = marker.exists();
        let db = open_sled(dir, options.cache_capacity, options.audit_segment_bytes)?;
        if created {
            sync_dir(dir)?;
        }
        check_format(&db, dir, initialised, options.audit_segment_bytes)?;
        if !initialised {
            // Only now is the store known to be durably initialised: from here
            // on, a store that opens empty has lost its data and is refused.
            db.flush()?;
            write_marker(&marker)?;
            sync_dir(dir)?;
        }

        let mut topic_ids = HashMap::new();
        for name in topics {
            topic_ids.insert(name.clone(), register(&db, &keys::topic_name(name), None)?);
        }
        let mut subs_by_topic: HashMap<String, Vec<Arc<SubState>>> = HashMap::new();
        let mut subs = HashMap::new();
        for (name, topic) in subscriptions {
            let topic_id = *topic_ids.get(topic).ok_or_else(|| StorageError::Corrupt {
                what: format!("subscription {name:?} names unknown topic {topic:?}"),
            })?;
            let key = keys::subscription_name(name);
            let id = register(&db, &key, Some(topic_id)).map_err(|e| match e {
                StorageError::Corrupt { what } if what == "moved" => {
                    let stored = stored_topic_of(&db, &key)
                        .and_then(|id| {
                            topic_ids
                                .iter()
                                .find(|(_, v)| **v == id)
                                .map(|(k, _)| k.clone())
                        })
                        .unwrap_or_else(|| "(a topic no longer configured)".into());
                    StorageError::SubscriptionMoved {
                        name: name.clone(),
                        stored,
                        configured: topic.clone(),
                    }
                }
                other => other,
            })?;
            let (depth, dead) = read_counters(&db, id)?;
            let state = Arc::new(SubState {
                id,
                name: name.clone(),
                topic: topic_id,
                depth: AtomicU64::new(depth),
                dead_letters: AtomicU64::new(dead),
                notify: Notify::new(),
                in_flight: AtomicU64::new(0),
                oldest_pending_ms: AtomicU64::new(0),
                expired: Mutex::new(Vec::new()),
                fresh: Mutex::new(Fresh::default()),
                fresh_full: AtomicBool::new(false),
            });
            subs_by_topic
                .entry(topic.clone())
                .or_default()
                .push(state.clone());
            subs.insert(name.clone(), state);
        }
        let mut topic_states = HashMap::new();
        for (name, id) in &topic_ids {
            let next = read_u64(&db, &keys::next_seq(*id), || {
                format!("next sequence of topic {name:?}")
            })?
            .unwrap_or(1);
            let floor = read_u64(&db, &keys::seq_floor(*id), || {
                format!("sequence floor of topic {name:?}")
            })?
            .unwrap_or(0);
            topic_states.insert(
                name.clone(),
                Arc::new(TopicState {
                    id: *id,
                    name: name.clone(),
                    subs: subs_by_topic.remove(name).unwrap_or_default(),
                    committed: AtomicU64::new(next.saturating_sub(1)),
                    deliver_before_sync: options.deliver_before_sync.contains(name),
                    seq_floor: AtomicU64::new(floor),
                }),
            );
        }
        db.flush()?;

        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let stats = Arc::new(FlushStats::default());
        let audit = match options.audit_retention {
            Some(retention) => {
                let tail = crate::audit::segments::read_tail(&db)?;
                Some(Chain::load(&db, tail.as_ref(), retention).map_err(|e| {
                    StorageError::Corrupt {
                        what: format!("audit log head: {e}"),
                    }
                })?)
            }
            None => None,
        };
        let audit_enabled = audit.is_some();
        let reports = options
            .reports
            .iter()
            .filter_map(|(agency, topic, sub)| {
                let topic = topic_states.get(topic)?.clone();
                let sub = topic.subs.iter().find(|s| s.name == *sub)?.clone();
                Some((agency.clone(), (topic, sub)))
            })
            .collect();
        let reader = Arc::new(bodies::Reader::new(dir));
        let writer = writer::Writer::new(
            db.clone(),
            dir,
            rx,
            tx.downgrade(),
            options,
            topic_states.values().cloned().collect(),
            stats.clone(),
            audit,
            reports,
            reader.clone(),
        )?;
        #[cfg(test)]
        let sync_gate = writer.sync_gate();
        let handle = std::thread::Builder::new()
            .name("joinery-writer".into())
            .spawn(move || writer.run())
            .map_err(|source| StorageError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                tree: db,
                tx,
                topics: topic_states,
                subs,
                writer: Mutex::new(Some(handle)),
                stats,
                audit_enabled,
                bodies: reader,
                #[cfg(test)]
                sync_gate,
            }),
        })
    }

    pub fn topic(&self, name: &str) -> Option<Arc<TopicState>> {
        self.inner.topics.get(name).cloned()
    }

    pub fn subscription(&self, name: &str) -> Option<Arc<SubState>> {
        self.inner.subs.get(name).cloned()
    }

    pub fn flush_stats(&self) -> &FlushStats {
        &self.inner.stats
    }

    /// Queues a publish; the returned receiver answers after the flush that
    /// makes it durable.
    pub async fn publish(&self, op: PublishOp) -> Result<(), StorageError> {
        self.send(Op::Publish(op)).await
    }

    /// Queues an ack or dead-lettering. Not waited for: if the broker dies
    /// before it is flushed, the message is simply delivered again.
    pub async fn settle(
        &self,
        sub: Arc<SubState>,
        topic: Arc<TopicState>,
        message: Arc<StoredMessage>,
        outcome: Outcome,
        agency: String,
    ) -> Result<(), StorageError> {
        self.send(Op::Settle {
            sub,
            topic,
            message,
            outcome,
            agency,
        })
        .await
    }

    /// [`Self::settle`] of several messages, queued as one: the writer
    /// takes them in this order.
    pub async fn settle_all(&self, settlements: Vec<Settlement>) -> Result<(), StorageError> {
        let ops: Vec<Op> = settlements
            .into_iter()
            .map(|s| Op::Settle {
                sub: s.sub,
                topic: s.topic,
                message: s.message,
                outcome: s.outcome,
                agency: s.agency,
            })
            .collect();
        self.send_all(ops).await
    }

    /// [`Self::audit`] of several records, queued as one.
    pub async fn audit_all(&self, events: Vec<AuditEvent>) -> Result<(), StorageError> {
        if !self.inner.audit_enabled {
            return Ok(());
        }
        let ops = events
            .into_iter()
            .map(|event| Op::Audit(Box::new(event)))
            .collect();
        self.send_all(ops).await
    }

    async fn send_all(&self, mut ops: Vec<Op>) -> Result<(), StorageError> {
        match ops.len() {
            0 => Ok(()),
            1 => match ops.pop() {
                Some(op) => self.send(op).await,
                None => Ok(()),
            },
            _ => self.send(Op::Many(ops)).await,
        }
    }

    /// Queues an audit record (no-op when the audit log is off). Not waited for.
    pub async fn audit(&self, event: AuditEvent) -> Result<(), StorageError> {
        if !self.inner.audit_enabled {
            return Ok(());
        }
        self.send(Op::Audit(Box::new(event))).await
    }

    /// Queues an audit record without waiting for room (for callers that
    /// cannot await); dropped, with a log line, when the writer is swamped.
    pub fn audit_now(&self, event: AuditEvent) {
        if self.inner.audit_enabled {
            if let Err(e) = self.inner.tx.try_send(Op::Audit(Box::new(event))) {
                tracing::error!(cause = %e, "audit record dropped: the writer queue is full");
            }
        }
    }

    pub fn audit_enabled(&self) -> bool {
        self.inner.audit_enabled
    }

    /// The underlying sled database, for audit verification and export.
    pub fn db(&self) -> &sled::Db {
        &self.inner.tree
    }

    /// Queues an update of a pending entry's attempts and not-before time.
    pub async fn requeue(&self, sub: u32, seq: u64, pending: Pending) -> Result<(), StorageError> {
        self.send(Op::Requeue { sub, seq, pending }).await
    }

    /// Waits until everything queued so far is durable (journaled).
    pub async fn sync(&self) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Sync(reply)).await?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Waits until sled itself is durable, with everything queued so far and
    /// what was written to it directly ([`Store::put_schema`]).
    pub async fn checkpoint(&self) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Checkpoint(reply)).await?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Asks for the periodic sweeps (expiry, dedup window). Never blocks: a
    /// busy writer simply skips a tick.
    pub fn tick(&self) {
        let _ = self.inner.tx.try_send(Op::Tick);
    }

    async fn send(&self, op: Op) -> Result<(), StorageError> {
        self.inner
            .tx
            .send(op)
            .await
            .map_err(|_| StorageError::Closed)
    }

    /// Up to `limit` pending entries of `sub` with `from <= seq <= to`, in
    /// order, each with its message (None when the topic copy is missing,
    /// which only an interrupted manual repair can cause). Blocking.
    pub fn scan_pending(
        &self,
        sub: &SubState,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<PendingRow>, StorageError> {
        if from > to {
            return Ok(Vec::new());
        }
        // Blocks first, then own keys: an entry leaving its block for its
        // own key is written there first, so it is found in one or both.
        let mut found: std::collections::BTreeMap<u64, sled::IVec> = Default::default();
        let blocks = keys::packed(sub.id, packed::block_of(from))
            ..=keys::packed(sub.id, packed::block_of(to));
        'blocks: for item in self.inner.tree.range(blocks) {
            let (_, bytes) = item?;
            for (seq, reference) in packed::records(&bytes)? {
                if seq > to || found.len() >= limit {
                    break 'blocks;
                }
                if seq >= from {
                    found.insert(seq, packed::entry_value(reference).into());
                }
            }
        }
        let range = keys::pending(sub.id, from)..=keys::pending(sub.id, to);
        for item in self.inner.tree.range(range).take(limit) {
            let (key, value) = item?;
            let seq = keys::seq_of(&key).ok_or_else(|| StorageError::Corrupt {
                what: format!("pending key of subscription {:?}", sub.name),
            })?;
            found.insert(seq, value);
        }
        let entries: Vec<(u64, sled::IVec)> = found.into_iter().take(limit).collect();
        self.pending_rows_of(sub, &entries)
    }

    /// `sub`'s pending entry `seq` as stored: its own key, else its
    /// block's record (read first: see [`Self::scan_pending`]). Blocking.
    pub(crate) fn pending_value(
        &self,
        sub: u32,
        seq: u64,
    ) -> Result<Option<sled::IVec>, StorageError> {
        let packed = match self
            .inner
            .tree
            .get(keys::packed(sub, packed::block_of(seq)))?
        {
            Some(bytes) => packed::records(&bytes)?
                .find(|(s, _)| *s == seq)
                .map(|(_, reference)| sled::IVec::from(packed::entry_value(reference))),
            None => None,
        };
        match self.inner.tree.get(keys::pending(sub, seq))? {
            Some(own) => Ok(Some(own)),
            None => Ok(packed),
        }
    }

    /// Pending entries as stored, each with its message: inline, in a
    /// segment file (bodies that lie one after another read together), else
    /// the topic copy. Blocking.
    pub(crate) fn pending_rows_of(
        &self,
        sub: &SubState,
        entries: &[(u64, sled::IVec)],
    ) -> Result<Vec<PendingRow>, StorageError> {
        let split = entries
            .iter()
            .map(|(seq, value)| Ok((*seq, Pending::split(value)?)))
            .collect::<Result<Vec<_>, StorageError>>()?;
        let refs: Vec<bodies::BodyRef> = split
            .iter()
            .filter_map(|(_, (_, body))| match body {
                records::Body::Segment(body, _) => Some(*body),
                _ => None,
            })
            .collect();
        let mut read = self.inner.bodies.read(&refs)?.into_iter();
        let mut out = Vec::with_capacity(entries.len());
        for (seq, (pending, body)) in split {
            let message = match body {
                records::Body::Inline(stored) => {
                    Some(Arc::new(StoredMessage::decode(sub.topic, seq, stored)?))
                }
                records::Body::Segment(body, _) => match read.next().flatten() {
                    Some(stored) => Some(Arc::new(StoredMessage::decode(sub.topic, seq, &stored)?)),
                    None => match self.moved_body(sub, seq, body)? {
                        Some(stored) => {
                            Some(Arc::new(StoredMessage::decode(sub.topic, seq, &stored)?))
                        }
                        None => {
                            warn!(
                                seq,
                                segment = body.segment,
                                subscription = %sub.name,
                                "a pending message's body is missing from its segment file"
                            );
                            None
                        }
                    },
                },
                records::Body::TopicCopy => self.load_message(sub.topic, seq)?,
            };
            out.push((seq, pending, message));
        }
        Ok(out)
    }

    /// The body of `sub`'s entry `seq` found missing at `old`: compaction
    /// may have moved it (and removed the file) after the entry was read,
    /// so the entry is read again and a new reference followed.
    fn moved_body(
        &self,
        sub: &SubState,
        seq: u64,
        mut old: bodies::BodyRef,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        // A body moves at most once per sweep: a few tries are plenty.
        for _ in 0..3 {
            let Some(value) = self.pending_value(sub.id, seq)? else {
                return Ok(None); // settled meanwhile
            };
            match Pending::body_ref(&value) {
                Some(new) if new != old => match self.inner.bodies.read_one(new)? {
                    Some(stored) => return Ok(Some(stored)),
                    None => old = new,
                },
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The message of `sub`'s pending entry `seq` (inline or the topic copy).
    #[cfg(test)]
    pub(crate) fn pending_message(&self, sub: &str, seq: u64) -> Option<Arc<StoredMessage>> {
        let sub = self.subscription(sub)?;
        let value = self.pending_value(sub.id, seq).ok()??;
        self.pending_rows_of(&sub, &[(seq, value)]).ok()?.pop()?.2
    }

    /// The topic copy of a message, if it is still stored (an inline
    /// message has none: read it with its pending entry). Blocking.
    pub fn load_message(
        &self,
        topic: u32,
        seq: u64,
    ) -> Result<Option<Arc<StoredMessage>>, StorageError> {
        match self.inner.tree.get(keys::message(topic, seq))? {
            Some(v) => Ok(Some(Arc::new(StoredMessage::decode(topic, seq, &v)?))),
            None => Ok(None),
        }
    }

    /// Up to `limit` dead letters of `sub`, oldest first. Blocking.
    pub fn dead_letters(
        &self,
        sub: &SubState,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StorageError> {
        let mut out = Vec::new();
        for item in self
            .inner
            .tree
            .scan_prefix(keys::dead_prefix(sub.id))
            .take(limit)
        {
            let (key, value) = item?;
            let seq = keys::seq_of(&key).ok_or_else(|| StorageError::Corrupt {
                what: "dead letter key".into(),
            })?;
            out.push(DeadLetter::decode(sub.topic, seq, &value)?);
        }
        Ok(out)
    }

    /// Stores a registered schema package, straight into sled (flushed;
    /// follow with [`Store::checkpoint`] for the fsync). Blocking.
    pub fn put_schema(&self, package: &str, value: &[u8]) -> Result<(), StorageError> {
        let key = [&[keys::SCHEMA][..], package.as_bytes()].concat();
        self.inner.tree.insert(key, value)?;
        self.inner.tree.flush()?;
        Ok(())
    }

    /// Every registered schema package as stored. Blocking.
    pub fn schemas(&self) -> Result<Vec<Vec<u8>>, StorageError> {
        self.inner
            .tree
            .scan_prefix([keys::SCHEMA])
            .map(|item| Ok(item?.1.to_vec()))
            .collect()
    }

    /// Bytes sled reports for the data directory.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.tree.size_on_disk().unwrap_or(0)
    }

    /// Stops the writer after it has committed everything queued, and
    /// flushes. Other clones of the store must not write afterwards (their
    /// writes fail with `Closed`).
    pub async fn close(&self) -> Result<(), StorageError> {
        let handle = match self.inner.writer.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle {
            // The writer commits everything queued before the Stop, then ends.
            if self.inner.tx.send(Op::Stop).await.is_ok() {
                tokio::task::spawn_blocking(move || handle.join())
                    .await
                    .map_err(|e| StorageError::Unavailable(e.to_string()))?
                    .map_err(|_| StorageError::Unavailable("the writer thread panicked".into()))?;
            }
        }
        let tree = self.inner.tree.clone();
        tokio::task::spawn_blocking(move || tree.flush())
            .await
            .map_err(|e| StorageError::Unavailable(e.to_string()))??;
        Ok(())
    }
}

/// How long opening waits for the data directory's lock. A sled database
/// dropped in this process releases its lock only when sled's I/O pool has
/// finished with the file, a moment after the drop; a second broker process
/// still gets `Locked`, just this much later.
const LOCK_WAIT: Duration = Duration::from_secs(3);

pub(crate) fn open_sled(
    dir: &Path,
    cache_capacity: u64,
    audit_segment_bytes: u64,
) -> Result<sled::Db, StorageError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match open_sled_once(dir, cache_capacity) {
            Err(StorageError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(25));
            }
            Ok(db) => {
                journal::recover(&db, dir, audit_segment_bytes)?;
                return Ok(db);
            }
            other => return other,
        }
    }
}

fn open_sled_once(dir: &Path, cache_capacity: u64) -> Result<sled::Db, StorageError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_capacity)
        // Keep sled's background flusher (pitfalls: it also persists metadata).
        .flush_every_ms(Some(500));
    // sled can panic on corrupt files: contain it and report it.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(e))) if e.to_string().contains("lock") => {
            Err(StorageError::Locked {
                dir: dir.to_path_buf(),
            })
        }
        Ok(Err(source)) => Err(StorageError::Open {
            dir: dir.to_path_buf(),
            source,
        }),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(StorageError::OpenPanicked {
                dir: dir.to_path_buf(),
                reason,
            })
        }
    }
}

/// fsyncs the directory `dir` (after files in it were made or removed).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_error(dir))
}

/// Maps an I/O error on `path` to [`StorageError::Io`].
/// Opens `path` to read and write, creating it if needed, keeping what it holds.
pub(crate) fn open_read_write(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

pub(crate) fn io_error(path: &Path) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_format(
    db: &sled::Db,
    dir: &Path,
    initialised: bool,
    segment_bytes: u64,
) -> Result<(), StorageError> {
    match db.get(keys::FORMAT)? {
        // sled opens unreadable files as an empty store; the marker tells a
        // new store from one whose data could not be recovered.
        None if initialised => Err(StorageError::Corrupt {
            what: format!(
                "{} holds a joinery store ({FORMAT_MARKER} is present) but sled recovered no data from it; move the directory aside and restore it from a backup",
                dir.display()
            ),
        }),
        None => {
            db.insert(keys::FORMAT, &FORMAT_VERSION.to_be_bytes())?;
            Ok(())
        }
        Some(v)
            if keys::be_u32(&v).is_some_and(|v| (FORMAT_SEGMENTS..=FORMAT_VERSION).contains(&v)) =>
        {
            if keys::be_u32(&v) != Some(FORMAT_VERSION) {
                db.insert(keys::FORMAT, &FORMAT_VERSION.to_be_bytes())?;
            }
            let leftovers = [keys::AUDIT, keys::AUDIT_BLOCK]
                .iter()
                .any(|p| db.scan_prefix([*p]).next().is_some());
            if leftovers {
                remove_legacy_audit_keys(db)?;
            }
            Ok(())
        }
        Some(v) if keys::be_u32(&v).is_some_and(|v| FORMAT_VERSIONS_READ.contains(&v)) => {
            move_audit_to_segments(db, dir, segment_bytes)
        }
        Some(v) => Err(StorageError::Corrupt {
            what: format!(
                "data format version {:?}; this joinery reads versions {FORMAT_VERSIONS_READ:?}",
                keys::be_u32(&v)
            ),
        }),
    }
}

/// The store's format version, if it has one yet.
fn format_of(db: &sled::Db) -> Result<Option<u32>, StorageError> {
    match db.get(keys::FORMAT)? {
        None => Ok(None),
        Some(v) => keys::be_u32(&v)
            .map(Some)
            .ok_or_else(|| StorageError::Corrupt {
                what: "the store's format version".into(),
            }),
    }
}

/// Moves the audit log of a format 1 or 2 store out of sled into segment
/// files and marks the store version 3 in one batch with the segments'
/// recorded end: a crash before it leaves the store as it was (segments the
/// attempt wrote are removed and written again on the next open). The
/// moved keys are removed after, in chunks ([`remove_legacy_audit_keys`]).
fn move_audit_to_segments(
    db: &sled::Db,
    dir: &Path,
    segment_bytes: u64,
) -> Result<(), StorageError> {
    use crate::audit::{blocks, segments, AuditError};
    let seg_dir = segments::dir_of(dir);
    for (_, path) in segments::list(&seg_dir).map_err(io_error(&seg_dir))? {
        std::fs::remove_file(&path).map_err(io_error(&path))?;
    }
    let mut appender = segments::Appender::open(dir, None, segment_bytes)?;
    let mut blocks_moved = 0u64;
    let started = std::time::Instant::now();
    let mut reported = started;
    for item in blocks::legacy(db) {
        if reported.elapsed() >= Duration::from_secs(2) {
            reported = std::time::Instant::now();
            info!(
                blocks = blocks_moved,
                secs = started.elapsed().as_secs(),
                "moving the audit log out of sled into segment files (once, at upgrade)"
            );
        }
        let (first, block) = match item {
            Ok(found) => found,
            Err(AuditError::Broken { problem, .. }) => {
                // A key that names no record: nothing to move. Verification
                // shows the records it held as missing.
                warn!(
                    problem,
                    "an audit key of the old format is unreadable; skipped"
                );
                continue;
            }
            Err(e) => {
                return Err(StorageError::Corrupt {
                    what: format!("audit log, while moving it to segment files: {e}"),
                })
            }
        };
        if appender.next_seq().is_some_and(|next| next != first) {
            // A gap (a removed record): moved as it is, for `joinery audit
            // verify` to name, rather than refusing to open the store.
            warn!(
                record = first,
                "the audit log has a gap; moving it as it is"
            );
        }
        appender.push_as_is(first, &block)?;
        blocks_moved += 1;
    }
    if blocks_moved > 0 && appender.next_seq().is_none() {
        // The chain's head is unknown: as version 2 did, refuse.
        return Err(StorageError::Corrupt {
            what: "audit log: its last block is unreadable, so the chain cannot go on from it"
                .into(),
        });
    }
    let mut batch = sled::Batch::default();
    match appender.sync()? {
        Some(tail) => batch.insert(keys::AUDIT_TAIL, prost::Message::encode_to_vec(&tail)),
        None => batch.remove(keys::AUDIT_TAIL),
    }
    batch.insert(keys::FORMAT, &FORMAT_VERSION.to_be_bytes());
    db.apply_batch(batch)?;
    db.flush()?;
    journal::sync_store_files(dir)?;
    // What the journal still holds is in sled (and its audit blocks in the
    // segments): it must not be read again as a pass with no recorded end.
    journal::invalidate(dir)?;
    remove_legacy_audit_keys(db)?;
    if blocks_moved > 0 {
        info!(
            blocks = blocks_moved,
            ms = started.elapsed().as_millis() as u64,
            "moved the audit log out of sled into segment files (store format {FORMAT_VERSION})"
        );
    }
    Ok(())
}

/// Removes audit keys of the old formats left in sled (after a move into
/// segments; a crash can interrupt it), 10,000 at a time.
fn remove_legacy_audit_keys(db: &sled::Db) -> Result<(), StorageError> {
    for prefix in [keys::AUDIT, keys::AUDIT_BLOCK] {
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for item in db.scan_prefix([prefix]).keys().take(10_000) {
                batch.remove(item?);
                n += 1;
            }
            if n == 0 {
                break;
            }
            db.apply_batch(batch)?;
        }
    }
    db.flush()?;
    Ok(())
}

fn write_marker(path: &Path) -> Result<(), StorageError> {
    use std::io::Write;
    let io = |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(path).map_err(io)?;
    file.write_all(format!("joinery store format {FORMAT_VERSION}\n").as_bytes())
        .map_err(io)?;
    file.sync_all().map_err(io)
}

/// Looks up or assigns the id of a named topic (`topic = None`) or
/// subscription (`topic = Some(topic id)`).
fn register(db: &sled::Db, key: &[u8], topic: Option<u32>) -> Result<u32, StorageError> {
    if let Some(v) = db.get(key)? {
        let id = keys::be_u32(&v).ok_or_else(|| StorageError::Corrupt {
            what: "name registry".into(),
        })?;
        if let Some(topic) = topic {
            if keys::be_u32(v.get(4..).unwrap_or_default()) != Some(topic) {
                return Err(StorageError::Corrupt {
                    what: "moved".into(),
                });
            }
        }
        return Ok(id);
    }
    let last = match db.get(keys::ID_COUNTER)? {
        Some(v) => keys::be_u32(&v).unwrap_or(0),
        None => 0,
    };
    let id = last.checked_add(1).ok_or(StorageError::IdsExhausted)?;
    db.insert(keys::ID_COUNTER, &id.to_be_bytes())?;
    let mut value = id.to_be_bytes().to_vec();
    if let Some(topic) = topic {
        value.extend_from_slice(&topic.to_be_bytes());
    }
    db.insert(key, value)?;
    Ok(id)
}

fn stored_topic_of(db: &sled::Db, key: &[u8]) -> Option<u32> {
    let v = db.get(key).ok()??;
    keys::be_u32(v.get(4..)?)
}

/// The big-endian u64 stored at `key`, if any; `what` names it when it is
/// not one.
fn read_u64(
    db: &sled::Db,
    key: &[u8],
    what: impl FnOnce() -> String,
) -> Result<Option<u64>, StorageError> {
    match db.get(key)? {
        None => Ok(None),
        Some(v) => keys::be_u64(&v)
            .map(Some)
            .ok_or_else(|| StorageError::Corrupt { what: what() }),
    }
}

fn read_counters(db: &sled::Db, sub: u32) -> Result<(u64, u64), StorageError> {
    match db.get(keys::counters(sub))? {
        Some(v) => {
            let corrupt = || StorageError::Corrupt {
                what: "subscription counters".into(),
            };
            Ok((
                keys::be_u64(&v).ok_or_else(corrupt)?,
                keys::be_u64(v.get(8..).ok_or_else(corrupt)?).ok_or_else(corrupt)?,
            ))
        }
        None => Ok((0, 0)),
    }
}

/// Opens an existing store's sled database (for offline audit verification
/// and export). It changes nothing but what opening always does: journal
/// records a crash took from sled are replayed. The broker must not be
/// running on it.
pub fn open_existing(dir: &Path) -> Result<sled::Db, StorageError> {
    if !dir.join(FORMAT_MARKER).exists() {
        return Err(StorageError::Corrupt {
            what: format!("{} holds no joinery store", dir.display()),
        });
    }
    let db = open_sled(dir, 16 << 20, crate::audit::segments::SEGMENT_BYTES)?;
    match format_of(&db)? {
        // Formats 3 and 4 differ from 5 only in what new writes look like.
        Some(v) if v >= FORMAT_SEGMENTS && FORMAT_VERSIONS_READ.contains(&v) => Ok(db),
        Some(v) if FORMAT_VERSIONS_READ.contains(&v) => Err(StorageError::Corrupt {
            what: format!(
                "{} holds a store of format {v}; start the broker on it once to upgrade it to format {FORMAT_VERSION}",
                dir.display()
            ),
        }),
        _ => Err(StorageError::Corrupt {
            what: format!("{} could not be read as a joinery store", dir.display()),
        }),
    }
}

/// Milliseconds since the Unix epoch by the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        try_open(dir).unwrap()
    }

    fn try_open(dir: &Path) -> Result<Store, StorageError> {
        try_open_with(dir, crate::storage::bodies::SEGMENT_BYTES)
    }

    fn try_open_with(dir: &Path, body_segment_bytes: u64) -> Result<Store, StorageError> {
        try_open_compacting_after(dir, body_segment_bytes, Duration::ZERO)
    }

    fn try_open_compacting_after(
        dir: &Path,
        body_segment_bytes: u64,
        compact_after: Duration,
    ) -> Result<Store, StorageError> {
        try_open_with_options(dir, body_segment_bytes, compact_after, Vec::new())
    }

    /// The test store with topic `t` delivering before sync, or not.
    fn open_delivering_early(dir: &Path, early: bool) -> Store {
        let early = if early {
            vec!["t".to_string()]
        } else {
            Vec::new()
        };
        try_open_with_options(dir, bodies::SEGMENT_BYTES, Duration::ZERO, early).unwrap()
    }

    fn try_open_with_options(
        dir: &Path,
        body_segment_bytes: u64,
        compact_after: Duration,
        deliver_before_sync: Vec<String>,
    ) -> Result<Store, StorageError> {
        Store::open(
            dir,
            StoreOptions {
                cache_capacity: 4 << 20,
                dedup_window: Duration::from_secs(60),
                max_batch: 16,
                audit_retention: Some(Duration::from_secs(86400)),
                audit_segment_bytes: crate::audit::segments::SEGMENT_BYTES,
                body_segment_bytes,
                compact_after,
                reports: Vec::new(),
                deliver_before_sync,
            },
            &["t".to_string(), "quiet".to_string()],
            &[
                ("a".to_string(), "t".to_string()),
                ("b".to_string(), "t".to_string()),
            ],
        )
    }

    /// An envelope carrying `body`, as tests hand publishes to the store.
    pub(super) fn enveloped(body: &[u8]) -> crate::proto::Envelope {
        crate::proto::Envelope {
            sender: "police".into(),
            message_id: "m".into(),
            message_type: "t.T".into(),
            payload: body.to_vec().into(),
            ..Default::default()
        }
    }

    /// The payload of a stored envelope.
    fn payload(envelope: &[u8]) -> Vec<u8> {
        <crate::proto::Envelope as prost::Message>::decode(envelope)
            .unwrap()
            .payload
            .to_vec()
    }

    async fn publish(store: &Store, topic: &str, targets: &[&str], body: &[u8]) -> u64 {
        publish_expiring(store, topic, targets, body, 0, false).await
    }

    async fn publish_expiring(
        store: &Store,
        topic: &str,
        targets: &[&str],
        body: &[u8],
        expires_ms: u64,
        expiry_by_order: bool,
    ) -> u64 {
        let (reply, rx) = oneshot::channel();
        store
            .publish(PublishOp {
                topic: store.topic(topic).unwrap(),
                targets: targets
                    .iter()
                    .map(|s| store.subscription(s).unwrap())
                    .collect(),
                dedup_key: None,
                publish_ms: now_ms(),
                expires_ms,
                expiry_by_order,
                envelope: enveloped(body),
                reply,
            })
            .await
            .unwrap();
        rx.await.unwrap().unwrap().seq
    }

    async fn ack(store: &Store, sub: &str, seq: u64) {
        let sub = store.subscription(sub).unwrap();
        let topic = store.topic("t").unwrap();
        let message = store.pending_message(&sub.name, seq).unwrap();
        store
            .settle(sub, topic, message, Outcome::Ack, "council".into())
            .await
            .unwrap();
        store.sync().await.unwrap();
    }

    /// Sequences of what `take_fresh` hands over, checked against the
    /// store: each is the next pending entry a read from the cursor finds.
    fn take_fresh_checked(store: &Store, sub: &str, cursor: u64) -> Vec<u64> {
        let state = store.subscription(sub).unwrap();
        let taken = state.take_fresh(cursor, 10_000);
        let mut from = cursor;
        for message in &taken {
            let rows = store
                .scan_pending(&state, from, message.seq, usize::MAX)
                .unwrap();
            assert_eq!(
                rows.len(),
                1,
                "{sub}: a pending entry before {}",
                message.seq
            );
            let (seq, pending, stored) = &rows[0];
            assert_eq!((*seq, *pending), (message.seq, Pending::default()));
            let stored = stored.as_ref().unwrap();
            assert_eq!(stored.envelope, message.envelope);
            assert_eq!(stored.message_id, message.message_id);
            assert_eq!(stored.publish_ms, message.publish_ms);
            from = message.seq + 1;
        }
        taken.iter().map(|m| m.seq).collect()
    }

    /// Publishes `body` to `t` for `a` in a task of its own; the sequence
    /// once it is durable.
    fn publish_in_task(store: &Store, body: &'static [u8]) -> tokio::task::JoinHandle<u64> {
        let store = store.clone();
        tokio::spawn(async move { publish(&store, "t", &["a"], body).await })
    }

    /// Waits (at most 5 s) until `sub` holds fresh messages.
    async fn until_fresh(store: &Store, sub: &str) -> bool {
        let state = store.subscription(sub).unwrap();
        for _ in 0..5000 {
            if state.has_fresh() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        false
    }

    /// Publishes `body` to `t` for `a` while every group is held from its
    /// sync, checks that `a` is handed nothing meanwhile, and returns the
    /// sequence once the sync is let through.
    async fn held_until_synced(store: &Store, body: &'static [u8]) -> u64 {
        let a = store.subscription("a").unwrap();
        let release = store.inner.sync_gate.hold();
        let publishing = publish_in_task(store, body);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!a.has_fresh(), "handed over before its sync");
        drop(release);
        publishing.await.unwrap()
    }

    #[tokio::test]
    async fn a_topic_that_delivers_before_sync_hands_messages_over_before_their_sync() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_delivering_early(tmp.path(), true);
        let topic = store.topic("t").unwrap();
        let a = store.subscription("a").unwrap();

        // The first sequence is not below a durable floor yet: it waits for
        // its sync, whose group raises the floor.
        assert_eq!(held_until_synced(&store, b"1").await, 1);
        assert_eq!(topic.seq_floor(), 1 + writer::SEQ_FLOOR_STEP);
        assert_eq!(take_fresh_checked(&store, "a", 1), [1]);

        // Below the floor: handed over while its group is held from the sync.
        let release = store.inner.sync_gate.hold();
        let second = publish_in_task(&store, b"2");
        assert!(
            until_fresh(&store, "a").await,
            "not handed over before its sync"
        );
        assert!(!second.is_finished(), "answered before its sync");
        assert_eq!(topic.committed(), 1);
        let taken = a.take_fresh(2, 10);
        assert_eq!(taken.len(), 1);
        assert_eq!(
            (taken[0].seq, payload(&taken[0].envelope)),
            (2, b"2".to_vec())
        );
        drop(release);
        assert_eq!(second.await.unwrap(), 2);
        assert_eq!(topic.committed(), 2);

        // The same with the topic delivering after sync: nothing before it.
        store.close().await.unwrap();
        drop(store);
        let store = open_delivering_early(tmp.path(), false);
        let a = store.subscription("a").unwrap();
        let third = held_until_synced(&store, b"3").await;
        assert!(until_fresh(&store, "a").await);
        assert_eq!(a.take_fresh(third, 10)[0].seq, third);
    }

    #[tokio::test]
    async fn sequences_that_may_have_been_delivered_before_sync_are_not_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open_delivering_early(tmp.path(), true);
        for (i, body) in [b"1", b"2", b"3"].into_iter().enumerate() {
            assert_eq!(publish(&store, "t", &["a"], body).await, i as u64 + 1);
        }
        store.close().await.unwrap();
        drop(store);

        // Reopened: sequences go on from the floor, above any the last
        // process could have handed over early; what is stored stays.
        let floor = 1 + writer::SEQ_FLOOR_STEP;
        let store = open_delivering_early(tmp.path(), true);
        let topic = store.topic("t").unwrap();
        assert_eq!((topic.committed(), topic.seq_floor()), (3, floor));
        assert_eq!(publish(&store, "t", &["a"], b"4").await, floor);
        let rows = store
            .scan_pending(&store.subscription("a").unwrap(), 1, topic.committed(), 10)
            .unwrap();
        let seqs: Vec<u64> = rows.iter().map(|(seq, _, _)| *seq).collect();
        assert_eq!(seqs, [1, 2, 3, floor]);
        store.close().await.unwrap();
        drop(store);

        // Delivering after sync again, the topic still keeps above its
        // floor (raised by the last publish), and raises it no more.
        let store = open_delivering_early(tmp.path(), false);
        let raised = floor + writer::SEQ_FLOOR_STEP;
        assert_eq!(publish(&store, "t", &["a"], b"5").await, raised);
        assert_eq!(publish(&store, "t", &["a"], b"6").await, raised + 1);
        store.close().await.unwrap();
        drop(store);
        let store = open_delivering_early(tmp.path(), false);
        assert_eq!(store.topic("t").unwrap().seq_floor(), raised);
        assert_eq!(publish(&store, "t", &["a"], b"7").await, raised + 2);
        // A topic that never delivered early goes on one by one.
        assert_eq!(publish(&store, "quiet", &[], b"q").await, 1);
        assert_eq!(publish(&store, "quiet", &[], b"q").await, 2);
    }

    #[tokio::test]
    async fn fresh_messages_continue_the_cursor_and_leave_gaps_to_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        assert_eq!(publish(&store, "t", &["a"], b"1").await, 1);
        assert_eq!(publish(&store, "t", &["a", "b"], b"2").await, 2);
        assert_eq!(publish(&store, "t", &["b"], b"3").await, 3);
        assert_eq!(publish(&store, "t", &["a"], b"4").await, 4);

        // A dispatcher that has not read the store yet must read it.
        assert!(take_fresh_checked(&store, "a", 0).is_empty());
        // Past 1: 2 and 4 follow (3 is not a's), and 1 is dropped.
        assert_eq!(take_fresh_checked(&store, "a", 2), vec![2, 4]);
        assert!(take_fresh_checked(&store, "a", 5).is_empty());
        assert_eq!(take_fresh_checked(&store, "b", 3), vec![3]);

        // Past the limit new messages are dropped, which leaves a gap: the
        // dispatcher reads those from the store.
        for i in 0..FRESH_MAX_MESSAGES + 2 {
            publish(&store, "t", &["a"], format!("m{i}").as_bytes()).await;
        }
        let first = 5u64;
        // Full: the writer stops building entries until some are taken.
        assert!(!store.subscription("a").unwrap().wants_fresh());
        let listed = take_fresh_checked(&store, "a", first);
        assert!(store.subscription("a").unwrap().wants_fresh());
        let expected: Vec<u64> = (first..first + FRESH_MAX_MESSAGES as u64).collect();
        assert_eq!(listed, expected);
        let next = publish(&store, "t", &["a"], b"after").await;
        let gap = first + FRESH_MAX_MESSAGES as u64;
        assert!(take_fresh_checked(&store, "a", gap).is_empty());
        let state = store.subscription("a").unwrap();
        let rows = store.scan_pending(&state, gap, next, 100).unwrap();
        assert_eq!(rows.len(), 3);
        // Once the store is read past the gap, memory serves again.
        let after = publish(&store, "t", &["a"], b"again").await;
        assert_eq!(take_fresh_checked(&store, "a", next + 1), vec![after]);

        // Bytes are bounded too.
        let big = vec![7u8; FRESH_MAX_BYTES / 2 + 1];
        let one = publish(&store, "t", &["b"], &big).await;
        let two = publish(&store, "t", &["b"], &big).await;
        assert_eq!(take_fresh_checked(&store, "b", one), vec![one]);
        assert!(take_fresh_checked(&store, "b", two).is_empty());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn fresh_messages_after_a_restart_wait_for_the_backlog_to_be_read() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        for i in 0..5 {
            publish(&store, "t", &["a"], format!("old{i}").as_bytes()).await;
        }
        store.close().await.unwrap();
        drop(store);

        let store = open(tmp.path());
        let new = publish(&store, "t", &["a"], b"new").await;
        assert_eq!(new, 6);
        // A dispatcher part-way through the backlog must read the store:
        // nothing from memory may skip what was stored before the restart.
        for cursor in 0..new {
            assert!(
                take_fresh_checked(&store, "a", cursor).is_empty(),
                "{cursor}"
            );
        }
        let state = store.subscription("a").unwrap();
        assert_eq!(store.scan_pending(&state, 1, new, 100).unwrap().len(), 6);
        let next = publish(&store, "t", &["a"], b"next").await;
        assert_eq!(take_fresh_checked(&store, "a", new + 1), vec![next]);
        store.close().await.unwrap();
    }

    /// Keys of one kind in the tree.
    fn keys_of(store: &Store, kind: u8) -> usize {
        store.db().scan_prefix([kind]).count()
    }

    #[tokio::test]
    async fn a_message_with_one_receiver_lives_in_its_pending_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let seq = publish(&store, "t", &["a"], b"just for a").await;
        let shared = publish(&store, "t", &["a", "b"], b"for both").await;
        let (a, topic) = (store.subscription("a").unwrap(), store.topic("t").unwrap());
        // One topic copy (the shared message's); a's first entry holds its message.
        assert_eq!(keys_of(&store, keys::MESSAGE), 1);
        assert!(store.load_message(topic.id, seq).unwrap().is_none());
        let value = store.pending_value(a.id, seq).unwrap().unwrap();
        assert!(value.len() > Pending::LEN);
        // Fresh, it is packed in its block; the shared message's entries
        // (a's and b's) are keys.
        assert_eq!(keys_of(&store, keys::PACKED), 1);
        assert_eq!(keys_of(&store, keys::PENDING), 2);
        let rows = store.scan_pending(&a, 0, u64::MAX, 10).unwrap();
        let bodies: Vec<(u64, Vec<u8>)> = rows
            .iter()
            .map(|(seq, _, m)| (*seq, payload(&m.as_ref().unwrap().envelope)))
            .collect();
        assert_eq!(
            bodies,
            [
                (seq, b"just for a".to_vec()),
                (shared, b"for both".to_vec())
            ]
        );

        // A requeue rewrites the entry's fields and keeps its message.
        let requeued = Pending {
            attempts: 2,
            not_before_ms: 1234,
        };
        store.requeue(a.id, seq, requeued).await.unwrap();
        store.sync().await.unwrap();
        let (_, pending, message) = store.pending_rows(&a, &[seq]).unwrap().remove(0);
        assert_eq!(pending, requeued);
        assert_eq!(payload(&message.unwrap().envelope), b"just for a");
        // Its fields set, it has left its block (now empty) for its own key.
        assert_eq!(keys_of(&store, keys::PACKED), 0);
        assert_eq!(keys_of(&store, keys::PENDING), 3);

        // Acked: the entry goes, and the shared copy stays for b.
        ack(&store, "a", seq).await;
        ack(&store, "a", shared).await;
        assert_eq!(a.depth(), 0);
        assert_eq!(keys_of(&store, keys::MESSAGE), 1, "b still holds it");
        assert!(store.scan_pending(&a, 0, u64::MAX, 10).unwrap().is_empty());
        assert_eq!(keys_of(&store, keys::PENDING), 1, "b's");

        // It survives a restart like any entry.
        let again = publish(&store, "t", &["a"], b"after restart").await;
        store.close().await.unwrap();
        drop(store);
        let store = open(tmp.path());
        let message = store.pending_message("a", again).unwrap();
        assert_eq!(payload(&message.envelope), b"after restart");
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn packed_and_own_entries_read_in_order_across_blocks_and_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        for i in 1..=150u64 {
            assert_eq!(publish(&store, "t", &["a"], &i.to_be_bytes()).await, i);
        }
        let a = store.subscription("a").unwrap();
        // Sequences 1..=150 fill blocks 0, 1 and 2.
        assert_eq!(keys_of(&store, keys::PACKED), 3);
        assert_eq!(keys_of(&store, keys::PENDING), 0);
        let moved = Pending {
            attempts: 1,
            not_before_ms: 0,
        };
        for seq in [10, 70, 128] {
            store.requeue(a.id, seq, moved).await.unwrap();
        }
        store.sync().await.unwrap();
        assert_eq!(keys_of(&store, keys::PENDING), 3);

        let check = |store: &Store, from: u64, to: u64, limit: usize, want: Vec<u64>| {
            let rows = store.scan_pending(&a, from, to, limit).unwrap();
            let got: Vec<u64> = rows.iter().map(|(seq, _, _)| *seq).collect();
            assert_eq!(got, want, "scan {from}..={to} limit {limit}");
            for (seq, pending, message) in rows {
                let expected = if [10, 70, 128].contains(&seq) {
                    moved
                } else {
                    Pending::default()
                };
                assert_eq!(pending, expected, "entry {seq}");
                assert_eq!(payload(&message.unwrap().envelope), &seq.to_be_bytes());
            }
        };
        check(&store, 60, 140, 20, (60..80).collect());
        check(&store, 125, 130, 100, (125..=130).collect());
        check(&store, 0, u64::MAX, 1000, (1..=150).collect());
        let rows = store.pending_rows(&a, &[10, 11, 151]).unwrap();
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [10, 11]);

        store.close().await.unwrap();
        drop(store);
        let store = open(tmp.path());
        let a = store.subscription("a").unwrap();
        check(&store, 0, u64::MAX, 1000, (1..=150).collect());
        assert_eq!(a.depth(), 150);
        for seq in (1..=150).rev() {
            ack(&store, "a", seq).await;
        }
        assert_eq!(a.depth(), 0);
        assert_eq!(keys_of(&store, keys::PACKED), 0);
        assert_eq!(keys_of(&store, keys::PENDING), 0);
        assert!(bodies::live_counts(store.db()).unwrap().is_empty());
        store.close().await.unwrap();
    }

    fn segments_of(dir: &Path) -> Vec<u64> {
        bodies::list(dir).unwrap()
    }

    fn envelopes(store: &Store, sub: &str) -> Vec<(u64, Vec<u8>)> {
        let sub = store.subscription(sub).unwrap();
        store
            .scan_pending(&sub, 0, u64::MAX, 100)
            .unwrap()
            .into_iter()
            .map(|(seq, _, m)| (seq, payload(&m.unwrap().envelope)))
            .collect()
    }

    /// A store with 400-byte message segments and messages 1..=`n` for
    /// subscription a, the i-th `[i; 100]`: 175-byte stored values, two to
    /// a segment.
    async fn small_segments_with(n: u8) -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let store = try_open_with(tmp.path(), 400).unwrap();
        for i in 1..=n {
            assert_eq!(publish(&store, "t", &["a"], &[i; 100]).await, u64::from(i));
        }
        (tmp, store)
    }

    #[tokio::test]
    async fn sparse_segments_are_compacted_and_a_stale_reference_still_reads() {
        let (tmp, store) = small_segments_with(7).await;
        let body = |i: u8| vec![i; 100];
        assert_eq!(segments_of(tmp.path()), [0, 1, 2, 3]);
        let a = store.subscription("a").unwrap();
        let stale = store.pending_value(a.id, 1).unwrap().unwrap();

        // Segments 0 and 1 become half live (each pinned by one message);
        // segment 2 stays whole, segment 3 is still written.
        ack(&store, "a", 2).await;
        ack(&store, "a", 4).await;
        assert_eq!(segments_of(tmp.path()), [0, 1, 2, 3]);
        store.tick();
        store.sync().await.unwrap();

        // 1 went after 7 in segment 3, 3 to a new segment 4; 0 and 1 are gone.
        assert_eq!(segments_of(tmp.path()), [2, 3, 4]);
        let live = bodies::live_counts(store.db()).unwrap();
        assert_eq!(
            (live.get(&2), live.get(&3), live.get(&4)),
            (Some(&2), Some(&2), Some(&1))
        );
        let expected: Vec<(u64, Vec<u8>)> = [1u8, 3, 5, 6, 7]
            .iter()
            .map(|&i| (u64::from(i), body(i)))
            .collect();
        assert_eq!(envelopes(&store, "a"), expected);
        assert_eq!(a.depth(), 5);

        // A reader that read entry 1 before the move follows it to its new place.
        let rows = store.pending_rows_of(&a, &[(1, stale)]).unwrap();
        assert_eq!(payload(&rows[0].2.as_ref().unwrap().envelope), body(1));

        // A second sweep finds nothing more to do (segment 3 is still
        // written, 2 and 4 are whole or current).
        store.tick();
        store.sync().await.unwrap();
        assert_eq!(segments_of(tmp.path()), [2, 3, 4]);

        // The moves survive a restart, and acking everything frees the space.
        store.close().await.unwrap();
        drop(store);
        let store = try_open_with(tmp.path(), 400).unwrap();
        assert_eq!(envelopes(&store, "a"), expected);
        for (seq, _) in &expected {
            ack(&store, "a", *seq).await;
        }
        assert!(
            segments_of(tmp.path()).len() <= 1,
            "only a current segment may stay"
        );
        assert!(bodies::live_counts(store.db()).unwrap().is_empty());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_few_pinned_messages_keep_no_more_than_twice_their_bytes_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let segment = 64 << 10;
        let store = try_open_with(tmp.path(), segment).unwrap();
        let n = 2_000u64;
        for _ in 0..n {
            publish(&store, "t", &["a"], &[7; 1024]).await;
        }
        // Every hundredth left pending, as a consumer's held or
        // long-delayed messages would be.
        for seq in (1..=n).filter(|seq| seq % 100 != 0) {
            ack(&store, "a", seq).await;
        }
        let on_disk = |dir: &Path| -> u64 {
            bodies::list(dir)
                .unwrap()
                .into_iter()
                .map(|s| {
                    std::fs::metadata(bodies::segment_path(dir, s))
                        .unwrap()
                        .len()
                })
                .sum()
        };
        let live: u64 = bodies::segment_infos(store.db())
            .unwrap()
            .values()
            .map(|info| info.extent.unwrap().live_bytes)
            .sum();
        assert_eq!(store.subscription("a").unwrap().depth(), 20);
        assert!(
            on_disk(tmp.path()) > 10 * live,
            "pinned: {} for {live}",
            on_disk(tmp.path())
        );
        // A sweep moves a bounded amount (4 KiB in tests): a few sweeps.
        let mut sweeps = 0;
        while on_disk(tmp.path()) > 2 * live + segment {
            sweeps += 1;
            assert!(
                sweeps <= 20,
                "{} bytes on disk for {live} live",
                on_disk(tmp.path())
            );
            store.tick();
            store.sync().await.unwrap();
        }
        assert!(sweeps > 1, "each sweep moves at most 4 KiB here");
        assert_eq!(envelopes(&store, "a").len(), 20);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn compaction_reads_a_bounded_number_of_entries_per_sweep_and_goes_on_from_there() {
        let (tmp, store) = small_segments_with(20).await;
        // Segment 0 half live: 1 moves to a new segment 10, whose lowest
        // sequence is then 1.
        ack(&store, "a", 2).await;
        store.tick();
        store.sync().await.unwrap();
        assert!(!segments_of(tmp.path()).contains(&0));
        for i in 21..=25 {
            publish(&store, "t", &["a"], &[i; 100]).await;
        }
        // Segment 10 holds 1 and 21; with 1 acked it is half live, and its
        // one live entry lies past the 18 pending entries 3..=20 of full
        // segments: more than a sweep reads in tests (8).
        ack(&store, "a", 1).await;
        let mut sweeps = 0;
        while segments_of(tmp.path()).contains(&10) {
            sweeps += 1;
            assert!(sweeps <= 5, "segment 10 still there after {sweeps} sweeps");
            store.tick();
            store.sync().await.unwrap();
        }
        assert_eq!(
            sweeps, 3,
            "8 entries a sweep: 3..=10, 11..=18, then 19..=21"
        );
        let rows = envelopes(&store, "a");
        let seqs: Vec<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(seqs, (3..=25).collect::<Vec<_>>());
        assert_eq!(rows[18].1, vec![21; 100]);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_segment_is_compacted_only_once_it_has_stayed_sparse() {
        let tmp = tempfile::tempdir().unwrap();
        let store = try_open_compacting_after(tmp.path(), 400, Duration::from_millis(300)).unwrap();
        for i in 1..=3 {
            publish(&store, "t", &["a"], &[i; 100]).await;
        }
        ack(&store, "a", 2).await;
        // Half live, but only just: as a segment being consumed would be.
        store.tick();
        store.sync().await.unwrap();
        assert_eq!(segments_of(tmp.path()), [0, 1]);
        tokio::time::sleep(Duration::from_millis(400)).await;
        store.tick();
        store.sync().await.unwrap();
        // 1 went after 3 in segment 1, still being written.
        assert_eq!(segments_of(tmp.path()), [1]);
        assert_eq!(
            envelopes(&store, "a")
                .iter()
                .map(|r| r.0)
                .collect::<Vec<_>>(),
            [1, 3]
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_compaction_sled_lost_comes_back_from_the_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        let store = try_open_with(&live, 400).unwrap();
        for i in 1..=5 {
            publish(&store, "t", &["a"], &[i; 100]).await;
        }
        ack(&store, "a", 2).await;
        store.close().await.unwrap();
        drop(store);
        // sled and the segments before the compaction.
        let lost = tmp.path().join("lost");
        copy_dir(&live, &lost);

        let store = try_open_with(&live, 400).unwrap();
        store.tick();
        store.sync().await.unwrap();
        assert!(!segments_of(&live).contains(&0), "segment 0 compacted away");
        store.close().await.unwrap();
        drop(store);
        // A power cut after the unlink of segment 0, before sled or the new
        // segment reached the disk: only the journal has the move.
        std::fs::copy(live.join(journal::FILE), lost.join(journal::FILE)).unwrap();
        std::fs::remove_file(bodies::segment_path(&lost, 0)).unwrap();
        let store = try_open_with(&lost, 400).unwrap();
        let got = envelopes(&store, "a");
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 3, 4, 5]);
        assert_eq!(got[0].1, vec![1; 100]);
        assert!(!segments_of(&lost).contains(&0));
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn message_bodies_live_in_segment_files_that_go_once_nothing_refers_to_them() {
        let (tmp, store) = small_segments_with(5).await;
        let body = |i: u8| vec![i; 100];
        assert_eq!(segments_of(tmp.path()), [0, 1, 2]);
        assert_eq!(keys_of(&store, keys::MESSAGE), 0, "no topic copies");
        let live = bodies::live_counts(store.db()).unwrap();
        assert_eq!(
            (live.get(&0), live.get(&1), live.get(&2)),
            (Some(&2), Some(&2), Some(&1))
        );
        let all: Vec<(u64, Vec<u8>)> = (1..=5).map(|i| (u64::from(i), body(i))).collect();
        assert_eq!(envelopes(&store, "a"), all);

        // Segment 0 goes with its last body; segment 2, still being
        // written, stays even when nothing in it is pending.
        ack(&store, "a", 1).await;
        assert_eq!(segments_of(tmp.path()), [0, 1, 2]);
        ack(&store, "a", 2).await;
        assert_eq!(segments_of(tmp.path()), [1, 2]);
        ack(&store, "a", 5).await;
        assert_eq!(segments_of(tmp.path()), [1, 2]);
        assert!(!bodies::live_counts(store.db()).unwrap().contains_key(&2));

        // Another subscription's bodies go to a segment of its own.
        assert_eq!(publish(&store, "t", &["b"], &body(6)).await, 6);
        let b = store.subscription("b").unwrap();
        assert_eq!(segments_of(tmp.path()), [1, 2, 3]);

        // After a restart the emptied segment 2 is removed, writing goes on
        // in a new segment, and every body reads back.
        store.close().await.unwrap();
        drop(store);
        let store = try_open_with(tmp.path(), 400).unwrap();
        assert_eq!(segments_of(tmp.path()), [1, 3]);
        assert_eq!(publish(&store, "t", &["a"], &body(7)).await, 7);
        assert_eq!(segments_of(tmp.path()), [1, 3, 4]);
        assert_eq!(
            envelopes(&store, "a"),
            [(3, body(3)), (4, body(4)), (7, body(7))]
        );
        let b = store.subscription(&b.name).unwrap();
        let event = AuditEvent::new(crate::audit::EventKind::Purge, "ops");
        let purged = store
            .purge_chunk(b, store.topic("t").unwrap(), 100, event, true)
            .await
            .unwrap();
        // A purge releases the bodies of the entries it removes.
        assert_eq!(purged, 1);
        assert_eq!(segments_of(tmp.path()), [1, 4]);
        store.close().await.unwrap();
        drop(store);

        // A damaged body is an error, not another message.
        damage_segment(tmp.path(), 1, Some(120));
        let store = try_open_with(tmp.path(), 400).unwrap();
        assert_damage_named(&store, "a");
        store.close().await.unwrap();
    }

    /// Flips the byte at `at` of message segment `segment` (None: its last).
    fn damage_segment(dir: &Path, segment: u64, at: Option<usize>) {
        let path = bodies::segment_path(dir, segment);
        let mut data = std::fs::read(&path).unwrap();
        let at = at.unwrap_or(data.len() - 1);
        data[at] ^= 0xFF;
        std::fs::write(&path, data).unwrap();
    }

    /// Reading `sub`'s pending entries fails, naming the damaged body.
    fn assert_damage_named(store: &Store, sub: &str) {
        let sub = store.subscription(sub).unwrap();
        let err = store.scan_pending(&sub, 0, u64::MAX, 10).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[tokio::test]
    async fn a_damaged_body_stops_neither_the_expiry_sweep_nor_publishing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let expired = publish_expiring(&store, "t", &["a"], b"damaged", now_ms() - 10, true).await;
        damage_segment(tmp.path(), 0, None);
        store.tick();
        store.sync().await.unwrap();
        assert!(expired_seqs(&store, "a").is_empty(), "nothing to report");
        // The store still takes publishes, and the damage is an error where
        // the entry is read.
        assert_eq!(publish(&store, "t", &["b"], b"next").await, expired + 1);
        assert_damage_named(&store, "a");
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_message_nobody_consumes_keeps_only_its_own_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let store = try_open_with(tmp.path(), 400).unwrap();
        let waiting = publish(&store, "t", &["b"], &[0u8; 100]).await;
        for i in 0..10u8 {
            let seq = publish(&store, "t", &["a"], &[i; 100]).await;
            ack(&store, "a", seq).await;
        }
        // b's segment, and the one a writes now; a's full ones are gone.
        assert_eq!(segments_of(tmp.path()), [0, 5]);
        assert_eq!(envelopes(&store, "b"), [(waiting, vec![0u8; 100])]);
        store.close().await.unwrap();
    }

    /// Marks `store` (in `dir`) as format `version` and opens it again, as
    /// an upgrade finds it; it must then be marked the current version.
    async fn reopened_from_version(store: Store, dir: &Path, version: u32) -> Store {
        store
            .db()
            .insert(keys::FORMAT, &version.to_be_bytes())
            .unwrap();
        store.close().await.unwrap();
        drop(store);
        let store = open(dir);
        let marked = store.db().get(keys::FORMAT).unwrap().unwrap();
        assert_eq!(keys::be_u32(&marked), Some(FORMAT_VERSION));
        store
    }

    #[tokio::test]
    async fn a_version_3_store_with_inline_messages_is_read_and_marked_version_4() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let seq = publish(&store, "t", &["a"], b"inline in version 3").await;
        let later = publish(&store, "t", &["a"], b"in a segment").await;
        let a = store.subscription("a").unwrap();
        // As version 3 stored the first: the value after the entry's fields.
        let value = StoredMessage::encode_value(
            MessageHeader {
                publish_ms: now_ms(),
                expires_ms: 0,
                digest: &[0; 32],
                message_id: "m",
                message_type: "t.T",
                expiry_by_order: false,
            },
            &prost::Message::encode_to_vec(&enveloped(b"inline in version 3")),
        );
        let inline = Pending::default().encode_inline(&value);
        store.db().insert(keys::pending(a.id, seq), inline).unwrap();
        let store = reopened_from_version(store, tmp.path(), 3).await;
        assert_eq!(
            envelopes(&store, "a"),
            [
                (seq, b"inline in version 3".to_vec()),
                (later, b"in a segment".to_vec())
            ]
        );
        ack(&store, "a", seq).await;
        ack(&store, "a", later).await;
        assert_eq!(store.subscription("a").unwrap().depth(), 0);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_version_1_store_is_read_and_marked_version_2() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let seq = publish(&store, "t", &["a", "b"], b"stored by version 1").await;
        let store = reopened_from_version(store, tmp.path(), 1).await;
        assert_eq!(
            payload(&store.pending_message("b", seq).unwrap().envelope),
            b"stored by version 1"
        );
        store
            .db()
            .insert(keys::FORMAT, &9u32.to_be_bytes())
            .unwrap();
        store.close().await.unwrap();
        drop(store);
        match try_open(tmp.path()) {
            Err(StorageError::Corrupt { what }) => {
                assert!(what.contains("data format version Some(9)"), "{what}")
            }
            other => panic!("a version 9 store was not refused: {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn topic_copy_is_released_when_the_last_subscription_acks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let seq = publish(&store, "t", &["a", "b"], b"hello").await;
        let topic = store.topic("t").unwrap();
        assert_eq!(topic.committed(), seq);
        assert_eq!(store.subscription("a").unwrap().depth(), 1);

        ack(&store, "a", seq).await;
        assert!(
            store.load_message(topic.id, seq).unwrap().is_some(),
            "b still holds it"
        );
        assert_eq!(store.subscription("a").unwrap().depth(), 0);

        ack(&store, "b", seq).await;
        assert!(
            store.load_message(topic.id, seq).unwrap().is_none(),
            "released"
        );
        // A second ack of the same message changes nothing.
        let sub = store.subscription("b").unwrap();
        let gone = Arc::new(StoredMessage::placeholder(topic.id, seq));
        store
            .settle(
                sub.clone(),
                topic.clone(),
                gone,
                Outcome::Ack,
                "council".into(),
            )
            .await
            .unwrap();
        store.sync().await.unwrap();
        assert_eq!(sub.depth(), 0);
        store.close().await.unwrap();
    }

    fn expired_seqs(store: &Store, sub: &str) -> Vec<u64> {
        let mut seqs: Vec<u64> = store
            .subscription(sub)
            .unwrap()
            .take_expired()
            .iter()
            .map(|m| m.seq)
            .collect();
        seqs.sort();
        seqs
    }

    fn expiry_entries(store: &Store) -> usize {
        store.db().scan_prefix([keys::EXPIRY]).count()
    }

    #[tokio::test]
    async fn retention_expiry_is_found_in_sequence_order_without_index_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let now = now_ms();
        let hour = 3_600_000;
        let by_order = |body: &'static [u8], targets: &'static [&'static str], at: u64| {
            let store = store.clone();
            async move { publish_expiring(&store, "t", targets, body, at, true).await }
        };
        // One receiver: inline in a's pending entry, found by a's own walk.
        let s0 = by_order(b"retention, expired, inline", &["a"], now - 20).await;
        let s1 = by_order(b"retention, expired", &["a", "b"], now - 10).await;
        let s2 =
            publish_expiring(&store, "t", &["a"], b"expires_at, expired", now - 5, false).await;
        let s3 = by_order(b"retention, not yet", &["a"], now + hour).await;
        let _s4 = by_order(b"clock stepped back", &["a"], now - 1).await;
        let _s5 = publish(&store, "t", &["a"], b"never").await;
        // Only the expires_at message has an expiry-index entry.
        assert_eq!(expiry_entries(&store), 1);

        store.tick();
        store.sync().await.unwrap();
        assert_eq!(expired_seqs(&store, "a"), [s0, s1, s2]);
        assert_eq!(expired_seqs(&store, "b"), [s1]);
        // The walk stopped at s3: a second sweep reports nothing new, and s4
        // waits behind it (it is never delivered meanwhile: dispatchers check).
        store.tick();
        store.sync().await.unwrap();
        assert!(expired_seqs(&store, "a").is_empty());

        // Settling releases the copies; only s2 had an index entry to remove.
        let topic = store.topic("t").unwrap();
        assert!(
            store.load_message(topic.id, s0).unwrap().is_none(),
            "inline"
        );
        for (sub, seq) in [("a", s0), ("a", s1), ("b", s1), ("a", s2)] {
            let message = store.pending_message(sub, seq).unwrap();
            let outcome = Outcome::DeadLetter {
                reason: DeadReason::Expired,
                attempts: 0,
            };
            store
                .settle(
                    store.subscription(sub).unwrap(),
                    topic.clone(),
                    message,
                    outcome,
                    "council".into(),
                )
                .await
                .unwrap();
        }
        store.sync().await.unwrap();
        assert!(store.load_message(topic.id, s1).unwrap().is_none());
        assert!(store.load_message(topic.id, s2).unwrap().is_none());
        assert_eq!(expiry_entries(&store), 0);
        assert!(store.pending_message("a", s3).unwrap().expiry_by_order);
        assert!(
            store.load_message(topic.id, s3).unwrap().is_none(),
            "s3 has one receiver: it is inline in a's pending entry"
        );

        // After a restart the walk starts again from the oldest message.
        store.close().await.unwrap();
        drop(store);
        let store = open(tmp.path());
        store.tick();
        store.sync().await.unwrap();
        assert!(
            expired_seqs(&store, "a").is_empty(),
            "s3 still holds the walk"
        );
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_message_no_subscription_receives_is_not_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let seq = publish(&store, "quiet", &[], b"nobody listens").await;
        let topic = store.topic("quiet").unwrap();
        assert_eq!(topic.committed(), seq, "it still takes a sequence");
        assert!(store.load_message(topic.id, seq).unwrap().is_none());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn counters_and_sequences_survive_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        for _ in 0..3 {
            publish(&store, "t", &["a"], b"x").await;
        }
        store.close().await.unwrap();
        drop(store);
        let store = open(tmp.path());
        assert_eq!(store.subscription("a").unwrap().depth(), 3);
        assert_eq!(store.subscription("b").unwrap().depth(), 0);
        assert_eq!(publish(&store, "t", &["a"], b"y").await, 4);
        let rows = store
            .scan_pending(&store.subscription("a").unwrap(), 0, 10, 10)
            .unwrap();
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
        store.close().await.unwrap();
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn groups_sled_lost_come_back_from_the_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        let store = open(&live);
        for _ in 0..3 {
            publish(&store, "t", &["a"], b"before").await;
        }
        store.close().await.unwrap();
        drop(store);
        // sled as it was then: what a power cut could leave of later groups.
        let lost = tmp.path().join("lost");
        copy_dir(&live, &lost);

        let store = open(&live);
        // A group of nothing but an audit record takes a journal number too.
        let event = AuditEvent::new(crate::audit::EventKind::Peek, "council");
        store.audit(event).await.unwrap();
        for _ in 0..3 {
            publish(&store, "t", &["a", "b"], b"after").await;
        }
        // A body in a segment file the copy below does not have.
        assert_eq!(
            publish(&store, "t", &["a"], b"only in the journal").await,
            7
        );
        let sub = store.subscription("a").unwrap();
        let topic = store.topic("t").unwrap();
        let message = store.pending_message("a", 1).unwrap();
        store
            .settle(sub, topic, message, Outcome::Ack, "council".into())
            .await
            .unwrap();
        store.close().await.unwrap();
        drop(store);
        std::fs::copy(live.join(journal::FILE), lost.join(journal::FILE)).unwrap();
        // And what a crash can leave of audit segments written after the
        // last checkpoint: a torn frame, and a later segment.
        let segs = crate::audit::segments::dir_of(&lost);
        let (_, last) = crate::audit::segments::list(&segs).unwrap().pop().unwrap();
        let mut data = std::fs::read(&last).unwrap();
        data.extend_from_slice(&[0x5A; 40]);
        std::fs::write(&last, data).unwrap();
        std::fs::write(segs.join("00000000000000000100.seg"), [1u8; 64]).unwrap();

        let store = open(&lost);
        let a = store.subscription("a").unwrap();
        assert_eq!(a.depth(), 6);
        assert_eq!(store.subscription("b").unwrap().depth(), 3);
        let rows = store.scan_pending(&a, 0, 10, 10).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            [2, 3, 4, 5, 6, 7]
        );
        let replayed = rows[5].2.as_ref().unwrap();
        assert_eq!(payload(&replayed.envelope), b"only in the journal");
        assert_eq!(publish(&store, "t", &["a"], b"next").await, 8);
        store.close().await.unwrap();
        drop(store);
        // The audit chain is whole: three publishes, then the peek, four
        // publishes and the ack from the journal, then the last publish.
        let db = open_existing(&lost).unwrap();
        let v = crate::audit::verify(&db, &lost).unwrap();
        assert_eq!((v.first_seq, v.last_seq), (Some(1), Some(10)));
    }

    /// Writes audit blocks of `sizes` records into sled as store format 2
    /// kept them, each through `edit` first.
    fn put_legacy_blocks(
        db: &sled::Db,
        chain: &mut Chain,
        sizes: &[usize],
        edit: impl Fn(&[u8; 9], &mut Vec<u8>),
    ) {
        for &n in sizes {
            let mut w = crate::audit::blocks::BlockWriter::default();
            for _ in 0..n {
                let event = AuditEvent::new(crate::audit::EventKind::Ack, "council");
                chain.append_to(event, 2, &mut w);
            }
            for (key, mut value) in w.finish() {
                edit(&key, &mut value);
                db.insert(key, value).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_version_2_store_has_its_audit_log_moved_into_segment_files() {
        use crate::audit::{segments, EventKind};
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        let seq = publish(&store, "t", &["a"], b"stored by version 2").await;
        store.close().await.unwrap();
        drop(store);
        // As version 2 kept it: no segments, records in sled (four single
        // records and two blocks).
        let db = open_sled(tmp.path(), 4 << 20, crate::audit::segments::SEGMENT_BYTES).unwrap();
        std::fs::remove_dir_all(segments::dir_of(tmp.path())).unwrap();
        db.remove(keys::AUDIT_TAIL).unwrap();
        let mut chain = Chain::load(&db, None, Duration::from_secs(86400)).unwrap();
        for _ in 0..4 {
            let (seq, value) = chain.append(&AuditEvent::new(EventKind::Publish, "police"), 1);
            db.insert(keys::audit(seq), value).unwrap();
        }
        put_legacy_blocks(&db, &mut chain, &[3, 2], |_, _| {});
        db.insert(keys::FORMAT, &2u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
        drop(db);
        match open_existing(tmp.path()) {
            Err(e) => assert!(e.to_string().contains("start the broker"), "{e}"),
            Ok(_) => panic!("a version 2 store opened for reading"),
        }

        let store = open(tmp.path());
        let version = store.db().get(keys::FORMAT).unwrap().unwrap();
        assert_eq!(keys::be_u32(&version), Some(FORMAT_VERSION));
        // The journal's old pass is not read again: it has no recorded end.
        let journal = std::fs::read(tmp.path().join(journal::FILE)).unwrap();
        assert!(journal::records(&journal).is_empty());
        assert_eq!(store.db().scan_prefix([keys::AUDIT]).count(), 0);
        assert_eq!(store.db().scan_prefix([keys::AUDIT_BLOCK]).count(), 0);
        assert_eq!(
            payload(&store.pending_message("a", seq).unwrap().envelope),
            b"stored by version 2"
        );
        // The chain goes on after the moved records.
        publish(&store, "t", &["a"], b"stored by version 3").await;
        store.close().await.unwrap();
        drop(store);
        let db = open_existing(tmp.path()).unwrap();
        let v = crate::audit::verify(&db, tmp.path()).unwrap();
        assert_eq!((v.first_seq, v.last_seq), (Some(1), Some(10)));
    }

    #[tokio::test]
    async fn a_damaged_old_format_audit_log_is_moved_as_it_is_for_verify_to_name() {
        let tmp = tempfile::tempdir().unwrap();
        open(tmp.path()).close().await.unwrap();
        let db = open_sled(tmp.path(), 4 << 20, crate::audit::segments::SEGMENT_BYTES).unwrap();
        assert!(!crate::audit::segments::dir_of(tmp.path()).exists());
        let mut chain = Chain::load(&db, None, Duration::from_secs(86400)).unwrap();
        put_legacy_blocks(&db, &mut chain, &[2, 2, 2], |key, value| {
            if *key == keys::audit_block(3) {
                // The middle block cut short.
                value.truncate(value.len() - 7);
            }
        });
        // And a key that names no record.
        db.insert([keys::AUDIT_BLOCK, 1, 2], &b"junk"[..]).unwrap();
        db.insert(keys::FORMAT, &2u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
        drop(db);

        let store = open(tmp.path());
        assert_eq!(store.db().scan_prefix([keys::AUDIT_BLOCK]).count(), 0);
        publish(&store, "t", &["a"], b"after the move").await;
        store.close().await.unwrap();
        drop(store);
        let db = open_existing(tmp.path()).unwrap();
        match crate::audit::verify(&db, tmp.path()) {
            Err(crate::audit::AuditError::Broken { seq, .. }) => assert_eq!(seq, 3),
            other => panic!("expected record 3 broken, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn old_audit_segments_are_pruned_whole_and_the_chain_still_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let options = |retention| StoreOptions {
            cache_capacity: 4 << 20,
            dedup_window: Duration::from_secs(60),
            max_batch: 16,
            audit_retention: Some(retention),
            // About one publish record per segment.
            audit_segment_bytes: 64,
            body_segment_bytes: crate::storage::bodies::SEGMENT_BYTES,
            compact_after: crate::storage::bodies::COMPACT_AFTER,
            reports: Vec::new(),
            deliver_before_sync: Vec::new(),
        };
        let topics = ["t".to_string()];
        let subs = [("a".to_string(), "t".to_string())];
        let open_with =
            |retention| Store::open(tmp.path(), options(retention), &topics, &subs).unwrap();
        let store = open_with(Duration::from_secs(86400));
        for _ in 0..20 {
            publish(&store, "t", &["a"], b"old").await;
        }
        store.close().await.unwrap();
        drop(store);
        let segs = crate::audit::segments::dir_of(tmp.path());
        let before = crate::audit::segments::list(&segs).unwrap().len();
        assert!(before >= 10, "{before} segments");

        // Now every record is older than the retention.
        let store = open_with(Duration::from_millis(1));
        // A sweep prunes at most 16 segments, and looks again 50 ms later.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            store.tick();
            store.sync().await.unwrap();
        }
        publish(&store, "t", &["a"], b"new").await;
        store.close().await.unwrap();
        drop(store);
        let after = crate::audit::segments::list(&segs).unwrap().len();
        assert!(after < before && after <= 3, "{before} -> {after} segments");
        let db = open_existing(tmp.path()).unwrap();
        let v = crate::audit::verify(&db, tmp.path()).unwrap();
        assert_eq!(v.last_seq, Some(21));
        assert!(v.anchored_at.is_some_and(|a| a > 10), "{v:?}");
    }

    #[tokio::test]
    async fn a_store_whose_data_cannot_be_recovered_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = open(tmp.path());
        publish(&store, "t", &["a"], b"precious").await;
        store.close().await.unwrap();
        drop(store);
        // Garbage over sled's file: sled itself would open it as empty.
        std::fs::write(tmp.path().join("db"), vec![0xA5u8; 256 * 1024]).unwrap();
        let err = Store::open(
            tmp.path(),
            StoreOptions {
                cache_capacity: 4 << 20,
                dedup_window: Duration::from_secs(60),
                max_batch: 16,
                audit_retention: Some(Duration::from_secs(86400)),
                audit_segment_bytes: crate::audit::segments::SEGMENT_BYTES,
                body_segment_bytes: crate::storage::bodies::SEGMENT_BYTES,
                compact_after: crate::storage::bodies::COMPACT_AFTER,
                reports: Vec::new(),
                deliver_before_sync: Vec::new(),
            },
            &["t".to_string()],
            &[],
        )
        .err()
        .expect("an unrecoverable store must be refused");
        assert!(err.to_string().contains("recovered no data"), "{err}");
    }

    #[tokio::test]
    async fn a_subscription_moved_to_another_topic_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        open(tmp.path()).close().await.unwrap();
        let err = Store::open(
            tmp.path(),
            StoreOptions {
                cache_capacity: 4 << 20,
                dedup_window: Duration::from_secs(60),
                max_batch: 16,
                audit_retention: Some(Duration::from_secs(86400)),
                audit_segment_bytes: crate::audit::segments::SEGMENT_BYTES,
                body_segment_bytes: crate::storage::bodies::SEGMENT_BYTES,
                compact_after: crate::storage::bodies::COMPACT_AFTER,
                reports: Vec::new(),
                deliver_before_sync: Vec::new(),
            },
            &["t".to_string(), "quiet".to_string()],
            &[("a".to_string(), "quiet".to_string())],
        )
        .err()
        .expect("moved subscription must be refused");
        assert!(
            matches!(err, StorageError::SubscriptionMoved { .. }),
            "{err}"
        );
    }
}
