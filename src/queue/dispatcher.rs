//! The dispatcher of one subscription: an actor task that loads pending
//! messages from the store in order, delivers them to attached consumers
//! within their flow-control limits, and handles acks, nacks, ack deadlines,
//! redelivery, dead-lettering and expiry, and operator actions (redrive,
//! purge: see [`operator`]).

mod operator;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::Status;
use tracing::{debug, error, info, warn};

use super::{AttachError, Event, SubscriptionInfo};
use crate::audit::{AuditEvent, EventKind};
use crate::proto::{Delivery, Envelope};
use crate::storage::{
    now_ms, DeadReason, Outcome, Pending, Settlement, Store, StoredMessage, SubState, TopicState,
};

/// Refill the ready queue from the store when it holds fewer than this.
const REFILL_BELOW: usize = 256;
/// Pending entries read per refill.
const REFILL_BATCH: usize = 512;

struct Item {
    seq: u64,
    /// Deliveries made so far.
    attempts: u32,
    message: Arc<StoredMessage>,
}

struct InFlight {
    item: Item,
    consumer: u64,
    deadline: Instant,
}

struct Slot {
    id: u64,
    tx: mpsc::Sender<Result<Delivery, Status>>,
    max_in_flight: u32,
    in_flight: u32,
    /// None: no credit-based flow control for this consumer.
    credit: Option<u64>,
}

impl Slot {
    fn can_take(&self) -> bool {
        self.in_flight < self.max_in_flight && self.credit != Some(0)
    }
}

pub(super) struct Dispatcher {
    info: Arc<SubscriptionInfo>,
    state: Arc<SubState>,
    topic: Arc<TopicState>,
    store: Store,
    rx: mpsc::Receiver<Event>,
    shutdown: watch::Receiver<bool>,
    consumers: Vec<Slot>,
    next_slot: usize,
    in_flight: HashMap<u64, InFlight>,
    deadlines: BTreeSet<(Instant, u64)>,
    /// Redeliveries that are due, delivered before fresh messages.
    retry: VecDeque<Item>,
    /// Fresh messages in sequence order.
    ready: VecDeque<Item>,
    /// Nacked with a delay (or persisted not-before): (due ms, seq).
    delayed: BTreeMap<(u64, u64), Item>,
    /// Next sequence to read from the store; everything below is held here
    /// (ready, retry, delayed, in flight) or settled.
    cursor: u64,
    next_delivery: u64,
    /// When in-flight figures were last reported to the store.
    reported_at: Option<Instant>,
    /// The per-message metrics of this subscription, looked up once.
    metrics: SubMetrics,
}

/// Handles to the subscription's per-message counters and histogram: the
/// `counter!` macro would build and hash the labelled key on every call.
struct SubMetrics {
    delivered: ::metrics::Counter,
    redelivered: ::metrics::Counter,
    acked: ::metrics::Counter,
    publish_to_ack: ::metrics::Histogram,
}

impl SubMetrics {
    fn new(subscription: &str) -> Self {
        let label = || ("subscription", subscription.to_string());
        Self {
            delivered: ::metrics::counter!(crate::metrics::DELIVERED, &[label()]),
            redelivered: ::metrics::counter!(crate::metrics::REDELIVERED, &[label()]),
            acked: ::metrics::counter!(crate::metrics::ACKED, &[label()]),
            publish_to_ack: ::metrics::histogram!(
                crate::metrics::PUBLISH_TO_ACK_SECONDS,
                &[label()]
            ),
        }
    }
}

