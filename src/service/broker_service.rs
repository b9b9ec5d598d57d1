//! `joinery.v1.Broker`: Publish, PublishStream and Subscribe.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn, Instrument};

use super::status::to_status;
use crate::auth::agency_of;
use crate::broker::{Broker, BrokerError, PendingPublish};
use crate::proto::broker_server;
use crate::proto::subscribe_request::Request as SubRequest;
use crate::proto::{Delivery, PublishRequest, PublishResponse, SubscribeRequest};

/// Publishes one PublishStream may have waiting for durability at once.
const PIPELINE: usize = 1024;
/// How long a new Subscribe stream may take to send `open`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest nack delay honoured.
const MAX_REQUEUE_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

pub struct BrokerService {
    broker: Broker,
}

impl BrokerService {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl broker_server::Broker for BrokerService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let caller = agency_of(&request).map_err(|e| to_status(e.into()))?;
        let pending = self
            .broker
            .submit(&caller, request.into_inner())
            .await
            .map_err(to_status)?;
        let response = pending.wait().await.map_err(to_status)?;
        Ok(Response::new(response))
    }

    type PublishStreamStream = BoxStream<PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let caller = agency_of(&request).map_err(|e| to_status(e.into()))?;
        let permit = self.broker.stream_permit(&caller).map_err(to_status)?;
        let span = tracing::info_span!("publish_stream", agency = %caller);
        let mut inbound = request.into_inner();
        let (pending_tx, mut pending_rx) =
            mpsc::channel::<Result<PendingPublish, BrokerError>>(PIPELINE);
        let (out_tx, out_rx) = mpsc::channel(PIPELINE);

        // Reader: validate and submit each request without waiting for its
        // flush, so a pipelining client's publishes share group commits.
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
                            let _ = pending_tx
                                .send(Err(BrokerError::RequestTooLarge(status.message().into())))
                                .await;
                            break;
                        }
                        Err(status) => {
                            debug!(%status, "publish stream ended by the client");
                            break;
                        }
                    };
                    let submitted = broker.submit(&caller, request).await;
                    let failed = submitted.is_err();
                    if pending_tx.send(submitted).await.is_err() || failed {
                        break;
                    }
                }
            }
            .instrument(span.clone()),
        );
        // Responder: answer in request order as each becomes durable.
        tokio::spawn(
            async move {
                let _permit = permit;
                while let Some(submitted) = pending_rx.recv().await {
                    let answer = match submitted {
                        Ok(pending) => pending.wait().await,
                        Err(e) => Err(e),
                    };
                    match answer {
                        Ok(response) => {
                            if out_tx.send(Ok(response)).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = out_tx.send(Err(to_status(e))).await;
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
        let caller = agency_of(&request).map_err(|e| to_status(e.into()))?;
        let permit = self.broker.stream_permit(&caller).map_err(to_status)?;
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(OPEN_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) | Err(_) => return Err(to_status(BrokerError::NotOpened)),
            Ok(Err(status)) => return Err(status),
        };
        let Some(SubRequest::Open(open)) = first.request else {
            return Err(to_status(BrokerError::NotOpened));
        };
        let (sub, mut consumer) = self.broker.open(&caller, open).await.map_err(to_status)?;
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
                loop {
                    let request = match inbound.message().await {
                        Ok(Some(request)) => request,
                        Ok(None) => break,
                        Err(status) => {
                            debug!(%status, "subscribe stream ended by the client");
                            break;
                        }
                    };
                    match request.request {
                        Some(SubRequest::Ack(ack)) => consumer.ack(ack.delivery_ids).await,
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
        Ok(Response::new(Box::pin(ReceiverStream::new(deliveries))))
    }
}
