//! Shared helpers for the integration tests: a whole broker on 127.0.0.1:0
//! with a real sled directory in a temp dir and a real test PKI made by rcgen,
//! clients that present real agency certificates, and a consumer wrapper.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use joinery::config::Config;
use joinery::pki::{CertificateAuthority, IssuedCert};
use joinery::proto::broker_client::BrokerClient;
use joinery::proto::subscribe_request::{self, Request as SubRequest};
use joinery::proto::{Delivery, Envelope, PublishRequest, PublishResponse, SubscribeRequest};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Status, Streaming};

/// Agencies, topics and subscriptions most tests use. Ack deadlines are short
/// so redelivery tests are quick.
pub const BODY: &str = r#"
[[agency]]
id = "police"
[[agency]]
id = "council"
[[agency]]
id = "fire"
[[agency]]
id = "nhs"

[[topic]]
name = "referral.safeguarding"
message_types = ["test.v1.Referral"]
publishers = ["police", "nhs"]
subscribers = ["council", "fire"]

[[subscription]]
name = "council.inbox"
topic = "referral.safeguarding"
owner = "council"
ack_deadline = "1s"
max_deliveries = 3

[[subscription]]
name = "fire.inbox"
topic = "referral.safeguarding"
owner = "fire"
ack_deadline = "1s"
max_deliveries = 3
"#;

/// The test message types (`tests/proto`).
pub const TEST_SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/proto");

/// `test.v1.Referral`: free text.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TestReferral {
    #[prost(string, tag = "1")]
    pub text: String,
}

/// A `test.v1.Referral` payload carrying `text`.
pub fn payload(text: &str) -> Vec<u8> {
    prost::Message::encode_to_vec(&TestReferral { text: text.into() })
}

/// The text of a `test.v1.Referral` payload.
pub fn text_of(payload: &[u8]) -> String {
    <TestReferral as prost::Message>::decode(payload)
        .map(|r| r.text)
        .unwrap_or_else(|_| format!("<not a test.v1.Referral: {} bytes>", payload.len()))
}

pub const TOPIC: &str = "referral.safeguarding";
pub const TYPE: &str = "test.v1.Referral";

/// A CA with a server certificate and certificates for agencies, on disk.
pub struct TestPki {
    pub dir: PathBuf,
    pub ca: CertificateAuthority,
    pub ca_pem: String,
}

impl TestPki {
    pub fn create(dir: &Path) -> TestPki {
        std::fs::create_dir_all(dir).unwrap();
        let ca = CertificateAuthority::generate("joinery test CA").unwrap();
        let ca_pem = ca.cert_pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
        let server = ca
            .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
        std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("server.key"), &server.key_pem).unwrap();
        TestPki {
            dir: dir.to_path_buf(),
            ca,
            ca_pem,
        }
    }

    pub fn agency(&self, id: &str) -> IssuedCert {
        self.ca.issue_agency(id).unwrap()
    }
}

/// A broker running in this process.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub pki: Arc<TestPki>,
    pub config: Arc<Config>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), joinery::RunError>>>,
    tmp: Arc<tempfile::TempDir>,
}

pub fn config_text(root: &Path, body: &str) -> String {
    config_text_with(root, "", body)
}

