//! joinery: a small, durable, secure message broker for UK public-service
//! agencies (councils, police, fire and ambulance services, NHS bodies).
//!
//! # How a message flows
//! 1. [`tls`] accepts a TCP connection, completes the mutual-TLS handshake in
//!    its own task (CRLs checked, reloadable), and resolves the caller's
//!    agency from the client certificate once per connection
//!    ([`tls::PeerInfo`]). The only exception, `[tls] insecure_plaintext_agency`,
//!    serves plaintext on a loopback listener, every connection acting as that
//!    agency, to measure what TLS costs.
//! 2. [`service`] (tonic) decodes a request with [`codec`], reads the caller
//!    with [`auth`], and calls [`broker`]; refusals are counted and audited.
//! 3. [`broker`] checks the request against [`config`] (topic, publishers,
//!    marking, message type, recipients, size, limits), validates the payload
//!    against its type and rules in [`schema`], completes the envelope
//!    (sender, message id, creation time) and hands it to [`storage`].
//! 4. [`storage`]'s writer thread groups concurrent publishes into one atomic
//!    sled batch — with their [`audit`] records and any delivery reports —
//!    flushes and fsyncs it, then answers every publish in the group and
//!    wakes the subscriptions that received messages.
//! 5. [`queue`] runs one dispatcher per subscription: it reads durable
//!    pending messages in order and delivers them to consumers within their
//!    flow-control limits, tracking ack deadlines, redelivery, nack delays,
//!    dead letters and expiry.
//!
//! [`admin`] holds the operators' actions (dead letters, redrive, purge,
//! peek); [`metrics`] the Prometheus names and the operations HTTP listener.
//! [`run`] wires it together on a bound listener with a shutdown future, so
//! an application or a test can embed a whole broker in a few lines.
//! [`pki`] makes development and test certificates; [`shutdown`] carries the
//! stop signal to every task.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod broker;
pub mod client;
pub mod codec;
pub mod config;
pub mod metrics;
pub mod pki;
pub mod queue;
pub mod schema;
pub mod service;
pub mod shutdown;
pub mod storage;
pub mod tls;

/// Generated protobuf messages and gRPC services of `proto/joinery/v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("joinery.v1");
    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("joinery_descriptor");
}

/// A map keyed by configured names (topics, message types), filled once
/// from the configuration or the schemas and looked up on every publish: a
/// client's name only looks it up, never inserts, so no client can choose
/// colliding keys, and foldhash is used rather than SipHash.
pub(crate) type NameMap<V> = std::collections::HashMap<String, V, foldhash::fast::RandomState>;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::Config;
use crate::proto::broker_server::BrokerServer;