impl Dispatcher {
    pub(super) fn new(
        info: Arc<SubscriptionInfo>,
        state: Arc<SubState>,
        topic: Arc<TopicState>,
        store: Store,
        rx: mpsc::Receiver<Event>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let metrics = SubMetrics::new(&info.name);
        Self {
            metrics,
            info,
            state,
            topic,
            store,
            rx,
            shutdown,
            consumers: Vec::new(),
            next_slot: 0,
            in_flight: HashMap::new(),
            deadlines: BTreeSet::new(),
            retry: VecDeque::new(),
            ready: VecDeque::new(),
            delayed: BTreeMap::new(),
            cursor: 0,
            // Delivery ids differ across restarts, so a stale ack never
            // matches a new delivery.
            next_delivery: now_ms().saturating_mul(1000),
            reported_at: None,
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            for message in self.state.take_expired() {
                self.expire(message).await;
            }
            self.fire_timers().await;
            // Fresh messages come before their sequence is committed.
            if self.ready.len() < REFILL_BELOW
                && (self.cursor <= self.topic.committed() || self.state.has_fresh())
            {
                if let Err(e) = self.refill().await {
                    error!(cause = %e, "reading pending messages failed; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            self.pump().await;

            self.report();
            let wake_at = self.next_timer();
            tokio::select! {
                _ = self.shutdown.changed() => {}
                event = self.rx.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => break,
                },
                _ = self.state.notify.notified() => {}
                _ = tokio::time::sleep_until(wake_at.unwrap_or_else(far_future)), if wake_at.is_some() => {}
            }
        }
        for slot in self.consumers.drain(..) {
            let _ = slot.tx.try_send(Err(Status::unavailable(
                "the broker is shutting down; reconnect shortly (unacked deliveries will be redelivered)",
            )));
        }
        debug!("dispatcher stopped");
    }

    /// Tells the store (and so metrics and the status page) how many
    /// deliveries await ack and how old the oldest pending message is. At
    /// most every 500 ms: it walks the in-flight set.
    fn report(&mut self) {
        let now = Instant::now();
        if self
            .reported_at
            .is_some_and(|at| now.duration_since(at) < Duration::from_millis(500))
        {
            return;
        }
        self.reported_at = Some(now);
        let oldest = self
            .in_flight
            .values()
            .map(|f| &f.item)
            .chain(self.retry.iter())
            .chain(self.delayed.values())
            .chain(self.ready.front())
            .map(|i| i.message.publish_ms)
            .filter(|ms| *ms != 0)
            .min()
            .unwrap_or(0);
        self.state.report(self.in_flight.len() as u64, oldest);
    }

    fn next_timer(&self) -> Option<Instant> {
        let deadline = self.deadlines.first().map(|(at, _)| *at);
        let delayed = self.delayed.keys().next().map(|(due_ms, _)| {
            Instant::now() + Duration::from_millis(due_ms.saturating_sub(now_ms()))
        });
        match (deadline, delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Attach {
                consumer,
                tx,
                max_in_flight,
                credit,
                reply,
            } => {
                let result = if self.consumers.len() >= self.info.max_consumers {
                    Err(AttachError::TooManyConsumers {
                        subscription: self.info.name.clone(),
                        max: self.info.max_consumers,
                    })
                } else {
                    self.consumers.push(Slot {
                        id: consumer,
                        tx,
                        max_in_flight: max_in_flight.max(1),
                        in_flight: 0,
                        credit: credit.map(u64::from),
                    });
                    info!(consumer, max_in_flight, "consumer attached");
                    Ok(())
                };
                let _ = reply.send(result);
            }
            Event::Detach { consumer } => self.detach(consumer).await,
            Event::Ack { consumer, ids } => {
                let mut settlements = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(item) = self.take_in_flight(consumer, id) {
                        settlements.push(self.settlement(item, Outcome::Ack));
                    }
                }
                let n = settlements.len();
                if let Err(e) = self.store.settle_all(settlements).await {
                    warn!(cause = %e, acks = n, "could not record acks; the messages will be delivered again after a restart");
                }
            }
            Event::Nack {
                consumer,
                ids,
                delay,
            } => {
                for id in ids {
                    if let Some(item) = self.take_in_flight(consumer, id) {
                        self.audit(EventKind::Nack, &item).await;
                        ::metrics::counter!(crate::metrics::NACKED, "subscription" => self.info.name.clone())
                            .increment(1);
                        self.requeue(item, delay).await;
                    }
                }
            }
            Event::Credit { consumer, n } => {
                if let Some(slot) = self.consumers.iter_mut().find(|s| s.id == consumer) {
                    if let Some(credit) = slot.credit.as_mut() {
                        *credit = credit.saturating_add(u64::from(n));
                    }
                }
            }
            Event::Redriven { seqs } => self.redriven(seqs).await,
            Event::Purge {
                event,
                fence,
                reply,
            } => {
                let _ = reply.send(self.purge(*event, &fence).await);
            }
        }
    }

    /// Records what happened to a delivery (the store drops it when the
    /// audit log is off).
    async fn audit(&self, kind: EventKind, item: &Item) {
        if let Some(event) = self.audit_event(kind, item) {
            if let Err(e) = self.store.audit(event).await {
                warn!(cause = %e, seq = item.seq, "could not record an audit event");
            }
        }
    }

    /// The audit record of what happened to a delivery (None: the audit
    /// log is off).
    fn audit_event(&self, kind: EventKind, item: &Item) -> Option<AuditEvent> {
        if !self.store.audit_enabled() {
            return None;
        }
        let mut event = AuditEvent::new(kind, self.info.owner.clone()).about(&item.message);
        event.topic = self.info.topic_name.clone();
        event.subscription = self.info.name.clone();
        event.attempt = item.attempts;
        Some(event)
    }

    /// Queues the delivery records gathered so far, in order.
    async fn record_deliveries(&self, events: &mut Vec<AuditEvent>) {
        if events.is_empty() {
            return;
        }
        let n = events.len();
        if let Err(e) = self.store.audit_all(std::mem::take(events)).await {
            warn!(cause = %e, records = n, "could not record delivery audit events");
        }
    }

    /// Removes a delivery from flight if `consumer` holds it.
    fn take_in_flight(&mut self, consumer: u64, id: u64) -> Option<Item> {
        match self.in_flight.get(&id) {
            Some(f) if f.consumer == consumer => {}
            Some(_) => {
                debug!(
                    delivery_id = id,
                    consumer, "settle of another consumer's delivery ignored"
                );
                return None;
            }
            None => {
                debug!(
                    delivery_id = id,
                    consumer, "settle of an unknown delivery ignored"
                );
                return None;
            }
        }
        let f = self.in_flight.remove(&id)?;
        self.deadlines.remove(&(f.deadline, id));
        if let Some(slot) = self.consumers.iter_mut().find(|s| s.id == consumer) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
        Some(f.item)
    }

    async fn detach(&mut self, consumer: u64) {
        let Some(pos) = self.consumers.iter().position(|s| s.id == consumer) else {
            return;
        };
        self.consumers.remove(pos);
        let mine: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.consumer == consumer)
            .map(|(id, _)| *id)
            .collect();
        let mut items = Vec::with_capacity(mine.len());
        for id in mine {
            if let Some(f) = self.in_flight.remove(&id) {
                self.deadlines.remove(&(f.deadline, id));
                items.push(f.item);
            }
        }
        items.sort_by_key(|i| i.seq);
        info!(consumer, unacked = items.len(), "consumer detached");
        for item in items {
            self.requeue(item, Duration::ZERO).await;
        }
    }

