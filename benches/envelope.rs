//! What the wire format costs per message: prost encoding and decoding of a
//! `joinery.v1.Envelope` carrying a 1 KiB payload with typical headers, on
//! its own (as the store keeps it and the dispatcher decodes it), inside a
//! `PublishRequest` (what a publisher sends) and inside a `Delivery` (what a
//! consumer receives); and the payload SHA-256 the broker records in the
//! audit log for every publish (`audit::payload_digest`).
//!
//! Messages are built once, outside the timed loops. Run with
//! `cargo bench --bench envelope` (add `-- --quick` for a fast estimate).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use joinery::proto::{Delivery, Envelope, Marking, PublishRequest};
use prost::Message;

const PAYLOAD_BYTES: usize = 1024;
const TOPIC: &str = "referral.safeguarding";

/// A 1 KiB payload (opaque bytes to the broker).
fn payload() -> Vec<u8> {
    (0..PAYLOAD_BYTES).map(|i| (i * 31 % 251) as u8).collect()
}

/// An envelope as a publisher typically fills it in, with the sender the
/// broker sets.
fn envelope() -> Envelope {
    Envelope {
        message_id: "0190f5c2-7d1e-7b3a-9c4f-2e8d6a1b5c3f".into(),
        message_type: "interop.referral.v1.SafeguardingReferral".into(),
        payload: payload().into(),
        correlation_id: "case-2024-000123".into(),
        causation_id: "0190f5c1-0a2b-7c3d-8e4f-5a6b7c8d9e0f".into(),
        created_at: Some(prost_types::Timestamp {
            seconds: 1_717_000_000,
            nanos: 123_000_000,
        }),
        expires_at: Some(prost_types::Timestamp {
            seconds: 1_719_592_000,
            nanos: 0,
        }),
        marking: Marking::OfficialSensitive as i32,
        headers: [
            ("priority", "high"),
            ("source-system", "police-rms"),
            ("schema-version", "1.2.0"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        recipients: vec!["council".into(), "nhs-trust".into()],
        sender: "police".into(),
    }
}

fn envelope_benches(c: &mut Criterion) {
    let envelope = envelope();
    let request = PublishRequest {
        topic: TOPIC.into(),
        envelope: Some(envelope.clone()),
    };
    let delivery = Delivery {
        delivery_id: 42,
        sequence: 1_234_567,
        attempt: 1,
        subscription: "council.safeguarding-inbox".into(),
        envelope: Some(envelope.clone()),
        topic: TOPIC.into(),
    };
    let envelope_bytes = envelope.encode_to_vec();
    let request_bytes = request.encode_to_vec();
    let delivery_bytes = delivery.encode_to_vec();
    assert_eq!(Envelope::decode(&envelope_bytes[..]).unwrap(), envelope);
    assert_eq!(PublishRequest::decode(&request_bytes[..]).unwrap(), request);
    assert_eq!(Delivery::decode(&delivery_bytes[..]).unwrap(), delivery);

    let mut group = c.benchmark_group("envelope/encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("envelope", |b| {
        b.iter(|| black_box(&envelope).encode_to_vec())
    });
    group.bench_function("publish_request", |b| {
        b.iter(|| black_box(&request).encode_to_vec())
    });
    group.bench_function("delivery", |b| {
        b.iter(|| black_box(&delivery).encode_to_vec())
    });
    group.finish();

    let mut group = c.benchmark_group("envelope/decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("envelope", |b| {
        b.iter(|| Envelope::decode(black_box(&envelope_bytes[..])).expect("valid"))
    });
    group.bench_function("publish_request", |b| {
        b.iter(|| PublishRequest::decode(black_box(&request_bytes[..])).expect("valid"))
    });
    group.bench_function("delivery", |b| {
        b.iter(|| Delivery::decode(black_box(&delivery_bytes[..])).expect("valid"))
    });
    group.finish();

    let mut group = c.benchmark_group("envelope/digest");
    group.throughput(Throughput::Elements(1));
    group.bench_function("payload_1KiB", |b| {
        b.iter(|| joinery::audit::payload_digest(black_box(&envelope.payload)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = envelope_benches
}
criterion_main!(benches);