/// Why the broker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("could not start the broker")]
    Start(#[from] broker::StartError),
    #[error("could not set up TLS (or the plaintext measurement mode)")]
    Tls(#[from] tls::TlsError),
    #[error("could not build the reflection service: {0}")]
    Reflection(String),
    #[error("the gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    #[error("storage failed while shutting down")]
    Storage(#[from] storage::StorageError),
}

/// Limit on one HTTP/2 header list (bytes).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// The operations HTTP listener and, when this process records metrics, the
/// Prometheus handle that renders them.
pub struct OpsListener {
    pub listener: TcpListener,
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// Runs a broker on `listener` (without the operations listener) until
/// `shutdown` resolves; see [`run_with`].
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with(config, listener, None, shutdown).await
}

/// Runs a broker on `listener` until `shutdown` resolves, then drains:
/// stops accepting, closes subscription streams (unacked deliveries are
/// redelivered later), lets in-flight publishes finish within
/// `broker.shutdown_grace`, and flushes storage.
pub async fn run_with(
    config: Arc<Config>,
    listener: TcpListener,
    ops: Option<OpsListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let stop = shutdown::Shutdown::new();
    let readiness: metrics::SharedReadiness = Arc::default();
    // Mutual TLS; or, with `[tls] insecure_plaintext_agency`, plaintext for
    // measuring what TLS costs, refused here too unless the listener is
    // loopback.
    let acceptor = tls::Acceptor::from_config(&config, listener)?;
    let (broker, tasks) = broker::Broker::start(config.clone(), stop.subscribe()).await?;

    // Reloads on SIGHUP and file changes, each one audited.
    let _tls_reloader = acceptor.tls_state().map(|tls_state| {
        let audit_store = broker.store().clone();
        let on_tls_reload: tls::OnReload = Arc::new(move |outcome: Result<(), String>| {
            let mut event = audit::AuditEvent::new(audit::EventKind::ConfigReload, "broker");
            event.reason = match outcome {
                Ok(()) => "tls reloaded".to_string(),
                Err(e) => format!("tls reload failed, previous configuration kept: {e}"),
            };
            audit_store.audit_now(event);
        });
        tls::spawn_reloader(
            tls_state.clone(),
            config.tls.reload_interval,
            on_tls_reload,
            stop.subscribe(),
        )
    });
    let b = &config.broker;
    let incoming = acceptor.incoming(
        tls::AcceptorSettings {
            max_connections: b.max_connections,
            handshake_timeout: b.handshake_timeout,
            max_connection_age: config.tls.max_connection_age,
        },
        stop.subscribe(),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<BrokerServer<service::BrokerService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| RunError::Reflection(e.to_string()))?;
    // Room for the envelope plus the request's own fields.
    let decode_limit = b.max_message_bytes.saturating_add(64 * 1024);
    let broker_service = BrokerServer::new(service::BrokerService::new(broker.clone()))
        .max_decoding_message_size(decode_limit)
        .max_encoding_message_size(decode_limit);

    let server = tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            service::status::oversized_to_resource_exhausted,
        ))
        .max_concurrent_streams(Some(b.max_streams_per_connection))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST))
        // Bound abusive stream resets (the HTTP/2 rapid-reset attacks).
        .http2_max_pending_accept_reset_streams(Some(64))
        .http2_max_local_error_reset_streams(Some(1024))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(broker_service)
        .add_service(proto::admin_server::AdminServer::new(
            service::AdminService::new(broker.clone()),
        ))
        .add_service(
            proto::schemas_server::SchemasServer::new(service::SchemasService::new(broker.clone()))
                .max_decoding_message_size(8 << 20),
        )
        .serve_with_incoming_shutdown(incoming, shutdown::wait(stop.subscribe()));
    let mut server = tokio::spawn(server);
    let prometheus = ops.as_ref().and_then(|ops| ops.prometheus.clone());
    let sampler = tokio::spawn(metrics::sample(
        broker.clone(),
        prometheus,
        stop.subscribe(),
    ));
    // The operations listener outlives the drain, so /readyz can say so.
    let (ops_stop, ops_stopped) = tokio::sync::oneshot::channel::<()>();
    let ops_server = ops.map(|ops| {
        let addr = ops.listener.local_addr().ok();
        info!(listen = ?addr, "operations endpoints: /metrics /healthz /readyz /");
        tokio::spawn(metrics::http::serve(
            ops.listener,
            broker.clone(),
            ops.prometheus,
            readiness.clone(),
            async move {
                let _ = ops_stopped.await;
            },
        ))
    });
    readiness
        .started
        .store(true, std::sync::atomic::Ordering::Relaxed);
    info!(listen = %b.listen, "joinery is serving");

    tokio::select! {
        _ = shutdown => {}
        result = &mut server => {
            // The server stopped on its own: report why, then clean up.
            warn!(?result, "the gRPC server stopped unexpectedly");
        }
    }
    info!("shutting down: no new connections; draining");
    readiness
        .stopping
        .store(true, std::sync::atomic::Ordering::Relaxed);
    health
        .set_not_serving::<BrokerServer<service::BrokerService>>()
        .await;
    stop.trigger();
    if !server.is_finished() {
        match tokio::time::timeout(b.shutdown_grace, &mut server).await {
            Ok(Ok(Err(e))) => warn!(cause = %e, "the gRPC server ended with an error"),
            Ok(_) => {}
            Err(_) => {
                warn!(grace = ?b.shutdown_grace, "connections still open after the grace period; closing them");
                server.abort();
            }
        }
    }
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let store = broker.store().clone();
    let (flushes, publishes, max_batch, mean_us) = store.flush_stats().snapshot();
    store.close().await?;
    info!(
        flushes,
        publishes,
        max_publishes_per_flush = max_batch,
        mean_flush_us = mean_us,
        "storage flushed and closed; group commit figures since start"
    );
    sampler.abort();
    let _ = ops_stop.send(());
    if let Some(ops_server) = ops_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), ops_server).await;
    }
    Ok(())
}
