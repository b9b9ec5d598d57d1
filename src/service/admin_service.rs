//! `joinery.v1.Admin`: operations, for `broker.operators` only. Every call by
//! anyone else is refused (PERMISSION_DENIED, `not_an_operator`), counted and
//! audited. The actions on subscriptions live in [`crate::admin`].

use tonic::{Request, Response, Status};

use super::broker_service::{identify, refuse};
use crate::admin;
use crate::broker::Broker;
use crate::broker::BrokerError;
use crate::config::Marking;
use crate::proto::admin_server;
use crate::proto::{
    GetStatsRequest, GetStatsResponse, ListDeadLettersRequest, ListDeadLettersResponse,
    ListTopicsRequest, ListTopicsResponse, PeekMessagesRequest, PeekMessagesResponse,
    PurgeSubscriptionRequest, PurgeSubscriptionResponse, RedriveDeadLettersRequest,
    RedriveDeadLettersResponse, RefusalCount, SubscriptionStats, TopicInfo,
};

pub struct AdminService {
    broker: Broker,
}

impl AdminService {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }

    /// The calling operator, or the refusal.
    async fn operator<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let caller = match identify(request) {
            Ok(caller) => caller,
            Err((who, e)) => return Err(refuse(&self.broker, &who, "", "", e).await),
        };
        match self.broker.check_operator(&caller) {
            Ok(()) => Ok(caller),
            Err(e) => Err(refuse(&self.broker, &caller, "", "", e).await),
        }
    }

    /// The answer to an action on `subscription`, refusals counted and audited.
    async fn answer<T>(
        &self,
        operator: &str,
        subscription: &str,
        result: Result<T, BrokerError>,
    ) -> Result<Response<T>, Status> {
        match result {
            Ok(response) => Ok(Response::new(response)),
            Err(e) => Err(refuse(&self.broker, operator, "", subscription, e).await),
        }
    }
}

#[tonic::async_trait]
impl admin_server::Admin for AdminService {
    async fn list_topics(
        &self,
        request: Request<ListTopicsRequest>,
    ) -> Result<Response<ListTopicsResponse>, Status> {
        self.operator(&request).await?;
        let config = self.broker.config();
        let topics = config
            .topics
            .iter()
            .map(|t| TopicInfo {
                name: t.name.clone(),
                message_types: t.message_types.clone(),
                publishers: t.publishers.clone(),
                subscribers: t.subscribers.clone(),
                max_marking: match t.max_marking {
                    Marking::Official => crate::proto::Marking::Official as i32,
                    Marking::OfficialSensitive => crate::proto::Marking::OfficialSensitive as i32,
                },
                last_sequence: self
                    .broker
                    .store()
                    .topic(&t.name)
                    .map(|s| s.committed())
                    .unwrap_or(0),
                subscriptions: config
                    .subscriptions
                    .iter()
                    .filter(|s| s.topic == t.name)
                    .map(|s| s.name.clone())
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListTopicsResponse { topics }))
    }

    async fn get_stats(
        &self,
        request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        self.operator(&request).await?;
        let store = self.broker.store();
        let subscriptions = self
            .broker
            .config()
            .subscriptions
            .iter()
            .map(|s| {
                let state = store.subscription(&s.name);
                SubscriptionStats {
                    name: s.name.clone(),
                    topic: s.topic.clone(),
                    owner: s.owner.clone(),
                    depth: state.as_ref().map(|st| st.depth()).unwrap_or(0),
                    dead_letters: state.as_ref().map(|st| st.dead_letters()).unwrap_or(0),
                    in_flight: state.as_ref().map(|st| st.in_flight()).unwrap_or(0),
                    oldest_unacked_age_ms: state
                        .as_ref()
                        .map(|st| st.oldest_pending_age().as_millis() as u64)
                        .unwrap_or(0),
                }
            })
            .collect();
        let refusals = self
            .broker
            .refusals()
            .into_iter()
            .map(|(reason, count)| RefusalCount {
                reason: reason.to_string(),
                count,
            })
            .collect();
        let (flushes, publishes, max_publishes_per_flush, _) = store.flush_stats().snapshot();
        Ok(Response::new(GetStatsResponse {
            subscriptions,
            refusals,
            flushes,
            publishes,
            max_publishes_per_flush,
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let operator = self.operator(&request).await?;
        let request = request.into_inner();
        let name = request.subscription.clone();
        let result = admin::list_dead_letters(&self.broker, &operator, request).await;
        self.answer(&operator, &name, result).await
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<RedriveDeadLettersRequest>,
    ) -> Result<Response<RedriveDeadLettersResponse>, Status> {
        let operator = self.operator(&request).await?;
        let request = request.into_inner();
        let name = request.subscription.clone();
        let result = admin::redrive_dead_letters(&self.broker, &operator, request).await;
        self.answer(&operator, &name, result).await
    }

    async fn purge_subscription(
        &self,
        request: Request<PurgeSubscriptionRequest>,
    ) -> Result<Response<PurgeSubscriptionResponse>, Status> {
        let operator = self.operator(&request).await?;
        let request = request.into_inner();
        let name = request.subscription.clone();
        let result = admin::purge_subscription(&self.broker, &operator, request).await;
        self.answer(&operator, &name, result).await
    }

    async fn peek_messages(
        &self,
        request: Request<PeekMessagesRequest>,
    ) -> Result<Response<PeekMessagesResponse>, Status> {
        let operator = self.operator(&request).await?;
        let request = request.into_inner();
        let name = request.subscription.clone();
        let result = admin::peek_messages(&self.broker, &operator, request).await;
        self.answer(&operator, &name, result).await
    }
}