/// Like [`config_text`], with extra `[broker]` lines (e.g. `operators = [..]`).
pub fn config_text_with(root: &Path, broker_extra: &str, body: &str) -> String {
    let pki = root.join("pki");
    format!(
        r#"
[broker]
listen = "127.0.0.1:0"
data_dir = "{data}"
shutdown_grace = "5s"
{broker_extra}

[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/server.pem"
key = "{pki}/server.key"

[schemas]
dirs = ["{schemas}"]

[metrics]
listen = "127.0.0.1:0"
{body}
"#,
        data = root.join("data").display(),
        pki = pki.display(),
        schemas = TEST_SCHEMAS,
    )
}

impl TestBroker {
    /// Starts a broker with `body` (agencies, topics, subscriptions) in a new temp dir.
    pub async fn start(body: &str) -> TestBroker {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let pki = Arc::new(TestPki::create(&tmp.path().join("pki")));
        Self::start_in(tmp, pki, body).await
    }

    /// Starts a broker with `JOINERY_*` overrides (e.g. limits).
    pub async fn start_with_env(body: &str, env: &[(&str, &str)]) -> TestBroker {
        Self::start_with(body, "", env).await
    }

    /// Starts a broker with extra `[broker]` lines and `JOINERY_*` overrides.
    pub async fn start_with(body: &str, broker_extra: &str, env: &[(&str, &str)]) -> TestBroker {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let pki = Arc::new(TestPki::create(&tmp.path().join("pki")));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_full(tmp, pki, broker_extra, body, env).await
    }

    /// Starts a broker on an existing temp dir and PKI (e.g. after `stop`).
    pub async fn start_in(
        tmp: Arc<tempfile::TempDir>,
        pki: Arc<TestPki>,
        body: &str,
    ) -> TestBroker {
        Self::start_full(tmp, pki, "", body, Vec::new()).await
    }

    async fn start_full(
        tmp: Arc<tempfile::TempDir>,
        pki: Arc<TestPki>,
        broker_extra: &str,
        body: &str,
        env: Vec<(String, String)>,
    ) -> TestBroker {
        let text = config_text_with(tmp.path(), broker_extra, body);
        let broker = Self::launch(tmp, pki, &text, env).await;
        let client = broker.client("police").await;
        broker.wait_until_serving(client).await;
        broker
    }

    /// Starts a broker in the loopback-only plaintext measurement mode
    /// (`JOINERY_TLS_INSECURE_PLAINTEXT_AGENCY=agency`): no TLS, every
    /// connection acts as `agency`. Use [`TestBroker::plain_client`].
    pub async fn start_plaintext(body: &str, agency: &str) -> TestBroker {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let pki = Arc::new(TestPki::create(&tmp.path().join("pki")));
        let env = vec![(
            "JOINERY_TLS_INSECURE_PLAINTEXT_AGENCY".to_string(),
            agency.to_string(),
        )];
        let text = config_text(tmp.path(), body);
        let broker = Self::launch(tmp, pki, &text, env).await;
        let client = broker.plain_client().await;
        broker.wait_until_serving(client).await;
        broker
    }

    /// Loads the configuration `text` with `env` and spawns the broker,
    /// without waiting for it to serve.
    async fn launch(
        tmp: Arc<tempfile::TempDir>,
        pki: Arc<TestPki>,
        text: &str,
        env: Vec<(String, String)>,
    ) -> TestBroker {
        joinery::tls::install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("JOINERY_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let root = tmp.path().to_path_buf();
        let config = Arc::new(
            Config::load_str(text, env).unwrap_or_else(|e| panic!("test config invalid:\n{e}")),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(joinery::run(config.clone(), listener, async move {
            let _ = stopped.await;
        }));
        TestBroker {
            addr,
            root,
            pki,
            config,
            stop: Some(stop),
            task: Some(task),
            tmp,
        }
    }

    /// Returns once `client` can complete a call.
    async fn wait_until_serving(&self, client: BrokerClient<Channel>) {
        eventually(Duration::from_secs(10), || {
            let mut client = client.clone();
            async move {
                client
                    .publish(PublishRequest {
                        topic: "no.such.topic".into(),
                        envelope: None,
                    })
                    .await
                    .err()
                    // Any answer from the broker itself means it is serving
                    // (the probe's agency may not be configured).
                    .is_some_and(|s| {
                        matches!(
                            s.code(),
                            tonic::Code::NotFound | tonic::Code::Unauthenticated
                        )
                    })
            }
        })
        .await;
    }

    /// A view over a broker this harness did not start (for its client
    /// helpers); stopping it is the caller's business.
    pub fn attach(
        addr: SocketAddr,
        tmp: Arc<tempfile::TempDir>,
        pki: Arc<TestPki>,
        config: Arc<Config>,
    ) -> TestBroker {
        TestBroker {
            addr,
            root: tmp.path().to_path_buf(),
            pki,
            config,
            stop: None,
            task: None,
            tmp,
        }
    }

    /// Stops the broker gracefully (as SIGTERM would) and returns its temp
    /// dir and PKI for a restart.
    pub async fn stop(mut self) -> (Arc<tempfile::TempDir>, Arc<TestPki>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("broker did not stop within 20s")
                .expect("broker task panicked");
            result.expect("broker stopped with an error");
        }
        (self.tmp.clone(), self.pki.clone())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// A client presenting `agency`'s certificate.
    pub async fn client(&self, agency: &str) -> BrokerClient<Channel> {
        let cert = self.pki.agency(agency);
        BrokerClient::new(
            self.channel(Some((cert.cert_pem, cert.key_pem)), &self.pki.ca_pem)
                .await
                .expect("connect"),
        )
    }

    /// A channel with any client identity (or none) and any trusted CA.
    pub async fn channel(
        &self,
        identity: Option<(String, String)>,
        ca_pem: &str,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{}", self.addr))?
            .tls_config(tls)?
            .connect()
            .await
    }

    /// A channel without TLS (`http://`), for the plaintext measurement mode.
    pub async fn plain_channel(&self) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(format!("http://{}", self.addr))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    /// A client without TLS; a plaintext broker treats it as its configured agency.
    pub async fn plain_client(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.plain_channel().await.expect("connect"))
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn envelope(text: &str) -> Envelope {
    Envelope {
        message_type: TYPE.into(),
        payload: payload(text).into(),
        ..Default::default()
    }
}

pub async fn publish(
    client: &mut BrokerClient<Channel>,
    envelope: Envelope,
) -> Result<PublishResponse, Status> {
    client
        .publish(PublishRequest {
            topic: TOPIC.into(),
            envelope: Some(envelope),
        })
        .await
        .map(|r| r.into_inner())
}

/// One consumer on one Subscribe stream.
pub struct TestConsumer {
    tx: mpsc::Sender<SubscribeRequest>,
    pub stream: Streaming<Delivery>,
}

impl TestConsumer {
    pub async fn open(
        client: &mut BrokerClient<Channel>,
        subscription: &str,
        max_in_flight: u32,
    ) -> Result<TestConsumer, Status> {
        Self::open_with(client, subscription, max_in_flight, None).await
    }

    pub async fn open_with(
        client: &mut BrokerClient<Channel>,
        subscription: &str,
        max_in_flight: u32,
        initial_credit: Option<u32>,
    ) -> Result<TestConsumer, Status> {
        let (tx, rx) = mpsc::channel(1024);
        tx.send(SubscribeRequest {
            request: Some(SubRequest::Open(subscribe_request::Open {
                subscription: subscription.into(),
                max_in_flight,
                initial_credit,
            })),
        })
        .await
        .unwrap();
        let stream = client
            .subscribe(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(TestConsumer { tx, stream })
    }

    /// The next delivery, or None if none arrives `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Delivery> {
        match tokio::time::timeout(within, self.stream.message()).await {
            Ok(Ok(Some(d))) => Some(d),
            Ok(Ok(None)) => None,
            Ok(Err(status)) => panic!("subscription stream failed: {status}"),
            Err(_) => None,
        }
    }

    /// Exactly `n` deliveries, each within `within` of the previous.
    pub async fn take(&mut self, n: usize, within: Duration) -> Vec<Delivery> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next(within).await {
                Some(d) => out.push(d),
                None => panic!("expected {n} deliveries, got {}", out.len()),
            }
        }
        out
    }

    /// Closes gracefully: ends the request side, then reads until the broker
    /// ends the stream, so every ack sent before has been processed.
    pub async fn close(self) {
        let TestConsumer { tx, mut stream } = self;
        drop(tx);
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(_)) = stream.message().await {}
        })
        .await;
        assert!(drained.is_ok(), "broker did not end the stream after close");
    }

    pub async fn ack(&self, ids: Vec<u64>) {
        self.send(SubRequest::Ack(subscribe_request::Ack {
            delivery_ids: ids,
        }))
        .await;
    }

    pub async fn nack(&self, ids: Vec<u64>, delay: Duration) {
        self.send(SubRequest::Nack(subscribe_request::Nack {
            delivery_ids: ids,
            requeue_delay: Some(prost_types::Duration {
                seconds: delay.as_secs() as i64,
                nanos: delay.subsec_nanos() as i32,
            }),
        }))
        .await;
    }

    pub async fn credit(&self, n: u32) {
        self.send(SubRequest::Credit(subscribe_request::Credit { n }))
            .await;
    }

    async fn send(&self, request: SubRequest) {
        self.tx
            .send(SubscribeRequest {
                request: Some(request),
            })
            .await
            .unwrap();
    }
}

