//! Operator actions on subscriptions, behind the Admin service
//! ([`crate::service::admin_service`], which has already checked that the
//! caller is one of `broker.operators`): listing and redriving dead letters,
//! purging a subscription, peeking at its pending messages. [`cli`] is the
//! operator's command line for them.
//!
//! # Invariants
//! - Redrive, purge and peek (and listing dead letters, as a peek) are
//!   audited with the operator's agency and the number of messages covered. Redrive and purge records are written in the
//!   same batch as the change; a peek that returns payloads is answered only
//!   once its record is durable.
//! - Payloads leave the broker here only through a peek that asks for them,
//!   by an operator whose clearance covers the topic's `max_marking`.
//! - Every call is bounded: at most [`MAX_REDRIVE`] dead letters per redrive,
//!   [`MAX_LIST`] per listing, [`MAX_PEEK`] per peek; a purge works through
//!   the subscription in fixed-size batches.

pub mod cli;

use prost::Message;
use tracing::{info, warn};

use crate::audit::{AuditEvent, EventKind};
use crate::broker::{timestamp_from_ms, Broker, BrokerError};
use crate::proto::{
    DeadLetterInfo, Envelope, ListDeadLettersRequest, ListDeadLettersResponse, PeekMessagesRequest,
    PeekMessagesResponse, PeekedMessage, PurgeSubscriptionRequest, PurgeSubscriptionResponse,
    RedriveDeadLettersRequest, RedriveDeadLettersResponse,
};
use crate::queue::{ActionError, Subscription};
use crate::storage::{StorageError, StoredMessage};

/// Most dead letters one redrive call puts back.
pub const MAX_REDRIVE: usize = 10_000;
/// Most dead letters one listing returns (and how many when unasked).
pub const MAX_LIST: usize = 1_000;
const DEFAULT_LIST: usize = 100;
/// Most messages one peek returns (and how many when unasked).
pub const MAX_PEEK: usize = 100;
const DEFAULT_PEEK: usize = 10;

fn subscription<'a>(broker: &'a Broker, name: &str) -> Result<&'a Subscription, BrokerError> {
    broker
        .subscription(name)
        .ok_or_else(|| BrokerError::SubscriptionNotFound(name.to_string()))
}

fn bounded(requested: u32, default: usize, max: usize) -> usize {
    match requested {
        0 => default,
        n => (n as usize).min(max),
    }
}

fn joined(e: tokio::task::JoinError) -> BrokerError {
    BrokerError::Storage(StorageError::Unavailable(e.to_string()))
}

fn action(e: ActionError) -> BrokerError {
    match e {
        ActionError::ShuttingDown => BrokerError::ShuttingDown,
        ActionError::Storage(e) => BrokerError::Storage(e),
    }
}

/// The envelope of a stored message (empty but for id and type if the stored
/// bytes cannot be read).
fn envelope_of(message: &StoredMessage) -> Envelope {
    Envelope::decode(message.envelope.clone()).unwrap_or_else(|_| Envelope {
        message_id: message.message_id.clone(),
        message_type: message.message_type.clone(),
        ..Default::default()
    })
}

fn audit_event(kind: EventKind, operator: &str, sub: &Subscription) -> AuditEvent {
    let mut event = AuditEvent::new(kind, operator);
    event.topic = sub.info.topic_name.clone();
    event.subscription = sub.info.name.clone();
    event
}

/// A page of a subscription's dead letters, oldest first, without payloads
/// (audited as a `peek` at dead letter headers).
pub async fn list_dead_letters(
    broker: &Broker,
    operator: &str,
    request: ListDeadLettersRequest,
) -> Result<ListDeadLettersResponse, BrokerError> {
    let sub = subscription(broker, &request.subscription)?;
    let limit = bounded(request.limit, DEFAULT_LIST, MAX_LIST);
    let (store, state, after) = (
        broker.store().clone(),
        sub.state.clone(),
        request.after_sequence,
    );
    let dead = tokio::task::spawn_blocking(move || store.dead_letters_after(&state, after, limit))
        .await
        .map_err(joined)??;
    let next_after_sequence = match dead.last() {
        Some(last) if dead.len() >= limit => last.message.seq,
        _ => 0,
    };
    let dead_letters = dead
        .iter()
        .map(|d| {
            let envelope = envelope_of(&d.message);
            DeadLetterInfo {
                sequence: d.message.seq,
                message_id: d.message.message_id.clone(),
                message_type: d.message.message_type.clone(),
                sender: envelope.sender,
                reason: d.reason.as_str().to_string(),
                attempts: d.attempts,
                dead_lettered_at: Some(timestamp_from_ms(d.dead_ms)),
                published_at: Some(timestamp_from_ms(d.message.publish_ms)),
                correlation_id: envelope.correlation_id,
                marking: envelope.marking,
                payload_bytes: envelope.payload.len() as u64,
            }
        })
        .collect();
    let mut event = audit_event(EventKind::Peek, operator, sub);
    event.count = dead.len() as u64;
    event.reason = "dead letter headers".into();
    broker.store().audit(event).await?;
    Ok(ListDeadLettersResponse {
        dead_letters,
        total: sub.state.dead_letters(),
        next_after_sequence,
    })
}

