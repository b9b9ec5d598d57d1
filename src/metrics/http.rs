//! The operations HTTP listener (`[metrics] listen`, loopback by default):
//! `/metrics` (Prometheus text), `/healthz` (the process is alive),
//! `/readyz` (storage open, listener bound, not shutting down), `/` (a
//! self-contained status page that refreshes itself) and `/api/status` (the
//! JSON the page reads).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use super::SharedReadiness;
use crate::broker::Broker;

const STATUS_PAGE: &str = include_str!("status_page.html");

#[derive(Clone)]
struct Ops {
    broker: Broker,
    prometheus: Option<PrometheusHandle>,
    readiness: SharedReadiness,
}

/// Serves the operations endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    broker: Broker,
    prometheus: Option<PrometheusHandle>,
    readiness: SharedReadiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/status", get(status))
        .with_state(Ops {
            broker,
            prometheus,
            readiness,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The page, with the current status embedded so it renders at once.
async fn page(State(ops): State<Ops>) -> Html<String> {
    let status = serde_json::to_string(&status_view(&ops)).unwrap_or_else(|_| "null".into());
    // Inside <script>: keep "</" out of the JSON.
    Html(STATUS_PAGE.replace("__INITIAL_STATUS__", &status.replace("</", "<\\/")))
}

async fn metrics(State(ops): State<Ops>) -> Response {
    match &ops.prometheus {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are not recorded by this process\n",
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ops): State<Ops>) -> Response {
    if ops.readiness.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if ops
        .readiness
        .stopping
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
            .into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n").into_response()
    }
}

#[derive(Serialize)]
struct StatusView {
    time_ms: u64,
    ready: bool,
    topics: Vec<TopicView>,
    subscriptions: Vec<SubscriptionView>,
}

#[derive(Serialize)]
struct TopicView {
    name: String,
    last_sequence: u64,
}

#[derive(Serialize)]
struct SubscriptionView {
    name: String,
    topic: String,
    owner: String,
    depth: u64,
    in_flight: u64,
    oldest_unacked_seconds: f64,
    dead_letters: u64,
}

async fn status(State(ops): State<Ops>) -> Json<StatusView> {
    Json(status_view(&ops))
}

fn status_view(ops: &Ops) -> StatusView {
    let store = ops.broker.store();
    let config = ops.broker.config();
    let topics = config
        .topics
        .iter()
        .map(|t| TopicView {
            name: t.name.clone(),
            last_sequence: store.topic(&t.name).map(|s| s.committed()).unwrap_or(0),
        })
        .collect();
    let subscriptions = config
        .subscriptions
        .iter()
        .filter_map(|s| {
            let state = store.subscription(&s.name)?;
            Some(SubscriptionView {
                name: s.name.clone(),
                topic: s.topic.clone(),
                owner: s.owner.clone(),
                depth: state.depth(),
                in_flight: state.in_flight(),
                oldest_unacked_seconds: state.oldest_pending_age().as_secs_f64(),
                dead_letters: state.dead_letters(),
            })
        })
        .collect();
    StatusView {
        time_ms: crate::storage::now_ms(),
        ready: ops.readiness.is_ready(),
        topics,
        subscriptions,
    }
}
