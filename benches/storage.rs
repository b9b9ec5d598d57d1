//! What the durable store costs, through its public API
//! (`joinery::storage::Store`) on a real sled directory with real fsyncs:
//! - `storage/append`: N publishes of a 1 KiB payload submitted at once and
//!   timed until every one is answered durable; the writer thread groups
//!   them into as few flushes as it can (group commit);
//! - `storage/ack`: N acks, timed until a sync confirms they are flushed;
//! - `storage/redeliver`: N pending entries requeued with one more attempt
//!   (what a missed ack deadline or a nack persists), until flushed.
//!
//! Each publish carries what the broker gives it: a client message id (so a
//! dedup lookup and entry), an expiry (the topic's retention) and its audit
//! record in the same batch. The store, its temporary directory (under
//! cargo's target tmp dir, on disk) and the runtime are set up outside the
//! timed loops; the untimed part of an iteration publishes what it will ack,
//! or acks what it published, so the store stays the same size throughout.
//! After each benchmark the mean number of flushes (each one an fsync) per
//! timed iteration is printed, to show how the N operations were grouped.
//!
//! - `storage/sled_leaf/insert_remove/{40,1260}`: sled alone, 1,000
//!   sequential keys inserted then removed, with values the size of an
//!   inline pending entry for a 1 KiB payload (1,260 bytes) or of a small
//!   reference to a body kept outside sled (40 bytes): what keeping message
//!   bodies out of sled's leaves would save (sled copies a leaf of up to 17
//!   values on every insert and removal).
//! - `storage/bodies/{write,read}/256`: message bodies in segment files
//!   (what now keeps them out of sled): 256 bodies of 1,260 bytes written
//!   one after another and written out with one `pwrite`, or read back as
//!   one run with one `pread` and each CRC checked.
//!
//! Run with `cargo bench --bench storage` (add `-- --quick` for a fast
//! estimate).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use joinery::proto::{Envelope, Marking};
use joinery::storage::{
    keys, now_ms, Outcome, Pending, PublishOp, Published, StorageError, Store, StoredMessage,
    SubState, TopicState,
};
use prost::Message;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

/// Operations per timed iteration.
const BATCHES: [u64; 3] = [1, 64, 512];
const PAYLOAD_BYTES: usize = 1024;
const TOPIC: &str = "referral.safeguarding";
const SUBSCRIPTION: &str = "council.safeguarding-inbox";
const SENDER: &str = "police";
const OWNER: &str = "council";
const MESSAGE_TYPE: &str = "interop.referral.v1.SafeguardingReferral";
/// The topic's retention, which sets each message's expiry.
const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

type Reply = oneshot::Receiver<Result<Published, StorageError>>;