    /// A delivery came back unacked (nack, deadline, consumer gone): deliver
    /// it again after `delay`, or dead-letter it if it has had its deliveries.
    async fn requeue(&mut self, item: Item, delay: Duration) {
        if item.attempts >= self.info.max_deliveries {
            self.settle(
                item,
                Outcome::DeadLetter {
                    reason: DeadReason::MaxDeliveries,
                    attempts: 0,
                },
            )
            .await;
            return;
        }
        let not_before_ms = if delay.is_zero() {
            0
        } else {
            now_ms().saturating_add(delay.as_millis() as u64)
        };
        let pending = Pending {
            attempts: item.attempts,
            not_before_ms,
        };
        if let Err(e) = self.store.requeue(self.state.id, item.seq, pending).await {
            warn!(cause = %e, seq = item.seq, "could not persist the delivery count");
        }
        if not_before_ms == 0 {
            self.retry.push_back(item);
        } else {
            self.delayed.insert((not_before_ms, item.seq), item);
        }
    }

    async fn settle(&mut self, item: Item, outcome: Outcome) {
        let seq = item.seq;
        let settlement = self.settlement(item, outcome);
        if let Err(e) = self.store.settle_all(vec![settlement]).await {
            warn!(cause = %e, seq, "could not record settlement; the message will be delivered again after a restart");
        }
    }

