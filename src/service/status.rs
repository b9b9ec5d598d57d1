//! The one place where errors become gRPC statuses.
//!
//! Every refusal carries a stable reason — the `joinery-reason` response
//! metadata and the first word of the message — that clients may match on.
//! Reasons are a wire contract: never change or reuse one. Internal causes
//! (storage failures) are logged here and replaced by a generic message.

use tonic::{Code, Status};
use tracing::error;

use crate::broker::BrokerError;
use crate::queue::AttachError;

/// Metadata key carrying the stable reason of a refusal.
pub const REASON_KEY: &str = "joinery-reason";

/// The status code and stable reason of a refusal.
pub fn classify(err: &BrokerError) -> (Code, &'static str) {
    use BrokerError::*;
    match err {
        Unauthenticated(_) => (Code::Unauthenticated, "unauthenticated"),
        TopicNotFound(_) => (Code::NotFound, "topic_not_found"),
        SubscriptionNotFound(_) => (Code::NotFound, "subscription_not_found"),
        NotPublisher { .. } => (Code::PermissionDenied, "not_a_publisher"),
        NotOwner { .. } => (Code::PermissionDenied, "not_subscription_owner"),
        MarkingAboveTopic { .. } => (Code::PermissionDenied, "marking_above_topic"),
        InsufficientClearance { .. } => (Code::PermissionDenied, "insufficient_clearance"),
        NotOperator(_) => (Code::PermissionDenied, "not_an_operator"),
        UnknownType(_) => (Code::InvalidArgument, "unknown_message_type"),
        InvalidPayload(_) => (Code::InvalidArgument, "invalid_payload"),
        MissingEnvelope => (Code::InvalidArgument, "missing_envelope"),
        InvalidEnvelope(_) => (Code::InvalidArgument, "invalid_envelope"),
        TypeNotAccepted { .. } => (Code::InvalidArgument, "type_not_accepted"),
        TooLarge { .. } | RequestTooLarge(_) => (Code::ResourceExhausted, "message_too_large"),
        UnknownRecipient(_) => (Code::InvalidArgument, "unknown_recipient"),
        RecipientNotSubscribed { .. } => (Code::FailedPrecondition, "recipient_not_subscribed"),
        SenderMismatch { .. } => (Code::InvalidArgument, "sender_mismatch"),
        NotOpened => (Code::InvalidArgument, "not_opened"),
        AlreadyOpen => (Code::InvalidArgument, "already_open"),
        Attach(AttachError::TooManyConsumers { .. }) => {
            (Code::ResourceExhausted, "too_many_consumers")
        }
        SubscriptionFull { .. } => (Code::ResourceExhausted, "subscription_full"),
        RateLimited { .. } => (Code::ResourceExhausted, "rate_limited"),
        TooManyStreams { .. } => (Code::ResourceExhausted, "too_many_streams"),
        DiskLow { .. } => (Code::Unavailable, "disk_low"),
        PurgeNotConfirmed { .. } => (Code::FailedPrecondition, "purge_not_confirmed"),
        TooManySequences { .. } => (Code::InvalidArgument, "too_many_sequences"),
        Attach(AttachError::ShuttingDown) | ShuttingDown => (Code::Unavailable, "shutting_down"),
        Storage(_) => (Code::Unavailable, "storage_unavailable"),
    }
}

pub fn to_status(err: BrokerError) -> Status {
    let (code, reason) = classify(&err);
    if let BrokerError::Storage(cause) = &err {
        error!(cause = %cause, "storage failure answered as UNAVAILABLE");
        return with_reason(
            code,
            reason,
            "the broker cannot store messages right now; retry later (operators: see the broker log)"
                .into(),
        );
    }
    with_reason(code, reason, err.to_string())
}

fn with_reason(code: Code, reason: &'static str, message: String) -> Status {
    let mut status = Status::new(code, format!("{reason}: {message}"));
    status.metadata_mut().insert(
        REASON_KEY,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

/// tonic refuses a request frame over `max_decoding_message_size` itself,
/// before any joinery code runs, with `OUT_OF_RANGE`. The contract says an
/// oversized message is `RESOURCE_EXHAUSTED` / `message_too_large`: rewrite
/// such trailers-only responses on their way out.
pub fn oversized_to_resource_exhausted<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    use tonic::codegen::http::HeaderValue;
    let headers = response.headers_mut();
    let oversized = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            // tonic percent-encodes the message (spaces as %20).
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if oversized {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static(
                "message_too_large: the request is larger than this broker accepts (see broker.max_message_bytes)",
            ),
        );
        headers.insert(REASON_KEY, HeaderValue::from_static("message_too_large"));
    }
    response
}