/// Polls `check` until it is true, failing the test after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= until {
            panic!("condition not met within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn payload_of(d: &Delivery) -> String {
    text_of(&d.envelope.as_ref().unwrap().payload)
}

/// Opens the stopped broker's store directly to inspect it (dead letters etc.).
pub fn open_store(data_dir: &Path, config: &Config) -> joinery::storage::Store {
    let topics: Vec<String> = config.topics.iter().map(|t| t.name.clone()).collect();
    let subs: Vec<(String, String)> = config
        .subscriptions
        .iter()
        .map(|s| (s.name.clone(), s.topic.clone()))
        .collect();
    joinery::storage::Store::open(
        data_dir,
        joinery::storage::StoreOptions {
            cache_capacity: 8 << 20,
            dedup_window: Duration::from_secs(3600),
            max_batch: 64,
            audit_retention: config.audit.enabled.then_some(config.audit.retention),
            audit_segment_bytes: joinery::audit::segments::SEGMENT_BYTES,
            body_segment_bytes: joinery::storage::bodies::SEGMENT_BYTES,
            compact_after: joinery::storage::bodies::COMPACT_AFTER,
            reports: Vec::new(),
            deliver_before_sync: Vec::new(),
        },
        &topics,
        &subs,
    )
    .expect("open store")
}