/// Puts dead letters back on their subscription (the named ones, or the
/// oldest [`MAX_REDRIVE`]) with attempts reset, durably and audited, then has
/// the dispatcher deliver them again.
pub async fn redrive_dead_letters(
    broker: &Broker,
    operator: &str,
    request: RedriveDeadLettersRequest,
) -> Result<RedriveDeadLettersResponse, BrokerError> {
    let sub = subscription(broker, &request.subscription)?;
    if request.sequences.len() > MAX_REDRIVE {
        return Err(BrokerError::TooManySequences {
            given: request.sequences.len(),
            max: MAX_REDRIVE,
        });
    }
    if broker.is_shutting_down() {
        return Err(BrokerError::ShuttingDown);
    }
    let mut event = audit_event(EventKind::Redrive, operator, sub);
    event.reason = if request.sequences.is_empty() {
        "oldest dead letters".into()
    } else {
        "selected dead letters".into()
    };
    let redriven = broker
        .store()
        .redrive(
            sub.state.clone(),
            sub.topic.clone(),
            request.sequences,
            MAX_REDRIVE,
            event,
        )
        .await?;
    if !redriven.sequences.is_empty() {
        if let Err(e) = sub.redriven(redriven.sequences.clone()).await {
            // Durable already: the dispatcher reads them after a restart.
            warn!(cause = %e, subscription = %sub.info.name, "redriven dead letters not handed to the dispatcher");
        }
    }
    info!(
        operator,
        subscription = %sub.info.name,
        redriven = redriven.sequences.len(),
        missing = redriven.missing.len(),
        "dead letters redriven"
    );
    Ok(RedriveDeadLettersResponse {
        redriven: redriven.sequences.len() as u64,
        sequences: redriven.sequences,
        missing: redriven.missing,
        remaining: sub.state.dead_letters(),
    })
}

/// Removes every pending message of a subscription, once `confirm` names it.
pub async fn purge_subscription(
    broker: &Broker,
    operator: &str,
    request: PurgeSubscriptionRequest,
) -> Result<PurgeSubscriptionResponse, BrokerError> {
    let sub = subscription(broker, &request.subscription)?;
    if request.confirm != request.subscription {
        return Err(BrokerError::PurgeNotConfirmed {
            subscription: request.subscription,
        });
    }
    if broker.is_shutting_down() {
        return Err(BrokerError::ShuttingDown);
    }
    let event = audit_event(EventKind::Purge, operator, sub);
    let purged = sub.purge(event).await.map_err(action)?;
    info!(operator, subscription = %sub.info.name, purged, "subscription purged");
    Ok(PurgeSubscriptionResponse { purged })
}

/// The next pending messages of a subscription: envelope headers, and
/// payloads only when asked for and the operator is cleared for the topic.
pub async fn peek_messages(
    broker: &Broker,
    operator: &str,
    request: PeekMessagesRequest,
) -> Result<PeekMessagesResponse, BrokerError> {
    let sub = subscription(broker, &request.subscription)?;
    if request.include_payload {
        broker.check_clearance(operator, sub)?;
    }
    let limit = bounded(request.limit, DEFAULT_PEEK, MAX_PEEK);
    let (store, state, committed) = (
        broker.store().clone(),
        sub.state.clone(),
        sub.topic.committed(),
    );
    let rows = tokio::task::spawn_blocking(move || store.scan_pending(&state, 0, committed, limit))
        .await
        .map_err(joined)??;
    let messages: Vec<PeekedMessage> = rows
        .into_iter()
        .filter_map(|(seq, pending, message)| {
            let message = message?;
            let mut envelope = envelope_of(&message);
            let payload_bytes = envelope.payload.len() as u64;
            if !request.include_payload {
                envelope.payload.clear();
            }
            Some(PeekedMessage {
                sequence: seq,
                attempts: pending.attempts,
                published_at: Some(timestamp_from_ms(message.publish_ms)),
                not_before: (pending.not_before_ms != 0)
                    .then(|| timestamp_from_ms(pending.not_before_ms)),
                envelope: Some(envelope),
                payload_bytes,
            })
        })
        .collect();
    let mut event = audit_event(EventKind::Peek, operator, sub);
    event.count = messages.len() as u64;
    event.reason = if request.include_payload {
        "headers and payloads".into()
    } else {
        "headers".into()
    };
    let store = broker.store();
    store.audit(event).await?;
    if request.include_payload && store.audit_enabled() {
        store.sync().await?;
    }
    Ok(PeekMessagesResponse { messages })
}
