//! Prometheus metrics: every name, with its help text, in one place.
//!
//! The broker records through the `metrics` facade; only the binary (or a
//! test) installs the Prometheus recorder and hands its handle to [`http`],
//! which serves `/metrics`. Names follow Prometheus conventions: `joinery_`
//! prefix, `_total` counters, base units (`_seconds`, `_bytes`). Label values
//! come from bounded sets — topic, subscription and agency names from the
//! config, and fixed reason strings — never message ids.
//!
//! Gauges that describe state (depth, in flight, oldest unacked age, dead
//! letters, storage bytes, certificate expiry) are sampled once a second by
//! [`sample`], so they are exact at rest.

pub mod http;

use std::sync::Arc;
use std::time::Duration;

use ::metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};

pub const PUBLISHED: &str = "joinery_messages_published_total";
pub const DELIVERED: &str = "joinery_messages_delivered_total";
pub const REDELIVERED: &str = "joinery_messages_redelivered_total";
pub const ACKED: &str = "joinery_messages_acked_total";
pub const NACKED: &str = "joinery_messages_nacked_total";
pub const DEAD_LETTERED: &str = "joinery_messages_dead_lettered_total";
pub const EXPIRED: &str = "joinery_messages_expired_total";
pub const REJECTED: &str = "joinery_messages_rejected_total";
pub const DENIED: &str = "joinery_requests_denied_total";
pub const DEPTH: &str = "joinery_subscription_depth";
pub const IN_FLIGHT: &str = "joinery_subscription_in_flight";
pub const OLDEST_UNACKED: &str = "joinery_subscription_oldest_unacked_age_seconds";
pub const DEAD_LETTERS: &str = "joinery_subscription_dead_letters";
pub const PUBLISH_SECONDS: &str = "joinery_publish_duration_seconds";
pub const PUBLISH_TO_ACK_SECONDS: &str = "joinery_publish_to_ack_seconds";
pub const FLUSH_SECONDS: &str = "joinery_flush_duration_seconds";
pub const FLUSH_MESSAGES: &str = "joinery_flush_messages";
pub const CHECKPOINT_SECONDS: &str = "joinery_checkpoint_duration_seconds";
pub const APPLY_SECONDS: &str = "joinery_apply_duration_seconds";
pub const STORAGE_BYTES: &str = "joinery_storage_bytes";
pub const CONNECTIONS: &str = "joinery_connections_open";
pub const STREAMS: &str = "joinery_streams_open";
pub const HANDSHAKE_FAILURES: &str = "joinery_tls_handshake_failures_total";
pub const CERT_EXPIRY: &str = "joinery_certificate_expiry_timestamp_seconds";

/// Registers the help text of every metric (call once, after installing a recorder).
pub fn describe() {
    describe_counter!(
        PUBLISHED,
        Unit::Count,
        "Messages accepted and stored, by topic and publishing agency (duplicates excluded)."
    );
    describe_counter!(
        DELIVERED,
        Unit::Count,
        "Deliveries to consumers, first attempts and redeliveries, by subscription."
    );
    describe_counter!(
        REDELIVERED,
        Unit::Count,
        "Deliveries with attempt > 1, by subscription."
    );
    describe_counter!(
        ACKED,
        Unit::Count,
        "Messages acknowledged by consumers, by subscription."
    );
    describe_counter!(
        NACKED,
        Unit::Count,
        "Deliveries given back by consumers (nack), by subscription."
    );
    describe_counter!(DEAD_LETTERED, Unit::Count, "Messages moved to dead letters, by subscription and reason (max_deliveries, expired, unreadable).");
    describe_counter!(
        EXPIRED,
        Unit::Count,
        "Messages dead-lettered because they expired, by subscription."
    );
    describe_counter!(
        REJECTED,
        Unit::Count,
        "Publishes refused, by reason (the stable reason of the error)."
    );
    describe_counter!(
        DENIED,
        Unit::Count,
        "Requests refused for identity, access, marking or limits, by reason."
    );
    describe_gauge!(
        DEPTH,
        Unit::Count,
        "Messages pending in a subscription (published to it, neither acked nor dead-lettered)."
    );
    describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Deliveries of a subscription awaiting ack."
    );
    describe_gauge!(
        OLDEST_UNACKED,
        Unit::Seconds,
        "Age of the oldest pending message of a subscription (0 when empty)."
    );
    describe_gauge!(
        DEAD_LETTERS,
        Unit::Count,
        "Messages in a subscription's dead letters."
    );
    describe_histogram!(
        PUBLISH_SECONDS,
        Unit::Seconds,
        "Time from receiving a publish to answering it (validation, group commit, fsync)."
    );
    describe_histogram!(
        PUBLISH_TO_ACK_SECONDS,
        Unit::Seconds,
        "Time from publish to the consumer's ack, by subscription."
    );
    describe_histogram!(
        FLUSH_SECONDS,
        Unit::Seconds,
        "Duration of one group commit: the journal write and fdatasync, the message bodies written, the apply to sled (and a checkpoint, when one falls due)."
    );
    describe_histogram!(
        APPLY_SECONDS,
        Unit::Seconds,
        "Duration of applying durable group commits to sled and the audit segments, before their publishes are answered."
    );
    describe_histogram!(
        CHECKPOINT_SECONDS,
        Unit::Seconds,
        "Duration of one checkpoint: sled flush and fsync, after which the journal starts over."
    );
    describe_histogram!(
        FLUSH_MESSAGES,
        Unit::Count,
        "Publishes covered by one group commit."
    );
    describe_gauge!(
        STORAGE_BYTES,
        Unit::Bytes,
        "Bytes sled reports for the data directory."
    );
    describe_gauge!(
        CONNECTIONS,
        Unit::Count,
        "Open client connections (after the TLS handshake)."
    );
    describe_gauge!(
        STREAMS,
        Unit::Count,
        "Open PublishStream and Subscribe streams."
    );
    describe_counter!(
        HANDSHAKE_FAILURES,
        Unit::Count,
        "TLS handshakes that failed, by reason (unknown_ca, expired, revoked, ...)."
    );
    describe_gauge!(
        CERT_EXPIRY,
        Unit::Seconds,
        "Expiry time (Unix seconds) of the certificates the broker uses, by certificate."
    );
}

