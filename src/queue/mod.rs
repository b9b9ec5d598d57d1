//! Subscriptions at run time: one dispatcher task per configured subscription
//! hands its messages to the consumers attached to it.
//!
//! A dispatcher ([`dispatcher`]) owns everything about its subscription that
//! changes per delivery — in-flight deliveries and their ack deadlines,
//! redeliveries, nack delays, consumer credit — so none of it needs a lock.
//! Consumers talk to it through [`Consumer`] (events in, deliveries out).
//!
//! # Invariants
//! - A consumer never holds more than its `max_in_flight` unacked deliveries,
//!   nor more than its credit when it uses credit.
//! - Fresh messages are delivered in sequence order; redeliveries go first
//!   when they are due (so they may arrive after later messages).
//! - Only durable messages are delivered (the topic's `committed` sequence),
//!   unless the topic is configured `deliver_before_sync`: then a message
//!   may be delivered while its group commit is syncing it.
//! - A message is acked, dead-lettered or still pending: the store decides,
//!   so an ack that races an expiry settles it once.
//! - After a purge, nothing the dispatcher handed out before it reaches a
//!   consumer any more (a delivery fence), and acks of such deliveries are
//!   ignored.

mod dispatcher;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;
use tracing::Instrument;

use crate::audit::AuditEvent;
use crate::proto::Delivery;
use crate::storage::{StorageError, Store, SubState, TopicState};

/// What a dispatcher needs to know about its subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionInfo {
    pub name: String,
    pub topic_name: String,
    pub owner: String,
    pub ack_deadline: Duration,
    pub max_deliveries: u32,
    pub max_consumers: usize,
}

/// Why a consumer could not attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("subscription {subscription:?} already has its maximum of {max} consumers")]
    TooManyConsumers { subscription: String, max: usize },
    #[error("the broker is shutting down")]
    ShuttingDown,
}

/// Why an operator action on a running subscription failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("storage failed during the action")]
    Storage(#[from] StorageError),
}

pub(crate) enum Event {
    Attach {
        consumer: u64,
        tx: mpsc::Sender<Result<Delivery, Status>>,
        max_in_flight: u32,
        credit: Option<u32>,
        reply: oneshot::Sender<Result<(), AttachError>>,
    },
    Detach {
        consumer: u64,
    },
    Ack {
        consumer: u64,
        ids: Vec<u64>,
    },
    Nack {
        consumer: u64,
        ids: Vec<u64>,
        delay: Duration,
    },
    Credit {
        consumer: u64,
        n: u32,
    },
    /// Dead letters were put back as pending entries: deliver them again.
    Redriven {
        seqs: Vec<u64>,
    },
    /// Drop everything held, remove every pending entry, answer the count.
    Purge {
        event: Box<AuditEvent>,
        fence: Arc<AtomicU64>,
        reply: oneshot::Sender<Result<u64, StorageError>>,
    },
}

/// A running subscription: cheap to clone.
#[derive(Clone)]
pub struct Subscription {
    pub info: Arc<SubscriptionInfo>,
    pub state: Arc<SubState>,
    pub topic: Arc<TopicState>,
    events: mpsc::Sender<Event>,
    next_consumer: Arc<AtomicU64>,
    /// Deliveries with an id below this were made before a purge: stale.
    fence: Arc<AtomicU64>,
}

const EVENT_QUEUE: usize = 4096;

impl Subscription {
    /// Starts the dispatcher task. It ends when `shutdown` turns true, closing
    /// every consumer's stream with `UNAVAILABLE`.
    pub fn start(
        info: SubscriptionInfo,
        state: Arc<SubState>,
        topic: Arc<TopicState>,
        store: Store,
        shutdown: watch::Receiver<bool>,
    ) -> (Subscription, tokio::task::JoinHandle<()>) {
        let info = Arc::new(info);
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        let span = tracing::info_span!("dispatcher", subscription = %info.name);
        let handle = tokio::spawn(
            dispatcher::Dispatcher::new(
                info.clone(),
                state.clone(),
                topic.clone(),
                store,
                rx,
                shutdown,
            )
            .run()
            .instrument(span),
        );
        let sub = Subscription {
            info,
            state,
            topic,
            events,
            next_consumer: Arc::new(AtomicU64::new(1)),
            fence: Arc::new(AtomicU64::new(0)),
        };
        (sub, handle)
    }

