//! The broker core: validates publishes and subscription opens against the
//! configuration and the caller's identity, then hands them to the store and
//! the subscription dispatchers. Transport-free: the gRPC layer
//! ([`crate::service`]) only decodes, calls in here, and maps errors.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::info;

use crate::auth;
use crate::config::{Config, Marking, TopicConfig};
use crate::proto::{self as pb, subscribe_request, Envelope, PublishRequest, PublishResponse};
use crate::queue::{AttachError, Consumer, Subscription, SubscriptionInfo};
use crate::storage::{
    keys, now_ms, PublishOp, Published, StorageError, Store, StoreOptions, SubState, TopicState,
};

/// Why a broker operation was refused. Mapped to gRPC status codes, with a
/// stable reason, in one place: [`crate::service::status`].
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    Unauthenticated(#[from] auth::AuthError),
    #[error("topic {0:?} does not exist on this broker")]
    TopicNotFound(String),
    #[error("subscription {0:?} does not exist on this broker")]
    SubscriptionNotFound(String),
    #[error("agency {agency:?} may not publish to topic {topic:?}: it matches none of the topic's publishers [{rule}]")]
    NotPublisher {
        agency: String,
        topic: String,
        rule: String,
    },
    #[error("subscription {subscription:?} belongs to another agency; {agency:?} may only open its own subscriptions")]
    NotOwner {
        agency: String,
        subscription: String,
    },
    #[error(
        "the envelope is marked {marking} but topic {topic:?} accepts at most {max} (max_marking)"
    )]
    MarkingAboveTopic {
        topic: String,
        marking: Marking,
        max: Marking,
    },
    #[error("agency {agency:?} has clearance {clearance} but subscription {subscription:?} carries up to {needed}")]
    InsufficientClearance {
        agency: String,
        subscription: String,
        clearance: Marking,
        needed: Marking,
    },
    #[error("agency {0:?} is not an operator of this broker (broker.operators)")]
    NotOperator(String),
    #[error("the request has no envelope")]
    MissingEnvelope,
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
    #[error(
        "topic {topic:?} does not accept message type {message_type:?}; it accepts: {accepted}"
    )]
    TypeNotAccepted {
        topic: String,
        message_type: String,
        accepted: String,
    },
    #[error("the envelope is {size} bytes; this broker accepts at most {max} (broker.max_message_bytes)")]
    TooLarge { size: usize, max: usize },
    #[error("{0}")]
    UnknownType(crate::schema::SchemaError),
    #[error("{0}")]
    InvalidPayload(crate::schema::SchemaError),
    #[error("the request is larger than this broker accepts ({0})")]
    RequestTooLarge(String),
    #[error("recipient {0:?} is not an agency known to this broker")]
    UnknownRecipient(String),
    #[error("recipient {recipient:?} has no subscription on topic {topic:?}, so the message could never reach it")]
    RecipientNotSubscribed { recipient: String, topic: String },
    #[error("the envelope's sender is {claimed:?} but the caller's certificate is for {actual:?}; leave sender empty (the broker sets it)")]
    SenderMismatch { claimed: String, actual: String },
    #[error("the first request on a Subscribe stream must be `open`")]
    NotOpened,
    #[error("a Subscribe stream may be opened only once")]
    AlreadyOpen,
    #[error("{0}")]
    Attach(#[from] AttachError),
    #[error("subscription {subscription:?} holds its maximum of {max} pending messages (max_depth); its consumer must catch up before more can be published")]
    SubscriptionFull { subscription: String, max: u64 },
    #[error("agency {agency:?} is over its publish rate of {rate} messages per second; slow down and retry")]
    RateLimited { agency: String, rate: u32 },
    #[error("agency {agency:?} already has its maximum of {max} open streams")]
    TooManyStreams { agency: String, max: usize },
    #[error("the broker's disk is nearly full ({free} bytes free, {min} required); publishing is paused so queues can drain")]
    DiskLow { free: u64, min: u64 },
    #[error("the broker is shutting down; retry shortly")]
    ShuttingDown,
    #[error("purging {subscription:?} removes every pending message and cannot be undone; set confirm to the subscription's name ({subscription:?}) to go ahead")]
    PurgeNotConfirmed { subscription: String },
    #[error("{given} sequences were named; at most {max} can be redriven in one call")]
    TooManySequences { given: usize, max: usize },
    #[error("{0}")]
    Storage(#[from] StorageError),
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not open storage")]
    Storage(#[from] StorageError),
    #[error("could not load the schema registry")]
    Schema(#[from] crate::schema::SchemaError),
    #[error("topic message types not in the schema registry: {}", .0.join(", "))]
    UnknownTopicTypes(Vec<String>),
    #[error("storage start-up task failed: {0}")]
    Join(String),
}

struct TopicEntry {
    config: TopicConfig,
    state: Arc<TopicState>,
    subs: Vec<TopicSub>,
    /// `joinery_published_total` for this topic, by publishing agency: a
    /// handle looked up once per agency instead of on every publish.
    published: Mutex<Vec<(String, ::metrics::Counter)>>,
}

impl TopicEntry {
    fn published_counter(&self, agency: &str) -> ::metrics::Counter {
        let mut known = lock(&self.published);
        if let Some((_, counter)) = known.iter().find(|(a, _)| a == agency) {
            return counter.clone();
        }
        let counter = ::metrics::counter!(
            crate::metrics::PUBLISHED,
            "topic" => self.config.name.clone(),
            "agency" => agency.to_string()
        );
        known.push((agency.to_string(), counter.clone()));
        counter
    }
}

/// A subscription as its topic's publishers see it.
struct TopicSub {
    owner: String,
    state: Arc<SubState>,
    max_depth: u64,
}

/// Cheap-clone handle to the running broker.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    store: Store,
    schemas: Arc<crate::schema::Registry>,
    topics: crate::NameMap<TopicEntry>,
    subs: HashMap<String, Subscription>,
    agencies: HashSet<String>,
    shutdown: watch::Receiver<bool>,
    /// Publish rate buckets per agency (only with `max_publish_rate`).
    rates: Mutex<HashMap<String, TokenBucket>>,
    /// Open streams per agency.
    streams: Mutex<HashMap<String, usize>>,
    /// Free bytes on the data directory's file system at the last check.
    free_disk: AtomicU64,
    /// Refused requests since start, by stable reason.
    refusals: Mutex<HashMap<&'static str, u64>>,
    /// `joinery_publish_duration_seconds`: a handle looked up at the first
    /// publish (the recorder is installed by then) instead of on every one.
    publish_seconds: std::sync::OnceLock<::metrics::Histogram>,
}

/// Publish-rate limiter: refills `rate` tokens a second, holds at most `rate`.
struct TokenBucket {
    tokens: f64,
    last: Instant,
}

/// Held while a stream is open; counts towards `max_streams_per_agency`.
pub struct StreamPermit {
    inner: Arc<Inner>,
    agency: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        ::metrics::gauge!(crate::metrics::STREAMS).decrement(1.0);
        let mut streams = lock(&self.inner.streams);
        if let Some(n) = streams.get_mut(&self.agency) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.agency);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A publish handed to storage, not yet durable.
pub struct PendingPublish {
    rx: oneshot::Receiver<Result<Published, StorageError>>,
    message_id: String,
    published: ::metrics::Counter,
    duration: ::metrics::Histogram,
    started: Instant,
}

impl PendingPublish {
    /// Waits for the flush that makes the message durable.
    pub async fn wait(self) -> Result<PublishResponse, BrokerError> {
        let published = self.rx.await.map_err(|_| BrokerError::ShuttingDown)??;
        if !published.duplicate {
            self.published.increment(1);
        }
        self.duration.record(self.started.elapsed().as_secs_f64());
        Ok(PublishResponse {
            sequence: published.seq,
            duplicate: published.duplicate,
            message_id: self.message_id,
        })
    }
}

const MAX_MESSAGE_ID: usize = 128;
const MAX_HEADERS: usize = 64;

impl Broker {
    /// Opens storage and starts one dispatcher per subscription, plus the
    /// periodic sweep. Every task ends when `shutdown` turns true.
    pub async fn start(
        config: Arc<Config>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Broker, Vec<JoinHandle<()>>), StartError> {
        let b = &config.broker;
        let options = StoreOptions {
            cache_capacity: b.cache_capacity,
            dedup_window: b.dedup_window,
            max_batch: b.max_batch,
            audit_retention: config.audit.enabled.then_some(config.audit.retention),
            audit_segment_bytes: crate::audit::segments::SEGMENT_BYTES,
            body_segment_bytes: crate::storage::bodies::SEGMENT_BYTES,
            compact_after: crate::storage::bodies::COMPACT_AFTER,
            reports: config
                .agencies
                .iter()
                .map(|a| {
                    (
                        a.id.clone(),
                        Config::report_topic(&a.id),
                        Config::report_subscription(&a.id),
                    )
                })
                .collect(),
            deliver_before_sync: config
                .topics
                .iter()
                .filter(|t| t.deliver_before_sync)
                .map(|t| t.name.clone())
                .collect(),
        };
        let topics: Vec<String> = config.topics.iter().map(|t| t.name.clone()).collect();
        let subs: Vec<(String, String)> = config
            .subscriptions
            .iter()
            .map(|s| (s.name.clone(), s.topic.clone()))
            .collect();
        let dir = b.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir, options, &topics, &subs))
            .await
            .map_err(|e| StartError::Join(e.to_string()))??;

        let schemas = Arc::new(load_registry(&config, &store).await?);

        let mut tasks = Vec::new();
        let mut subscriptions = HashMap::new();
        let mut topic_entries = crate::NameMap::default();
        for t in &config.topics {
            let state = store.topic(&t.name).ok_or_else(|| StorageError::Corrupt {
                what: format!("topic {:?} was not registered", t.name),
            })?;
            topic_entries.insert(
                t.name.clone(),
                TopicEntry {
                    config: t.clone(),
                    state,
                    subs: Vec::new(),
                    published: Default::default(),
                },
            );
        }
        for s in &config.subscriptions {
            let state = store
                .subscription(&s.name)
                .ok_or_else(|| StorageError::Corrupt {
                    what: format!("subscription {:?} was not registered", s.name),
                })?;
            let Some(entry) = topic_entries.get_mut(&s.topic) else {
                continue; // config validation guarantees the topic exists
            };
            entry.subs.push(TopicSub {
                owner: s.owner.clone(),
                state: state.clone(),
                max_depth: s.max_depth,
            });
            let info = SubscriptionInfo {
                name: s.name.clone(),
                topic_name: s.topic.clone(),
                owner: s.owner.clone(),
                ack_deadline: s.ack_deadline,
                max_deliveries: s.max_deliveries,
                max_consumers: b.max_consumers_per_subscription,
            };
            let (sub, handle) = Subscription::start(
                info,
                state,
                entry.state.clone(),
                store.clone(),
                shutdown.clone(),
            );
            tasks.push(handle);
            info!(subscription = %s.name, depth = sub.state.depth(), "subscription ready");
            subscriptions.insert(s.name.clone(), sub);
        }
        let agencies = config.agencies.iter().map(|a| a.id.clone()).collect();
        let free_disk = free_bytes(&b.data_dir);
        let broker = Broker {
            inner: Arc::new(Inner {
                config,
                store,
                schemas,
                topics: topic_entries,
                subs: subscriptions,
                agencies,
                shutdown: shutdown.clone(),
                rates: Mutex::new(HashMap::new()),
                streams: Mutex::new(HashMap::new()),
                free_disk: AtomicU64::new(free_disk),
                refusals: Mutex::new(HashMap::new()),
                publish_seconds: std::sync::OnceLock::new(),
            }),
        };
        tasks.push(tokio::spawn(tick(broker.clone(), shutdown)));
        Ok((broker, tasks))
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn schemas(&self) -> &Arc<crate::schema::Registry> {
        &self.inner.schemas
    }

    pub fn is_agency(&self, id: &str) -> bool {
        self.inner.agencies.contains(id)
    }

    pub fn subscription(&self, name: &str) -> Option<&Subscription> {
        self.inner.subs.get(name)
    }

    /// A receiver that turns true when the broker starts shutting down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Validates a publish from `caller` and hands it to storage. Await the
    /// returned [`PendingPublish`] for the durable answer; submitting several
    /// before awaiting lets them share one flush.
    pub async fn submit(
        &self,
        caller: &str,
        request: PublishRequest,
    ) -> Result<PendingPublish, BrokerError> {
        let started = Instant::now();
        if self.is_shutting_down() {
            return Err(BrokerError::ShuttingDown);
        }
        let topic = self
            .inner
            .topics
            .get(&request.topic)
            .ok_or_else(|| BrokerError::TopicNotFound(request.topic.clone()))?;
        if !auth::allowed(&topic.config.publishers, caller) {
            return Err(BrokerError::NotPublisher {
                agency: caller.to_string(),
                topic: request.topic.clone(),
                rule: topic.config.publishers.join(", "),
            });
        }
        self.check_rate(caller)?;
        self.check_disk()?;
        let mut envelope = request.envelope.ok_or(BrokerError::MissingEnvelope)?;
        let now = now_ms();
        self.check_envelope(&topic.config, caller, &mut envelope, now)?;
        let max = self.inner.config.broker.max_message_bytes;
        let size = envelope.encoded_len();
        if size > max {
            return Err(BrokerError::TooLarge { size, max });
        }
        // Nothing invalid is stored: the payload must be a valid instance of
        // its declared type, every rule holding.
        match self
            .inner
            .schemas
            .snapshot()
            .validate(&envelope.message_type, &envelope.payload)
        {
            Ok(_) => {}
            Err(e @ crate::schema::SchemaError::UnknownType(_)) => {
                return Err(BrokerError::UnknownType(e))
            }
            Err(e) => return Err(BrokerError::InvalidPayload(e)),
        }

        let mut targets: Vec<Arc<SubState>> = Vec::with_capacity(topic.subs.len());
        for sub in &topic.subs {
            if !envelope.recipients.is_empty() && !envelope.recipients.contains(&sub.owner) {
                continue;
            }
            // Counters move after each group commit, so a burst may overshoot
            // by at most the publishes of one group.
            if sub.state.depth() >= sub.max_depth {
                return Err(BrokerError::SubscriptionFull {
                    subscription: sub.state.name.clone(),
                    max: sub.max_depth,
                });
            }
            targets.push(sub.state.clone());
        }
        let (expires_ms, expiry_by_order) =
            effective_expiry(&envelope, topic.config.retention, now);
        let dedup_key = if envelope.message_id.is_empty() {
            envelope.message_id = new_message_id(now);
            None // the broker's own id cannot be repeated by a client
        } else {
            Some(keys::dedup(topic.state.id, caller, &envelope.message_id))
        };
        let message_id = envelope.message_id.clone();
        let (reply, rx) = oneshot::channel();
        self.inner
            .store
            .publish(PublishOp {
                topic: topic.state.clone(),
                targets,
                dedup_key,
                publish_ms: now,
                expires_ms,
                expiry_by_order,
                envelope,
                reply,
            })
            .await?;
        Ok(PendingPublish {
            rx,
            message_id,
            published: topic.published_counter(caller),
            duration: self
                .inner
                .publish_seconds
                .get_or_init(|| ::metrics::histogram!(crate::metrics::PUBLISH_SECONDS))
                .clone(),
            started,
        })
    }

    /// Checks and completes an envelope: sender from the certificate,
    /// creation time, and every field the broker relies on.
    fn check_envelope(
        &self,
        topic: &TopicConfig,
        caller: &str,
        envelope: &mut Envelope,
        now: u64,
    ) -> Result<(), BrokerError> {
        let invalid = |msg: String| Err(BrokerError::InvalidEnvelope(msg));
        if !envelope.sender.is_empty() && envelope.sender != caller {
            return Err(BrokerError::SenderMismatch {
                claimed: envelope.sender.clone(),
                actual: caller.to_string(),
            });
        }
        envelope.sender = caller.to_string();
        let marking = match pb::Marking::try_from(envelope.marking) {
            Ok(pb::Marking::Unspecified | pb::Marking::Official) => Marking::Official,
            Ok(pb::Marking::OfficialSensitive) => Marking::OfficialSensitive,
            Err(_) => {
                return invalid(format!(
                    "marking {} is not a known marking",
                    envelope.marking
                ))
            }
        };
        if marking > topic.max_marking {
            return Err(BrokerError::MarkingAboveTopic {
                topic: topic.name.clone(),
                marking,
                max: topic.max_marking,
            });
        }
        // Unset means OFFICIAL: say so explicitly to every consumer.
        envelope.marking = match marking {
            Marking::Official => pb::Marking::Official as i32,
            Marking::OfficialSensitive => pb::Marking::OfficialSensitive as i32,
        };
        if envelope.message_type.is_empty() {
            return invalid("message_type is required (the payload's fully-qualified protobuf type, e.g. interop.referral.v1.SafeguardingReferral)".into());
        }
        if !topic.accepts_message_type(&envelope.message_type) {
            return Err(BrokerError::TypeNotAccepted {
                topic: topic.name.clone(),
                message_type: envelope.message_type.clone(),
                accepted: topic.message_types.join(", "),
            });
        }
        let id = &envelope.message_id;
        if id.len() > MAX_MESSAGE_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return invalid(format!(
                "message_id must be 1 to {MAX_MESSAGE_ID} printable ASCII characters without spaces (a UUID or ULID), or empty for the broker to choose one"
            ));
        }
        if envelope.headers.len() > MAX_HEADERS {
            return invalid(format!("at most {MAX_HEADERS} headers are allowed"));
        }
        if let Some(expires) = &envelope.expires_at {
            let Some(ms) = timestamp_ms(expires) else {
                return invalid("expires_at is not a valid timestamp".into());
            };
            if ms <= now {
                return invalid("expires_at is in the past".into());
            }
        }
        if let Some(created) = &envelope.created_at {
            if timestamp_ms(created).is_none() {
                return invalid("created_at is not a valid timestamp".into());
            }
        } else {
            envelope.created_at = Some(timestamp_from_ms(now));
        }
        let mut seen = HashSet::new();
        for recipient in &envelope.recipients {
            if !seen.insert(recipient.as_str()) {
                return invalid(format!("recipient {recipient:?} is listed twice"));
            }
            if !self.is_agency(recipient) {
                return Err(BrokerError::UnknownRecipient(recipient.clone()));
            }
            let subscribed = self
                .inner
                .topics
                .get(&topic.name)
                .is_some_and(|t| t.subs.iter().any(|sub| sub.owner == *recipient));
            if !subscribed {
                return Err(BrokerError::RecipientNotSubscribed {
                    recipient: recipient.clone(),
                    topic: topic.name.clone(),
                });
            }
        }
        Ok(())
    }

    fn check_rate(&self, caller: &str) -> Result<(), BrokerError> {
        let rate = self.inner.config.broker.max_publish_rate;
        if rate == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut rates = lock(&self.inner.rates);
        let bucket = rates.entry(caller.to_string()).or_insert(TokenBucket {
            tokens: f64::from(rate),
            last: now,
        });
        let refill = now.duration_since(bucket.last).as_secs_f64() * f64::from(rate);
        bucket.tokens = (bucket.tokens + refill).min(f64::from(rate));
        bucket.last = now;
        if bucket.tokens < 1.0 {
            return Err(BrokerError::RateLimited {
                agency: caller.to_string(),
                rate,
            });
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    fn check_disk(&self) -> Result<(), BrokerError> {
        let min = self.inner.config.broker.min_free_disk;
        let free = self.inner.free_disk.load(Ordering::Relaxed);
        if min > 0 && free < min {
            return Err(BrokerError::DiskLow { free, min });
        }
        Ok(())
    }

    /// Counts and audits a refused request. `agency` is the caller (or a
    /// description of an unidentified one); `reason` its stable reason.
    pub async fn record_refusal(
        &self,
        agency: &str,
        topic: &str,
        subscription: &str,
        reason: &'static str,
    ) {
        if matches!(reason, "shutting_down" | "storage_unavailable") {
            return; // the broker's state, not the caller's request
        }
        *lock(&self.inner.refusals).entry(reason).or_insert(0) += 1;
        ::metrics::counter!(crate::metrics::DENIED, "reason" => reason).increment(1);
        if !topic.is_empty() {
            ::metrics::counter!(crate::metrics::REJECTED, "reason" => reason).increment(1);
        }
        let mut event = crate::audit::AuditEvent::new(crate::audit::EventKind::Denied, agency);
        event.topic = topic.to_string();
        event.subscription = subscription.to_string();
        event.reason = reason.to_string();
        if let Err(e) = self.inner.store.audit(event).await {
            tracing::warn!(cause = %e, reason, "could not record a refused request");
        }
    }

    /// Refused requests since start, by reason.
    pub fn refusals(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<_> = lock(&self.inner.refusals)
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        out.sort();
        out
    }

    /// Refuses `agency` unless its clearance covers the highest marking the
    /// subscription's topic may carry.
    pub fn check_clearance(&self, agency: &str, sub: &Subscription) -> Result<(), BrokerError> {
        let config = &self.inner.config;
        let clearance = config
            .agency(agency)
            .map(|a| a.clearance)
            .unwrap_or_default();
        let needed = config
            .topic(&sub.info.topic_name)
            .map(|t| t.max_marking)
            .unwrap_or_default();
        if clearance < needed {
            return Err(BrokerError::InsufficientClearance {
                agency: agency.to_string(),
                subscription: sub.info.name.clone(),
                clearance,
                needed,
            });
        }
        Ok(())
    }

    /// Refuses `caller` unless it is one of `broker.operators`.
    pub fn check_operator(&self, caller: &str) -> Result<(), BrokerError> {
        if auth::allowed(&self.inner.config.broker.operators, caller) {
            Ok(())
        } else {
            Err(BrokerError::NotOperator(caller.to_string()))
        }
    }

    /// Counts a new stream of `agency` against `max_streams_per_agency`.
    pub fn stream_permit(&self, agency: &str) -> Result<StreamPermit, BrokerError> {
        let max = self.inner.config.broker.max_streams_per_agency;
        let mut streams = lock(&self.inner.streams);
        let open = streams.entry(agency.to_string()).or_insert(0);
        if *open >= max {
            return Err(BrokerError::TooManyStreams {
                agency: agency.to_string(),
                max,
            });
        }
        *open += 1;
        ::metrics::gauge!(crate::metrics::STREAMS).increment(1.0);
        Ok(StreamPermit {
            inner: self.inner.clone(),
            agency: agency.to_string(),
        })
    }

    /// Attaches `caller` as a consumer of the subscription it names.
    pub async fn open(
        &self,
        caller: &str,
        open: subscribe_request::Open,
    ) -> Result<(Subscription, Consumer), BrokerError> {
        if self.is_shutting_down() {
            return Err(BrokerError::ShuttingDown);
        }
        let sub = self
            .inner
            .subs
            .get(&open.subscription)
            .ok_or_else(|| BrokerError::SubscriptionNotFound(open.subscription.clone()))?;
        if sub.info.owner != caller {
            return Err(BrokerError::NotOwner {
                agency: caller.to_string(),
                subscription: open.subscription.clone(),
            });
        }
        // Config validation already refuses this; checked again so a future
        // change there cannot let an under-cleared agency read.
        self.check_clearance(caller, sub)?;
        let b = &self.inner.config.broker;
        let max_in_flight = match open.max_in_flight {
            0 => b.default_in_flight,
            n => n.min(b.max_in_flight),
        };
        let consumer = sub.attach(max_in_flight, open.initial_credit).await?;
        Ok((sub.clone(), consumer))
    }
}

/// Builds the registry (standard library, `[schemas] dirs`, registered
/// packages) and checks every topic's message types resolve.
async fn load_registry(
    config: &Config,
    store: &Store,
) -> Result<crate::schema::Registry, StartError> {
    let dirs = config.schemas.dirs.clone();
    let stored = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.schemas())
            .await
            .map_err(|e| StartError::Join(e.to_string()))??
    };
    let registry = tokio::task::spawn_blocking(move || {
        let mut registered = Vec::new();
        for value in stored {
            registered.push(
                <crate::schema::StoredPackage as prost::Message>::decode(&value[..])
                    .map_err(|_| crate::schema::SchemaError::Stored("(unreadable)".into()))?,
            );
        }
        crate::schema::Registry::load(&dirs, registered)
    })
    .await
    .map_err(|e| StartError::Join(e.to_string()))??;
    let snapshot = registry.snapshot();
    let missing: Vec<String> = config
        .topics
        .iter()
        .flat_map(|t| t.message_types.iter().map(move |m| (t, m)))
        .filter(|(_, m)| snapshot.message(m).is_none())
        .map(|(t, m)| format!("{m} (topic {})", t.name))
        .collect();
    if !missing.is_empty() {
        return Err(StartError::UnknownTopicTypes(missing));
    }
    Ok(registry)
}