/// Installs the Prometheus recorder for this process and describes every
/// metric; None if a recorder is already installed.
pub fn install() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ])
        .ok()?
        .build_recorder();
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder).ok()?;
    describe();
    Some(handle)
}

/// Once a second, sets the state gauges from the broker's counters and runs
/// the Prometheus recorder's upkeep (`prometheus`, when this process
/// records metrics).
///
/// The upkeep matters: the recorder keeps every histogram sample (several
/// per message) until they are drained into the histograms' buckets, which
/// only a scrape of `/metrics` or an upkeep does. Without it, a broker that
/// nobody scrapes grew by about 4 MB per 100,000 messages.
pub async fn sample(
    broker: crate::broker::Broker,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let tls = &broker.config().tls;
    let mut certificates: Vec<(String, i64)> = cert_expiries(&tls.cert)
        .into_iter()
        .take(1)
        .map(|(_, at)| ("server".to_string(), at))
        .collect();
    certificates.extend(
        cert_expiries(&tls.ca)
            .into_iter()
            .map(|(name, at)| (format!("ca:{name}"), at)),
    );
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => if *shutdown.borrow() { break },
        }
        if let Some(handle) = &prometheus {
            handle.run_upkeep();
        }
        let store = broker.store();
        for sub in &broker.config().subscriptions {
            let Some(state) = store.subscription(&sub.name) else {
                continue;
            };
            let label = [("subscription", sub.name.clone())];
            gauge!(DEPTH, &label).set(state.depth() as f64);
            gauge!(DEAD_LETTERS, &label).set(state.dead_letters() as f64);
            gauge!(IN_FLIGHT, &label).set(state.in_flight() as f64);
            gauge!(OLDEST_UNACKED, &label).set(state.oldest_pending_age().as_secs_f64());
        }
        let store = store.clone();
        if let Ok(bytes) = tokio::task::spawn_blocking(move || store.size_on_disk()).await {
            gauge!(STORAGE_BYTES).set(bytes as f64);
        }
        for (name, expiry) in &certificates {
            gauge!(CERT_EXPIRY, "certificate" => name.clone()).set(*expiry as f64);
        }
    }
}

/// (subject common name, not-after in Unix seconds) of every certificate in
/// a PEM file. Read at start-up: a reload that replaces the files shows at
/// the next restart of the sampler (the broker's).
fn cert_expiries(path: &std::path::Path) -> Vec<(String, i64)> {
    let Ok(pem) = std::fs::read(path) else {
        return Vec::new();
    };
    rustls_pemfile::certs(&mut pem.as_slice())
        .filter_map(Result::ok)
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            let name = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .unwrap_or("unnamed")
                .to_string();
            Some((name, cert.validity().not_after.timestamp()))
        })
        .collect()
}

/// Shared flags the HTTP endpoints report.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Storage open and the listener bound.
    pub started: std::sync::atomic::AtomicBool,
    /// Shutdown has begun.
    pub stopping: std::sync::atomic::AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.started.load(Relaxed) && !self.stopping.load(Relaxed)
    }
}

pub type SharedReadiness = Arc<Readiness>;
