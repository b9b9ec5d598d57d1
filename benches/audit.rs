//! What the tamper-evident audit log costs:
//! - `audit/record_hash`: turning an [`AuditEvent`] into the next record of
//!   the chain (`Chain::append`: prost encoding with the previous record's
//!   hash, then the SHA-256 of the encoding), as the storage writer does for
//!   every publish, delivery and ack;
//! - `audit/append`: N records queued through the store
//!   (`Store::audit`, what a dispatcher does for each delivery) and timed
//!   until a sync confirms they are flushed and fsynced, on a real sled
//!   directory.
//!
//! The chain, the store, its temporary directory (under cargo's target tmp
//! dir, on disk) and the runtime are set up outside the timed loops. Run
//! with `cargo bench --bench audit` (add `-- --quick` for a fast estimate).

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::AUDIT_RETENTION as RETENTION;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use joinery::audit::{AuditEvent, Chain, EventKind};
use joinery::storage::now_ms;

/// Records per timed iteration of `audit/append`.
const BATCHES: [u64; 3] = [1, 64, 512];

/// A publish as the writer records it: every message field filled in.
fn publish_event(sequence: u64) -> AuditEvent {
    let mut event = AuditEvent::new(EventKind::Publish, "police");
    event.topic = "referral.safeguarding".into();
    event.message_id = "0190f5c2-7d1e-7b3a-9c4f-2e8d6a1b5c3f".into();
    event.message_type = "interop.referral.v1.SafeguardingReferral".into();
    event.digest = Some(joinery::audit::payload_digest(b"payload"));
    event.sequence = sequence;
    event
}

/// A delivery as a dispatcher records it.
fn delivery_event(sequence: u64) -> AuditEvent {
    let mut event = publish_event(sequence);
    event.kind = EventKind::Delivery;
    event.agency = "council".into();
    event.subscription = "council.safeguarding-inbox".into();
    event.attempt = 1;
    event
}

fn record_hash(c: &mut Criterion) {
    let db = sled::Config::new()
        .temporary(true)
        .open()
        .expect("a temporary sled database");
    let mut chain = Chain::load(&db, None, RETENTION).expect("an empty log loads");
    let time_ms = now_ms();

    let mut group = c.benchmark_group("audit/record_hash");
    // Sub-microsecond and in memory: more, shorter samples than the fsyncs.
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    for (name, event) in [
        ("publish", publish_event(1_234_567)),
        ("delivery", delivery_event(1_234_567)),
        (
            "config_reload",
            AuditEvent::new(EventKind::ConfigReload, "broker"),
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| chain.append(black_box(&event), black_box(time_ms)))
        });
    }
    group.finish();
}

fn append(c: &mut Criterion) {
    let (dir, store) = common::open_store("joinery-bench-audit-", &[], &[]);
    assert!(store.audit_enabled());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");

    let mut group = c.benchmark_group("audit/append");
    let mut sequence = 0;
    for n in BATCHES {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let events: Vec<AuditEvent> = (0..n)
                        .map(|_| {
                            sequence += 1;
                            delivery_event(sequence)
                        })
                        .collect();
                    let start = Instant::now();
                    rt.block_on(async {
                        for event in events {
                            store.audit(event).await.expect("the writer is running");
                        }
                        store.sync().await.expect("flushed");
                    });
                    timed += start.elapsed();
                }
                timed
            })
        });
    }
    group.finish();

    rt.block_on(store.close()).expect("the store closes");
    drop(store);
    let db = joinery::storage::open_existing(dir.path()).expect("the stopped store opens");
    let verified = joinery::audit::verify(&db, dir.path()).expect("the chain verifies");
    assert_eq!(verified.records, sequence);
    drop(db);
    drop(dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(10);
    targets = record_hash, append
}
criterion_main!(benches);
