//! What schema validation costs per message: the broker decodes every
//! published payload as its declared type and checks every buf.validate rule
//! and the NHS-number rule (`Snapshot::validate`), and tools convert protobuf
//! JSON to protobuf (`Snapshot::from_json`, which validates too).
//!
//! The registry is built once, outside the timed loops. Run with
//! `cargo bench --bench schema` (add `-- --quick` for a fast estimate).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use joinery::schema::{Registry, SchemaError};
use prost::Message;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/broker-config/examples");

/// The two largest standard messages, with the most rules.
const MESSAGES: [(&str, &str); 2] = [
    (
        "safeguarding_referral",
        "interop.referral.v1.SafeguardingReferral",
    ),
    ("marac_referral", "interop.referral.v1.MaracReferral"),
];

fn example(file: &str) -> String {
    std::fs::read_to_string(format!("{EXAMPLES}/{file}.json"))
        .unwrap_or_else(|e| panic!("{file}.json: {e}"))
}

fn schema(c: &mut Criterion) {
    let registry = Registry::load(&[], Vec::new()).expect("the standard library loads");
    let snapshot = registry.snapshot();

    let mut group = c.benchmark_group("schema/validate");
    group.throughput(Throughput::Elements(1));
    for (file, message_type) in MESSAGES {
        let bytes = snapshot
            .from_json(message_type, &example(file))
            .expect("the example is valid")
            .encode_to_vec();
        snapshot
            .validate(message_type, &bytes)
            .expect("the encoded example is valid");
        group.bench_function(file, |b| {
            b.iter(|| {
                snapshot
                    .validate(black_box(message_type), black_box(&bytes))
                    .expect("valid")
            })
        });
    }
    // A refusal costs the same walk plus building the violation.
    let (file, message_type) = MESSAGES[0];
    let mut doc: serde_json::Value = serde_json::from_str(&example(file)).unwrap();
    doc["subject"]["nhsNumber"] = "9434765918".into();
    let descriptor = snapshot.message(message_type).unwrap();
    let bad = prost_reflect::DynamicMessage::deserialize(descriptor, doc)
        .unwrap()
        .encode_to_vec();
    assert!(matches!(
        snapshot.validate(message_type, &bad),
        Err(SchemaError::Invalid { .. })
    ));
    group.bench_function("safeguarding_referral_refused_nhs_number", |b| {
        b.iter(|| {
            snapshot
                .validate(black_box(message_type), black_box(&bad))
                .expect_err("invalid")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("schema/json_to_protobuf");
    group.throughput(Throughput::Elements(1));
    for (file, message_type) in MESSAGES {
        let json = example(file);
        group.bench_function(file, |b| {
            b.iter(|| {
                snapshot
                    .from_json(black_box(message_type), black_box(&json))
                    .expect("valid")
                    .encode_to_vec()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = schema
}
criterion_main!(benches);
