//! `joinery bench`: a load generator speaking the broker's own gRPC API, with
//! the workload and the one-line JSON result of `shared/peerbench` so that
//! joinery's figures sit beside NATS JetStream's and RabbitMQ's.
//!
//! - `pub N S window=W`: one publisher on one `PublishStream`, at most W
//!   publishes awaiting their durable ack.
//! - `consume N S prefetch=P`: an untimed prefill of N, then a timed consume
//!   with one ack per delivery and at most P unacked.
//! - `lat N S rate=R`: a publisher at R msg/s and a concurrent consumer;
//!   publish→deliver latency from the send time carried in the payload.
//!
//! Every run starts from an empty subscription (it is purged first, as the
//! peers delete and recreate their queue), and is bounded by its count and
//! by `max_secs`. Payloads are `joinery.v1.BenchPayload` whose `data` holds S
//! incompressible bytes: bytes 0..8 are the send time, 8..16 the sequence.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prost::Message;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::client::{connect_channel, ClientError, ClientOptions};
use crate::proto::admin_client::AdminClient;
use crate::proto::broker_client::BrokerClient;
use crate::proto::{
    subscribe_request, BenchPayload, Envelope, GetStatsRequest, PublishRequest,
    PurgeSubscriptionRequest, SubscribeRequest,
};

/// The payload type bench runs publish.
pub const MESSAGE_TYPE: &str = "joinery.v1.BenchPayload";
/// Publishes the untimed prefill of a consume run keeps in flight.
const PREFILL_WINDOW: usize = 512;
/// Longest wait for the next delivery before a run counts as timed out.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a bench run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Connect(#[from] ClientError),
    #[error("{what}: {status}")]
    Rpc {
        what: &'static str,
        status: tonic::Status,
    },
    #[error("the broker closed the {0} stream early")]
    Closed(&'static str),
    #[error("a delivery carried a payload that is not a bench payload")]
    Payload,
}

fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> BenchError {
    move |status| BenchError::Rpc { what, status }
}

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pub,
    Consume,
    Lat,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Pub => "pub",
            Mode::Consume => "consume",
            Mode::Lat => "lat",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Self, BenchError> {
        match s {
            "pub" => Ok(Mode::Pub),
            "consume" => Ok(Mode::Consume),
            "lat" => Ok(Mode::Lat),
            other => Err(BenchError::Usage(format!(
                "unknown mode {other:?}: expected pub, consume or lat"
            ))),
        }
    }
}

/// A run's parameters.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub mode: Mode,
    pub count: usize,
    /// Payload bytes per message (at least 16).
    pub size: usize,
    /// Publishes awaiting their ack (pub).
    pub window: usize,
    /// Unacked deliveries (consume, lat).
    pub prefetch: usize,
    /// Publishes per second (lat).
    pub rate: u64,
    pub max_secs: u64,
    pub topic: String,
    pub subscription: String,
}

impl BenchSpec {
    /// Parses `key=value` options (window, prefetch, rate, max_secs) over the
    /// peerbench defaults.
    pub fn new(
        mode: Mode,
        count: usize,
        size: usize,
        options: &[String],
        topic: String,
        subscription: String,
    ) -> Result<Self, BenchError> {
        if size < 16 {
            return Err(BenchError::Usage(
                "size must be at least 16 bytes (send time and sequence)".into(),
            ));
        }
        let mut spec = BenchSpec {
            mode,
            count,
            size,
            window: 1,
            prefetch: 256,
            rate: 1000,
            max_secs: 120,
            topic,
            subscription,
        };
        for option in options {
            let (key, value) = option
                .split_once('=')
                .ok_or_else(|| BenchError::Usage(format!("option {option:?} is not key=value")))?;
            let number =
                |what: &str| {
                    value.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        BenchError::Usage(format!("{what} must be a positive integer"))
                    })
                };
            match key {
                "window" => spec.window = number("window")? as usize,
                "prefetch" => spec.prefetch = number("prefetch")? as usize,
                "rate" => spec.rate = number("rate")?,
                "max_secs" => spec.max_secs = number("max_secs")?,
                other => {
                    return Err(BenchError::Usage(format!(
                        "unknown option {other:?}: expected window, prefetch, rate or max_secs"
                    )))
                }
            }
        }
        Ok(spec)
    }

    /// The line printed when a run fails: the peerbench shape with `error`.
    pub fn error_line(&self, error: &str) -> Value {
        let mut line = self.head();
        line.insert("error".into(), json!(error));
        Value::Object(line)
    }

    fn head(&self) -> Map<String, Value> {
        let mut head = Map::new();
        head.insert("target".into(), json!("joinery"));
        head.insert("mode".into(), json!(self.mode.name()));
        head.insert("count".into(), json!(self.count));
        head.insert("size".into(), json!(self.size));
        head
    }
}