    /// Attaches a consumer. Deliveries arrive on the returned consumer's
    /// `deliveries`; the channel holds up to `max_in_flight` of them.
    pub async fn attach(
        &self,
        max_in_flight: u32,
        credit: Option<u32>,
    ) -> Result<Consumer, AttachError> {
        let consumer = self.next_consumer.fetch_add(1, Ordering::Relaxed);
        let (tx, deliveries) = mpsc::channel(max_in_flight.max(1) as usize + 1);
        let (reply, answer) = oneshot::channel();
        self.events
            .send(Event::Attach {
                consumer,
                tx,
                max_in_flight,
                credit,
                reply,
            })
            .await
            .map_err(|_| AttachError::ShuttingDown)?;
        answer.await.map_err(|_| AttachError::ShuttingDown)??;
        Ok(Consumer {
            id: consumer,
            deliveries: Some(Deliveries {
                rx: deliveries,
                fence: self.fence.clone(),
            }),
            events: self.events.clone(),
        })
    }

    /// Tells the dispatcher that these sequences are pending again (after a
    /// redrive made them durable), so it delivers them again.
    pub async fn redriven(&self, seqs: Vec<u64>) -> Result<(), ActionError> {
        self.events
            .send(Event::Redriven { seqs })
            .await
            .map_err(|_| ActionError::ShuttingDown)
    }

    /// Purges the subscription: the dispatcher drops what it holds (in-flight
    /// deliveries become stale), then removes every pending entry in chunks.
    /// Returns how many were removed. `event` is the operator's audit record.
    pub async fn purge(&self, event: AuditEvent) -> Result<u64, ActionError> {
        let (reply, answer) = oneshot::channel();
        self.events
            .send(Event::Purge {
                event: Box::new(event),
                fence: self.fence.clone(),
                reply,
            })
            .await
            .map_err(|_| ActionError::ShuttingDown)?;
        Ok(answer.await.map_err(|_| ActionError::ShuttingDown)??)
    }
}

/// A consumer's delivery stream, without deliveries made stale by a purge
/// while they waited in the channel.
pub struct Deliveries {
    rx: mpsc::Receiver<Result<Delivery, Status>>,
    fence: Arc<AtomicU64>,
}

impl futures_util::Stream for Deliveries {
    type Item = Result<Delivery, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(d))) if d.delivery_id < self.fence.load(Ordering::Acquire) => {
                    continue
                }
                other => return other,
            }
        }
    }
}

/// One attached consumer. Dropping it detaches it: its unacked deliveries are
/// delivered again (to it or another consumer).
pub struct Consumer {
    pub id: u64,
    deliveries: Option<Deliveries>,
    events: mpsc::Sender<Event>,
}

impl Consumer {
    /// The delivery stream (taken once).
    pub fn take_deliveries(&mut self) -> Option<Deliveries> {
        self.deliveries.take()
    }

    pub async fn ack(&self, ids: Vec<u64>) {
        let _ = self
            .events
            .send(Event::Ack {
                consumer: self.id,
                ids,
            })
            .await;
    }

    pub async fn nack(&self, ids: Vec<u64>, delay: Duration) {
        let _ = self
            .events
            .send(Event::Nack {
                consumer: self.id,
                ids,
                delay,
            })
            .await;
    }

    pub async fn credit(&self, n: u32) {
        let _ = self
            .events
            .send(Event::Credit {
                consumer: self.id,
                n,
            })
            .await;
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let events = self.events.clone();
        let consumer = self.id;
        // Detach must not be lost to a momentarily full queue.
        if let Err(mpsc::error::TrySendError::Full(event)) =
            events.try_send(Event::Detach { consumer })
        {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = events.send(event).await;
                });
            }
        }
    }
}