/// A message id for a publish that brought none: a UUIDv7 (`now` in its
/// first 48 bits, 74 random bits) from the thread's reseeding ChaCha
/// generator, which needs no system call; `Uuid::now_v7` makes two
/// `getrandom` calls for every id.
fn new_message_id(now_ms: u64) -> String {
    let mut random = [0u8; 10];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
    uuid::Builder::from_unix_timestamp_millis(now_ms, &random)
        .into_uuid()
        .to_string()
}

/// The earliest of the envelope's `expires_at` and the topic's retention
/// (0: never), and whether it is the retention's (the store then needs no
/// expiry-index entry for it).
fn effective_expiry(envelope: &Envelope, retention: Option<Duration>, now: u64) -> (u64, bool) {
    let by_envelope = envelope.expires_at.as_ref().and_then(timestamp_ms);
    let by_retention = retention.map(|r| now.saturating_add(r.as_millis() as u64));
    match (by_envelope, by_retention) {
        (Some(a), Some(b)) => (a.min(b), b != 0 && b <= a),
        (None, Some(b)) => (b, b != 0),
        (Some(a), None) => (a, false),
        (None, None) => (0, false),
    }
}

fn timestamp_ms(ts: &prost_types::Timestamp) -> Option<u64> {
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    (ts.seconds as u64)
        .checked_mul(1000)?
        .checked_add(ts.nanos as u64 / 1_000_000)
}

pub(crate) fn timestamp_from_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Once a second: the store's sweeps (expiry, dedup window) and the
/// free-disk reading.
async fn tick(broker: Broker, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dir = broker.inner.config.broker.data_dir.clone();
    loop {
        tokio::select! {
            _ = every.tick() => {
                broker.inner.store.tick();
                let dir = dir.clone();
                if let Ok(free) = tokio::task::spawn_blocking(move || free_bytes(&dir)).await {
                    broker.inner.free_disk.store(free, Ordering::Relaxed);
                }
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() { break; }
            }
        }
    }
}

/// Free bytes available to unprivileged users on `dir`'s file system
/// (u64::MAX when it cannot be read, so a failed reading never blocks publishing).
fn free_bytes(dir: &std::path::Path) -> u64 {
    match rustix::fs::statvfs(dir) {
        Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
        Err(e) => {
            tracing::warn!(cause = %e, dir = %dir.display(), "could not read free disk space");
            u64::MAX
        }
    }
}