    /// Counts a settlement in the metrics, and what the store is to record.
    fn settlement(&self, item: Item, outcome: Outcome) -> Settlement {
        let outcome = match outcome {
            Outcome::DeadLetter { reason, .. } => {
                info!(
                    seq = item.seq,
                    attempts = item.attempts,
                    reason = reason.as_str(),
                    "dead-lettered"
                );
                let subscription = self.info.name.clone();
                ::metrics::counter!(crate::metrics::DEAD_LETTERED, "subscription" => subscription.clone(), "reason" => reason.as_str())
                    .increment(1);
                if reason == DeadReason::Expired {
                    ::metrics::counter!(crate::metrics::EXPIRED, "subscription" => subscription)
                        .increment(1);
                }
                Outcome::DeadLetter {
                    reason,
                    attempts: item.attempts,
                }
            }
            ack => {
                self.metrics.acked.increment(1);
                if item.message.publish_ms != 0 {
                    let age = now_ms().saturating_sub(item.message.publish_ms);
                    self.metrics.publish_to_ack.record(age as f64 / 1000.0);
                }
                ack
            }
        };
        Settlement {
            sub: self.state.clone(),
            topic: self.topic.clone(),
            message: item.message,
            outcome,
            agency: self.info.owner.clone(),
        }
    }

    async fn dead_letter(&mut self, item: Item, reason: DeadReason) {
        self.settle(
            item,
            Outcome::DeadLetter {
                reason,
                attempts: 0,
            },
        )
        .await;
    }

    /// The expiry sweep found `message` expired: dead-letter it unless a
    /// consumer holds it right now (its ack or redelivery settles it then).
    async fn expire(&mut self, message: Arc<StoredMessage>) {
        let seq = message.seq;
        if self.in_flight.values().any(|f| f.item.seq == seq) {
            return;
        }
        let held = take_where(&mut self.ready, seq)
            .or_else(|| take_where(&mut self.retry, seq))
            .or_else(|| {
                let key = self.delayed.keys().find(|(_, s)| *s == seq).copied()?;
                self.delayed.remove(&key)
            });
        let item = held.unwrap_or(Item {
            seq,
            attempts: 0,
            message,
        });
        self.dead_letter(item, DeadReason::Expired).await;
    }

