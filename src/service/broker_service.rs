//! `joinery.v1.Broker`: Publish, PublishStream and Subscribe.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{FutureExt, Stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn, Instrument};

use super::status::{classify, to_status};
use crate::auth::agency_of;
use crate::broker::{Broker, BrokerError, PendingPublish};
use crate::proto::broker_server;
use crate::proto::subscribe_request::Request as SubRequest;
use crate::proto::{Delivery, PublishRequest, PublishResponse, SubscribeRequest};
use crate::tls::PeerInfo;

/// Publishes one PublishStream may have waiting for durability at once.
const PIPELINE: usize = 1024;
/// How long a new Subscribe stream may take to send `open`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest nack delay honoured.
const MAX_REQUEUE_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most delivery ids of acks already received that go to the dispatcher
/// together (a consumer acking each message on its own sends many small
/// acks; taken one by one, each would cost the dispatcher a wake-up and the
/// writer an op).
const ACKS_TOGETHER: usize = 1024;

pub struct BrokerService {
    broker: Broker,
}

impl BrokerService {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The caller's agency, or who it seemed to be and why it was refused.
pub(crate) fn identify<T>(request: &Request<T>) -> Result<String, (String, BrokerError)> {
    agency_of(request).map_err(|e| {
        let who = match request.extensions().get::<PeerInfo>() {
            Some(peer) => format!("unidentified@{}", peer.remote_addr),
            None => "unidentified".to_string(),
        };
        (who, e.into())
    })
}

/// Counts, audits and answers a refused request.
pub(crate) async fn refuse(
    broker: &Broker,
    agency: &str,
    topic: &str,
    subscription: &str,
    err: BrokerError,
) -> Status {
    let (_, reason) = classify(&err);
    broker
        .record_refusal(agency, topic, subscription, reason)
        .await;
    to_status(err)
}

#[tonic::async_trait]
impl broker_server::Broker for BrokerService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let caller = match identify(&request) {
            Ok(caller) => caller,
            Err((who, e)) => return Err(refuse(&self.broker, &who, "", "", e).await),
        };
        let request = request.into_inner();
        let topic = request.topic.clone();
        let refused = |e| refuse(&self.broker, &caller, &topic, "", e);
        let pending = match self.broker.submit(&caller, request).await {
            Ok(pending) => pending,
            Err(e) => return Err(refused(e).await),
        };
        match pending.wait().await {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => Err(refused(e).await),
        }
    }

    type PublishStreamStream = BoxStream<PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let caller = match identify(&request) {
            Ok(caller) => caller,
            Err((who, e)) => return Err(refuse(&self.broker, &who, "", "", e).await),
        };
        let permit = match self.broker.stream_permit(&caller) {
            Ok(permit) => permit,
            Err(e) => return Err(refuse(&self.broker, &caller, "", "", e).await),
        };
        let span = tracing::info_span!("publish_stream", agency = %caller);
        let mut inbound = request.into_inner();
        let (pending_tx, mut pending_rx) =
            mpsc::channel::<Result<PendingPublish, (String, BrokerError)>>(PIPELINE);
        let (out_tx, out_rx) = mpsc::channel(PIPELINE);

        // Reader: validate and submit each request without waiting for its
        // flush, so a pipelining client's publishes share group commits.
        let agency = caller.clone();
        let broker = self.broker.clone();
        let mut shutdown = broker.shutdown_signal();
        tokio::spawn(
            async move {
                loop {
                    let next = tokio::select! {
                        next = inbound.message() => next,
                        _ = shutdown.wait_for(|s| *s) => break,
                    };
                    let request = match next {
                        Ok(Some(request)) => request,
                        Ok(None) => break,
                        Err(status) if status.code() == tonic::Code::OutOfRange => {
                            // tonic's frame-size limit: answer it like any oversized message.
                            let err = BrokerError::RequestTooLarge(status.message().into());
                            let _ = pending_tx.send(Err((String::new(), err))).await;
                            break;
                        }
                        Err(status) => {
                            debug!(%status, "publish stream ended by the client");
                            break;
                        }
                    };
                    let topic = request.topic.clone();
                    let submitted = broker
                        .submit(&caller, request)
                        .await
                        .map_err(|e| (topic, e));
                    let failed = submitted.is_err();
                    if pending_tx.send(submitted).await.is_err() || failed {
                        break;
                    }
                }
            }
            .instrument(span.clone()),
        );
        // Responder: answer in request order as each becomes durable.
        let broker = self.broker.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                while let Some(submitted) = pending_rx.recv().await {
                    let answer = match submitted {
                        Ok(pending) => pending.wait().await.map_err(|e| (String::new(), e)),
                        Err(e) => Err(e),
                    };
                    match answer {
                        Ok(response) => {
                            if out_tx.send(Ok(response)).await.is_err() {
                                break;
                            }
                        }
                        Err((topic, e)) => {
                            let status = refuse(&broker, &agency, &topic, "", e).await;
                            let _ = out_tx.send(Err(status)).await;
                            break;
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    type SubscribeStream = BoxStream<Delivery>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = match identify(&request) {
            Ok(caller) => caller,
            Err((who, e)) => return Err(refuse(&self.broker, &who, "", "", e).await),
        };
        let broker = &self.broker;
        let permit = match broker.stream_permit(&caller) {
            Ok(permit) => permit,
            Err(e) => return Err(refuse(broker, &caller, "", "", e).await),
        };
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(OPEN_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) | Err(_) => {
                return Err(refuse(broker, &caller, "", "", BrokerError::NotOpened).await)
            }
            Ok(Err(status)) => return Err(status),
        };
        let Some(SubRequest::Open(open)) = first.request else {
            return Err(refuse(broker, &caller, "", "", BrokerError::NotOpened).await);
        };
        let name = open.subscription.clone();
        let (sub, mut consumer) = match broker.open(&caller, open).await {
            Ok(opened) => opened,
            Err(e) => return Err(refuse(broker, &caller, "", &name, e).await),
        };
        let deliveries = consumer
            .take_deliveries()
            .ok_or_else(|| to_status(BrokerError::ShuttingDown))?;
        let span = tracing::info_span!(
            "subscribe",
            subscription = %sub.info.name,
            agency = %caller,
            consumer = consumer.id
        );
        tokio::spawn(
            async move {
                let _permit = permit;
                // A message read while gathering acks, handled next.
                let mut read_ahead = None;
                loop {
                    let next = match read_ahead.take() {
                        Some(next) => next,
                        None => inbound.message().await,
                    };
                    let request = match next {
                        Ok(Some(request)) => request,
                        Ok(None) => break,
                        Err(status) => {
                            debug!(%status, "subscribe stream ended by the client");
                            break;
                        }
                    };
                    match request.request {
                        Some(SubRequest::Ack(ack)) => {
                            let mut ids = ack.delivery_ids;
                            while ids.len() < ACKS_TOGETHER {
                                match inbound.message().now_or_never() {
                                    Some(Ok(Some(SubscribeRequest {
                                        request: Some(SubRequest::Ack(more)),
                                    }))) => ids.extend(more.delivery_ids),
                                    Some(other) => {
                                        read_ahead = Some(other);
                                        break;
                                    }
                                    None => break,
                                }
                            }
                            consumer.ack(ids).await
                        }
                        Some(SubRequest::Nack(nack)) => {
                            let delay = nack
                                .requeue_delay
                                .and_then(|d| Duration::try_from(d).ok())
                                .unwrap_or_default()
                                .min(MAX_REQUEUE_DELAY);
                            consumer.nack(nack.delivery_ids, delay).await
                        }
                        Some(SubRequest::Credit(credit)) => consumer.credit(credit.n).await,
                        Some(SubRequest::Open(_)) => {
                            warn!("second open on one Subscribe stream ignored");
                        }
                        None => {}
                    }
                }
                // Dropping the consumer detaches it; its unacked deliveries
                // are delivered again.
                drop(consumer);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(deliveries)))
    }
}