static BASE: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process's first call: send times in payloads.
fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Incompressible bytes (the peerbench generator, so payloads match).
fn make_payload(size: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..size)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

/// Publish requests for one run, stamped as they are made.
struct Requests {
    topic: String,
    base: Vec<u8>,
}

impl Requests {
    fn new(topic: &str, size: usize) -> Self {
        Requests {
            topic: topic.to_string(),
            base: make_payload(size),
        }
    }

    fn make(&self, seq: u64) -> PublishRequest {
        let mut data = self.base.clone();
        data[0..8].copy_from_slice(&now_ns().to_le_bytes());
        data[8..16].copy_from_slice(&seq.to_le_bytes());
        PublishRequest {
            topic: self.topic.clone(),
            envelope: Some(Envelope {
                message_type: MESSAGE_TYPE.to_string(),
                payload: BenchPayload { data }.encode_to_vec().into(),
                ..Default::default()
            }),
        }
    }
}

/// The send time carried in a delivered payload.
fn stamp_of(payload: &[u8]) -> Result<u64, BenchError> {
    let data = BenchPayload::decode(payload)
        .map_err(|_| BenchError::Payload)?
        .data;
    let bytes: [u8; 8] = data
        .get(0..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(BenchError::Payload)?;
    Ok(u64::from_le_bytes(bytes))
}

/// Latency summary in microseconds, as peerbench computes it.
fn percentiles(v: &mut [u64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_unstable();
    let n = v.len();
    let at = |p: f64| {
        let i = ((n as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(n - 1);
        (v[i] as f64 / 1000.0 * 10.0).round() / 10.0
    };
    let mean = v.iter().sum::<u64>() as f64 / n as f64;
    json!({"n": n, "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p999": at(0.999),
           "max": at(1.0), "mean": (mean / 100.0).round() / 10.0})
}

fn rate_fields(done: usize, size: usize, secs: f64) -> Value {
    json!({"done": done, "secs": (secs * 1000.0).round() / 1000.0,
           "msgs_per_s": (done as f64 / secs).round(),
           "mb_per_s": ((done * size) as f64 / secs / 1e6 * 100.0).round() / 100.0})
}

/// Prints `done` every two seconds to stderr while a phase runs.
struct Progress {
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(what: &'static str, total: usize, done: Arc<AtomicUsize>) -> Self {
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                eprintln!(
                    "bench: {what} {n}/{total} after {:.0}s ({:.0} msg/s)",
                    started.elapsed().as_secs_f64(),
                    n as f64 / started.elapsed().as_secs_f64()
                );
            }
        });
        Progress { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one pipelined publish phase did.
struct Published {
    done: usize,
    secs: f64,
    /// Publish→ack, nanoseconds.
    latencies: Vec<u64>,
    timed_out: bool,
}

/// Publishes `count` messages on one PublishStream with at most `window`
/// awaiting their ack; `interval` paces sends (lat mode).
async fn publish_n(
    channel: &Channel,
    requests: Arc<Requests>,
    count: usize,
    window: usize,
    interval: Option<Duration>,
    deadline: Instant,
    progress: Option<&'static str>,
) -> Result<Published, BenchError> {
    let (tx, rx) = mpsc::channel::<PublishRequest>(window.clamp(1, 1024));
    let (starts_tx, mut starts_rx) = mpsc::unbounded_channel::<u64>();
    let mut responses = BrokerClient::new(channel.clone())
        .publish_stream(ReceiverStream::new(rx))
        .await
        .map_err(rpc("PublishStream"))?
        .into_inner();
    let window = Arc::new(Semaphore::new(window.max(1)));
    let started = Instant::now();
    let sender = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut ticks = interval.map(|period| {
                let mut ticks = tokio::time::interval(period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                ticks
            });
            for seq in 0..count {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                if Instant::now() > deadline {
                    return (seq, true);
                }
                let Ok(permit) = window.acquire().await else {
                    return (seq, false);
                };
                permit.forget();
                let request = requests.make(seq as u64);
                if starts_tx.send(now_ns()).is_err() || tx.send(request).await.is_err() {
                    return (seq, false);
                }
            }
            (count, false)
        })
    };
    let done = Arc::new(AtomicUsize::new(0));
    let _progress = progress.map(|what| Progress::start(what, count, done.clone()));
    let mut latencies = Vec::with_capacity(count);
    while let Some(sent_at) = starts_rx.recv().await {
        match responses.next().await {
            Some(Ok(_)) => {}
            Some(Err(status)) => {
                sender.abort();
                return Err(BenchError::Rpc {
                    what: "publish",
                    status,
                });
            }
            None => {
                sender.abort();
                return Err(BenchError::Closed("PublishStream"));
            }
        }
        latencies.push(now_ns().saturating_sub(sent_at));
        done.fetch_add(1, Ordering::Relaxed);
        window.add_permits(1);
    }
    let secs = started.elapsed().as_secs_f64();
    let (_, timed_out) = sender.await.unwrap_or((0, true));
    Ok(Published {
        done: latencies.len(),
        secs,
        latencies,
        timed_out,
    })
}

/// A consumer on one Subscribe stream acking each delivery on its own.
struct Consumer {
    acks: mpsc::UnboundedSender<SubscribeRequest>,
    deliveries: tonic::Streaming<crate::proto::Delivery>,
}

impl Consumer {
    async fn open(
        channel: &Channel,
        subscription: &str,
        prefetch: usize,
    ) -> Result<Self, BenchError> {
        let (acks, rx) = mpsc::unbounded_channel();
        let open = SubscribeRequest {
            request: Some(subscribe_request::Request::Open(subscribe_request::Open {
                subscription: subscription.to_string(),
                max_in_flight: u32::try_from(prefetch).unwrap_or(u32::MAX),
                initial_credit: None,
            })),
        };
        // The receiver is alive: it was just made.
        let _ = acks.send(open);
        let deliveries = BrokerClient::new(channel.clone())
            .subscribe(UnboundedReceiverStream::new(rx))
            .await
            .map_err(rpc("Subscribe"))?
            .into_inner();
        Ok(Consumer { acks, deliveries })
    }

    /// Ends the request stream after the acks already queued, and waits
    /// (briefly) for the broker to close its side, so no ack is cut off.
    async fn close(self) {
        let Consumer {
            acks,
            mut deliveries,
        } = self;
        drop(acks);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = deliveries.next().await {}
        })
        .await;
    }

    /// The next delivery, acked; None when none came within the timeout.
    async fn next_acked(&mut self) -> Result<Option<bytes::Bytes>, BenchError> {
        match tokio::time::timeout(DELIVERY_TIMEOUT, self.deliveries.next()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(BenchError::Closed("Subscribe")),
            Ok(Some(Err(status))) => Err(BenchError::Rpc {
                what: "delivery",
                status,
            }),
            Ok(Some(Ok(delivery))) => {
                let ack = SubscribeRequest {
                    request: Some(subscribe_request::Request::Ack(subscribe_request::Ack {
                        delivery_ids: vec![delivery.delivery_id],
                    })),
                };
                self.acks
                    .send(ack)
                    .map_err(|_| BenchError::Closed("Subscribe"))?;
                Ok(Some(
                    delivery.envelope.map(|e| e.payload).unwrap_or_default(),
                ))
            }
        }
    }
}