    async fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(f) = self.in_flight.remove(&id) {
                if let Some(slot) = self.consumers.iter_mut().find(|s| s.id == f.consumer) {
                    slot.in_flight = slot.in_flight.saturating_sub(1);
                }
                debug!(
                    seq = f.item.seq,
                    attempts = f.item.attempts,
                    "ack deadline passed"
                );
                self.requeue(f.item, Duration::ZERO).await;
            }
        }
        let now_ms = now_ms();
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            self.retry.push_back(entry.remove());
        }
    }

    async fn refill(&mut self) -> Result<(), crate::storage::StorageError> {
        let committed = self.topic.committed();
        // Messages just made durable come from memory when they continue
        // the cursor; the store is read only for what they do not cover.
        let fresh = self.state.take_fresh(self.cursor, REFILL_BATCH);
        if let Some(last) = fresh.last() {
            self.cursor = last.seq + 1;
        }
        for message in fresh {
            self.ready.push_back(Item {
                seq: message.seq,
                attempts: 0,
                message,
            });
        }
        if self.cursor > committed || self.ready.len() >= REFILL_BELOW {
            return Ok(());
        }
        let (from, store, state) = (self.cursor, self.store.clone(), self.state.clone());
        let rows = tokio::task::spawn_blocking(move || {
            store.scan_pending(&state, from, committed, REFILL_BATCH)
        })
        .await
        .map_err(|e| crate::storage::StorageError::Unavailable(e.to_string()))??;
        self.cursor = match rows.last() {
            Some((seq, _, _)) if rows.len() >= REFILL_BATCH => seq + 1,
            _ => committed + 1,
        };
        let now = now_ms();
        for (seq, pending, message) in rows {
            let Some(message) = message else {
                error!(seq, "pending entry without its message; dropping the entry");
                let placeholder = Arc::new(StoredMessage::placeholder(self.topic.id, seq));
                let item = Item {
                    seq,
                    attempts: pending.attempts,
                    message: placeholder,
                };
                self.settle(item, Outcome::Ack).await;
                continue;
            };
            let item = Item {
                seq,
                attempts: pending.attempts,
                message,
            };
            if pending.not_before_ms > now {
                self.delayed.insert((pending.not_before_ms, seq), item);
            } else {
                self.ready.push_back(item);
            }
        }
        Ok(())
    }

    fn pick_consumer(&mut self) -> Option<usize> {
        let n = self.consumers.len();
        for i in 0..n {
            let idx = (self.next_slot + i) % n;
            if self.consumers[idx].can_take() {
                self.next_slot = (idx + 1) % n;
                return Some(idx);
            }
        }
        None
    }

    /// Delivers while some consumer can take a message and one is ready.
    async fn pump(&mut self) {
        // Delivery records, queued together (before anything else is sent
        // to the store, so the audit log keeps their order).
        let mut delivered = Vec::new();
        while let Some(idx) = self.pick_consumer() {
            let Some(mut item) = self.retry.pop_front().or_else(|| self.ready.pop_front()) else {
                break;
            };
            if item.message.is_expired(now_ms()) {
                self.record_deliveries(&mut delivered).await;
                self.dead_letter(item, DeadReason::Expired).await;
                continue;
            }
            if item.attempts >= self.info.max_deliveries {
                self.record_deliveries(&mut delivered).await;
                self.dead_letter(item, DeadReason::MaxDeliveries).await;
                continue;
            }
            let envelope = match Envelope::decode(item.message.envelope.clone()) {
                Ok(envelope) => envelope,
                Err(e) => {
                    error!(seq = item.seq, cause = %e, "stored envelope unreadable");
                    self.record_deliveries(&mut delivered).await;
                    self.dead_letter(item, DeadReason::Unreadable).await;
                    continue;
                }
            };
            let id = self.next_delivery;
            self.next_delivery += 1;
            let delivery = Delivery {
                delivery_id: id,
                sequence: item.seq,
                attempt: item.attempts + 1,
                subscription: self.info.name.clone(),
                envelope: Some(envelope),
                topic: self.info.topic_name.clone(),
            };
            let slot = &mut self.consumers[idx];
            match slot.tx.try_send(Ok(delivery)) {
                Ok(()) => {
                    slot.in_flight += 1;
                    if let Some(credit) = slot.credit.as_mut() {
                        *credit -= 1;
                    }
                    item.attempts += 1;
                    let consumer = slot.id;
                    delivered.extend(self.audit_event(EventKind::Delivery, &item));
                    self.metrics.delivered.increment(1);
                    if item.attempts > 1 {
                        self.metrics.redelivered.increment(1);
                    }
                    let deadline = Instant::now() + self.info.ack_deadline;
                    self.deadlines.insert((deadline, id));
                    self.in_flight.insert(
                        id,
                        InFlight {
                            item,
                            consumer,
                            deadline,
                        },
                    );
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Cannot happen while in_flight < max_in_flight (the
                    // channel holds max_in_flight + 1); be safe regardless.
                    self.retry.push_front(item);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    let consumer = slot.id;
                    self.retry.push_front(item);
                    self.record_deliveries(&mut delivered).await;
                    self.detach(consumer).await;
                }
            }
        }
        self.record_deliveries(&mut delivered).await;
    }
}

fn take_where(queue: &mut VecDeque<Item>, seq: u64) -> Option<Item> {
    let pos = queue.iter().position(|i| i.seq == seq)?;
    queue.remove(pos)
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}