/// A store with one topic and one subscription in a temporary directory,
/// and the runtime that drives it.
struct Fixture {
    rt: Runtime,
    store: Store,
    topic: Arc<TopicState>,
    sub: Arc<SubState>,
    payload: bytes::Bytes,
    next_id: u64,
    // Dropped last: the store is closed before the directory goes.
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Opens the store with the broker's default settings.
    fn open() -> Fixture {
        let (dir, store) = common::open_store(
            "joinery-bench-storage-",
            &[TOPIC.to_string()],
            &[(SUBSCRIPTION.to_string(), TOPIC.to_string())],
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        Fixture {
            rt,
            topic: store.topic(TOPIC).expect("the topic is registered"),
            sub: store
                .subscription(SUBSCRIPTION)
                .expect("the subscription is registered"),
            store,
            payload: (0..PAYLOAD_BYTES)
                .map(|i| (i * 31 % 251) as u8)
                .collect::<Vec<u8>>()
                .into(),
            next_id: 0,
            dir,
        }
    }

    /// Flushes the writer has made so far.
    fn flushes(&self) -> u64 {
        self.store.flush_stats().snapshot().0
    }

    /// `n` publishes as the broker hands them to the store, each with the
    /// message the subscription will hold once it is durable (sequence to be
    /// filled in from the answer).
    fn prepare(&mut self, n: u64) -> (Vec<PublishOp>, Vec<(Reply, StoredMessage)>) {
        let mut ops = Vec::with_capacity(n as usize);
        let mut replies = Vec::with_capacity(n as usize);
        let digest = joinery::audit::payload_digest(&self.payload);
        for _ in 0..n {
            self.next_id += 1;
            let message_id = format!("bench-{:016}", self.next_id);
            let publish_ms = now_ms();
            let expires_ms = publish_ms + RETENTION.as_millis() as u64;
            let envelope = Envelope {
                message_id: message_id.clone(),
                message_type: MESSAGE_TYPE.into(),
                payload: self.payload.clone(),
                correlation_id: "case-2024-000123".into(),
                created_at: Some(prost_types::Timestamp {
                    seconds: (publish_ms / 1000) as i64,
                    nanos: 0,
                }),
                marking: Marking::OfficialSensitive as i32,
                headers: [("priority", "high"), ("source-system", "police-rms")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                sender: SENDER.into(),
                ..Default::default()
            };
            let encoded = envelope.encode_to_vec();
            let (reply, rx) = oneshot::channel();
            replies.push((
                rx,
                StoredMessage {
                    topic: self.topic.id,
                    seq: 0,
                    publish_ms,
                    expires_ms,
                    digest,
                    message_id: message_id.clone(),
                    message_type: MESSAGE_TYPE.into(),
                    envelope: Bytes::from(encoded),
                    // As the broker stores it: expiry from the topic's retention.
                    expiry_by_order: true,
                },
            ));
            ops.push(PublishOp {
                topic: self.topic.clone(),
                targets: vec![self.sub.clone()],
                dedup_key: Some(keys::dedup(self.topic.id, SENDER, &message_id)),
                publish_ms,
                expires_ms,
                expiry_by_order: true,
                envelope,
                reply,
            });
        }
        (ops, replies)
    }

    /// Publishes `n` new messages and waits until they are durable (untimed
    /// setup for the other benchmarks).
    fn publish(&mut self, n: u64) -> Vec<Arc<StoredMessage>> {
        let (ops, replies) = self.prepare(n);
        self.rt.block_on(submit(&self.store, ops, replies))
    }

    /// Acks `messages` and waits until that is flushed.
    fn ack(&self, messages: Vec<Arc<StoredMessage>>) {
        self.rt
            .block_on(ack(&self.store, &self.topic, &self.sub, messages));
    }

    fn close(self) {
        self.rt
            .block_on(self.store.close())
            .expect("the store closes");
        drop(self.dir);
    }
}

/// Submits every publish, then waits for every answer.
async fn submit(
    store: &Store,
    ops: Vec<PublishOp>,
    replies: Vec<(Reply, StoredMessage)>,
) -> Vec<Arc<StoredMessage>> {
    for op in ops {
        store.publish(op).await.expect("the writer is running");
    }
    let mut messages = Vec::with_capacity(replies.len());
    for (rx, mut message) in replies {
        let published = rx.await.expect("answered").expect("durable");
        assert!(!published.duplicate);
        message.seq = published.seq;
        messages.push(Arc::new(message));
    }
    messages
}

async fn ack(
    store: &Store,
    topic: &Arc<TopicState>,
    sub: &Arc<SubState>,
    messages: Vec<Arc<StoredMessage>>,
) {
    for message in messages {
        store
            .settle(
                sub.clone(),
                topic.clone(),
                message,
                Outcome::Ack,
                OWNER.into(),
            )
            .await
            .expect("the writer is running");
    }
    store.sync().await.expect("flushed");
}

async fn requeue(store: &Store, sub: u32, seqs: &[u64], attempts: u32) {
    for &seq in seqs {
        let pending = Pending {
            attempts,
            not_before_ms: 0,
        };
        store
            .requeue(sub, seq, pending)
            .await
            .expect("the writer is running");
    }
    store.sync().await.expect("flushed");
}

/// Prints the mean flushes per timed iteration of a benchmark.
fn report_flushes(name: &str, flushes: u64, iterations: u64) {
    if iterations > 0 {
        eprintln!(
            "{name}: {:.2} flushes per iteration ({iterations} iterations)",
            flushes as f64 / iterations as f64
        );
    }
}

/// `<name>/{1,64,512}`: each iteration prepares with `setup` (untimed),
/// times `timed`, then cleans up with `teardown` (untimed), and the flushes
/// the timed parts caused are reported per iteration.
fn bench_batches<S, T>(
    c: &mut Criterion,
    name: &str,
    fx: &mut Fixture,
    mut setup: impl FnMut(&mut Fixture, u64) -> S,
    mut timed: impl FnMut(&mut Fixture, S) -> T,
    mut teardown: impl FnMut(&mut Fixture, T),
) {
    let mut group = c.benchmark_group(name);
    for n in BATCHES {
        let (mut flushes, mut iterations) = (0, 0);
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let prepared = setup(fx, n);
                    let before = fx.flushes();
                    let start = Instant::now();
                    let done = timed(fx, prepared);
                    elapsed += start.elapsed();
                    flushes += fx.flushes() - before;
                    iterations += 1;
                    teardown(fx, done);
                }
                elapsed
            })
        });
        report_flushes(&format!("{name}/{n}"), flushes, iterations);
    }
    group.finish();
}