/// Empties the bench subscription (operators only) so every run starts alike.
async fn reset(channel: &Channel, subscription: &str) -> Result<(), BenchError> {
    AdminClient::new(channel.clone())
        .purge_subscription(PurgeSubscriptionRequest {
            subscription: subscription.to_string(),
            confirm: subscription.to_string(),
        })
        .await
        .map_err(rpc(
            "PurgeSubscription (the bench agency must be an operator)",
        ))?;
    Ok(())
}

/// Pending messages of the bench subscription.
async fn depth(channel: &Channel, subscription: &str) -> Option<u64> {
    let stats = AdminClient::new(channel.clone())
        .get_stats(GetStatsRequest {})
        .await
        .ok()?
        .into_inner();
    stats
        .subscriptions
        .iter()
        .find(|s| s.name == subscription)
        .map(|s| s.depth)
}

/// Runs one bench and returns its JSON line (a human summary goes to stderr).
pub async fn run(spec: &BenchSpec, options: &ClientOptions) -> Result<Value, BenchError> {
    now_ns();
    let pub_channel = connect_channel(options).await?;
    let sub_channel = connect_channel(options).await?;
    reset(&pub_channel, &spec.subscription).await?;
    let deadline = Instant::now() + Duration::from_secs(spec.max_secs);
    let requests = Arc::new(Requests::new(&spec.topic, spec.size));
    let mut fields: BTreeMap<&str, Value> = BTreeMap::new();
    match spec.mode {
        Mode::Pub => {
            let mut run = publish_n(
                &pub_channel,
                requests,
                spec.count,
                spec.window,
                None,
                deadline,
                Some("published"),
            )
            .await?;
            eprintln!(
                "bench pub: {} msgs of {} B, window {}: {:.0} msg/s",
                run.done,
                spec.size,
                spec.window,
                run.done as f64 / run.secs
            );
            fields.insert("window", json!(spec.window));
            fields.insert("rate", rate_fields(run.done, spec.size, run.secs));
            fields.insert("ack_lat_us", percentiles(&mut run.latencies));
            fields.insert(
                "depth_after",
                json!(depth(&pub_channel, &spec.subscription).await),
            );
            fields.insert("timed_out", json!(run.timed_out));
        }
        Mode::Consume => {
            let fill_deadline = Instant::now() + Duration::from_secs(spec.max_secs);
            let fill = publish_n(
                &pub_channel,
                requests,
                spec.count,
                PREFILL_WINDOW,
                None,
                fill_deadline,
                Some("prefilled"),
            )
            .await?;
            let depth_before = depth(&pub_channel, &spec.subscription).await;
            let started = Instant::now();
            let mut consumer =
                Consumer::open(&sub_channel, &spec.subscription, spec.prefetch).await?;
            let done = Arc::new(AtomicUsize::new(0));
            let progress = Progress::start("consumed", fill.done, done.clone());
            let mut timed_out = false;
            while done.load(Ordering::Relaxed) < fill.done {
                if Instant::now() > deadline + Duration::from_secs(spec.max_secs) {
                    timed_out = true;
                    break;
                }
                match consumer.next_acked().await? {
                    Some(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        timed_out = true;
                        break;
                    }
                }
            }
            drop(progress);
            let secs = started.elapsed().as_secs_f64();
            consumer.close().await;
            // Let the last acks reach the broker before reading the depth.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let consumed = done.load(Ordering::Relaxed);
            eprintln!(
                "bench consume: {consumed} msgs of {} B, prefetch {}: {:.0} msg/s",
                spec.size,
                spec.prefetch,
                consumed as f64 / secs
            );
            fields.insert("prefetch", json!(spec.prefetch));
            fields.insert("prefill", json!({"n": fill.done, "secs": fill.secs}));
            fields.insert("depth_before", json!(depth_before));
            fields.insert("rate", rate_fields(consumed, spec.size, secs));
            fields.insert(
                "depth_after",
                json!(depth(&pub_channel, &spec.subscription).await),
            );
            fields.insert("timed_out", json!(timed_out || fill.timed_out));
        }
        Mode::Lat => {
            let mut consumer =
                Consumer::open(&sub_channel, &spec.subscription, spec.prefetch).await?;
            let count = spec.count;
            let receiving = tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(count);
                while latencies.len() < count {
                    match consumer.next_acked().await? {
                        Some(payload) => {
                            latencies.push(now_ns().saturating_sub(stamp_of(&payload)?))
                        }
                        None => break,
                    }
                }
                consumer.close().await;
                Ok::<_, BenchError>(latencies)
            });
            let period = Duration::from_nanos(1_000_000_000 / spec.rate.max(1));
            let mut sent = publish_n(
                &pub_channel,
                requests,
                spec.count,
                // Never limits a fixed-rate run: every send goes out on time.
                spec.count.max(1),
                Some(period),
                deadline,
                Some("published"),
            )
            .await?;
            let mut latencies = match receiving.await {
                Ok(result) => result?,
                Err(_) => return Err(BenchError::Closed("Subscribe")),
            };
            let e2e = percentiles(&mut latencies);
            eprintln!(
                "bench lat: {} sent at {}/s, {} received; publish→deliver p50 {} µs, p99 {} µs",
                sent.done,
                spec.rate,
                latencies.len(),
                e2e["p50"],
                e2e["p99"]
            );
            fields.insert("rate_target", json!(spec.rate));
            fields.insert("prefetch", json!(spec.prefetch));
            fields.insert("rate", rate_fields(sent.done, spec.size, sent.secs));
            fields.insert("received", json!(latencies.len()));
            fields.insert("e2e_lat_us", e2e);
            fields.insert("ack_lat_us", percentiles(&mut sent.latencies));
            fields.insert("timed_out", json!(sent.timed_out));
        }
    }
    let mut line = spec.head();
    for (key, value) in fields {
        line.insert(key.to_string(), value);
    }
    Ok(Value::Object(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(options: &[&str]) -> Result<BenchSpec, BenchError> {
        let options: Vec<String> = options.iter().map(|s| s.to_string()).collect();
        BenchSpec::new(Mode::Pub, 10, 1024, &options, "t".into(), "s".into())
    }

    #[test]
    fn options_override_the_peerbench_defaults() {
        let s = spec(&["window=256", "max_secs=5"]).unwrap();
        assert_eq!(
            (s.window, s.prefetch, s.rate, s.max_secs),
            (256, 256, 1000, 5)
        );
        assert!(spec(&["window=0"]).is_err());
        assert!(spec(&["windw=4"]).is_err());
        assert!(spec(&["window"]).is_err());
        let small = BenchSpec::new(Mode::Pub, 1, 8, &[], "t".into(), "s".into());
        assert!(matches!(small, Err(BenchError::Usage(_))));
    }

    #[test]
    fn percentiles_match_peerbench() {
        let mut v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let p = percentiles(&mut v);
        assert_eq!(p["n"], 1000);
        assert_eq!(p["p50"], 500.0);
        assert_eq!(p["p99"], 990.0);
        assert_eq!(p["max"], 1000.0);
        assert_eq!(p["mean"], 500.5);
        assert_eq!(percentiles(&mut []), Value::Null);
    }

    #[test]
    fn the_send_time_survives_the_payload_encoding() {
        let requests = Requests::new("t", 64);
        let request = requests.make(7);
        let payload = request.envelope.unwrap().payload;
        let stamp = stamp_of(&payload).unwrap();
        assert!(stamp <= now_ns());
        let data = BenchPayload::decode(&payload[..]).unwrap().data;
        assert_eq!(data.len(), 64);
        assert_eq!(&data[8..16], &7u64.to_le_bytes());
        assert!(stamp_of(b"\xff\xff").is_err());
    }
}