fn storage(c: &mut Criterion) {
    let mut fx = Fixture::open();

    bench_batches(
        c,
        "storage/append",
        &mut fx,
        |fx, n| fx.prepare(n),
        |fx, (ops, replies)| fx.rt.block_on(submit(&fx.store, ops, replies)),
        |fx, messages| fx.ack(messages),
    );
    bench_batches(
        c,
        "storage/ack",
        &mut fx,
        |fx, n| fx.publish(n),
        |fx, messages| fx.ack(messages),
        |_, ()| {},
    );

    // A standing backlog, requeued over and over with a rising attempt count.
    let backlog = fx.publish(BATCHES[BATCHES.len() - 1]);
    let seqs: Vec<u64> = backlog.iter().map(|m| m.seq).collect();
    let mut attempts = 0;
    let mut group = c.benchmark_group("storage/redeliver");
    for n in BATCHES {
        let (mut flushes, mut iterations) = (0, 0);
        let seqs = &seqs[..n as usize];
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let before = fx.flushes();
                let start = Instant::now();
                for _ in 0..iters {
                    attempts += 1;
                    fx.rt
                        .block_on(requeue(&fx.store, fx.sub.id, seqs, attempts));
                }
                let timed = start.elapsed();
                flushes += fx.flushes() - before;
                iterations += iters;
                timed
            })
        });
        report_flushes(&format!("storage/redeliver/{n}"), flushes, iterations);
    }
    group.finish();

    let rows = fx
        .store
        .scan_pending(&fx.sub, 0, u64::MAX, seqs.len() + 1)
        .expect("readable");
    assert_eq!(rows.len(), seqs.len(), "only the backlog is left pending");
    assert!(rows
        .iter()
        .all(|(_, pending, _)| pending.attempts == attempts));
    fx.ack(backlog);
    fx.close();
}

fn sled_leaf(c: &mut Criterion) {
    const KEYS: u64 = 1_000;
    let dir = tempfile::Builder::new()
        .prefix("joinery-bench-sled-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a temporary directory");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(32 << 20)
        .flush_every_ms(Some(500))
        .open()
        .expect("a sled database");
    let key = |i: u64| {
        let mut key = [b'p', 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        key[5..].copy_from_slice(&i.to_be_bytes());
        key
    };
    let mut next = 0u64;
    let mut group = c.benchmark_group("storage/sled_leaf");
    group.throughput(Throughput::Elements(KEYS));
    for size in [40usize, 1260] {
        let value = vec![0xA5u8; size];
        group.bench_with_input(BenchmarkId::new("insert_remove", size), &size, |b, _| {
            b.iter(|| {
                let first = next;
                next += KEYS;
                for i in first..next {
                    db.insert(key(i), &value[..]).expect("insert");
                }
                for i in first..next {
                    db.remove(key(i)).expect("remove");
                }
            })
        });
    }
    group.finish();
    assert!(db.is_empty(), "every key inserted was removed");
}

/// Message bodies in segment files: a group's bodies written with one
/// `pwrite`, and a run of them read back with one `pread` and checked.
fn bodies(c: &mut Criterion) {
    use joinery::storage::bodies::{BodyRef, Files, Reader};
    const BODIES: u64 = 256;
    const SIZE: u64 = 1_260;
    let dir = tempfile::Builder::new()
        .prefix("joinery-bench-bodies-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a temporary directory");
    let body = vec![0x5Au8; SIZE as usize];
    let mut files = Files::new(dir.path());
    let mut segment = 0u64;
    let mut group = c.benchmark_group("storage/bodies");
    group.throughput(Throughput::Elements(BODIES));
    group.bench_with_input(BenchmarkId::new("write", BODIES), &BODIES, |b, _| {
        b.iter(|| {
            segment += 1;
            for i in 0..BODIES {
                files.write(segment, i * SIZE, &body).expect("write");
            }
            files.flush().expect("flush");
            // One segment on disk at a time.
            files.remove(&[segment - 1]).expect("remove");
        })
    });
    let refs: Vec<BodyRef> = (0..BODIES)
        .map(|i| BodyRef {
            segment,
            offset: i * SIZE,
            len: SIZE as u32,
            crc: crc32fast::hash(&body),
        })
        .collect();
    let reader = Reader::new(dir.path());
    group.bench_with_input(BenchmarkId::new("read", BODIES), &BODIES, |b, _| {
        b.iter(|| {
            let read = reader.read(&refs).expect("read");
            assert!(read
                .iter()
                .all(|b| b.as_ref().map(Vec::len) == Some(SIZE as usize)));
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(10);
    targets = storage, sled_leaf, bodies
}
criterion_main!(benches);
