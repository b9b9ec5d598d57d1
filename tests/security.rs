//! Security model of design §5 and the error contract of §3 over real mTLS,
//! real sockets and real sled: who may connect, who may publish and consume,
//! what a malformed request is told, and that the broker keeps serving
//! everyone else after refusing one.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use joinery::pki::{CertificateAuthority, IssuedCert};
use joinery::proto::broker_client::BrokerClient;
use joinery::proto::subscribe_request::{self, Request as SubRequest};
use joinery::proto::{PublishRequest, PublishResponse, SubscribeRequest};
use joinery::service::status::REASON_KEY;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// Longest any single call in this file may take before it counts as a hang.
const CALL: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Asserts `status` is a joinery refusal: the exact `code`, the stable
/// `reason` both in `joinery-reason` metadata and as the message's first
/// word, and a message that names every string in `mentions`.
#[track_caller]
fn assert_refused(status: &Status, code: Code, reason: &str, mentions: &[&str]) {
    assert_eq!(
        status.code(),
        code,
        "expected {code:?} ({reason}), got {status:?}"
    );
    let meta = status
        .metadata()
        .get(REASON_KEY)
        .and_then(|v| v.to_str().ok());
    assert_eq!(meta, Some(reason), "{REASON_KEY} metadata of {status:?}");
    let message = status.message();
    assert!(
        message.starts_with(&format!("{reason}: ")),
        "message should start with the reason {reason:?}: {message:?}"
    );
    for m in mentions {
        assert!(
            message.contains(m),
            "message should mention {m:?}: {message:?}"
        );
    }
}

/// A channel to `addr` presenting `identity` (or none) and trusting `ca_pem`.
async fn connect(
    addr: SocketAddr,
    identity: Option<&IssuedCert>,
    ca_pem: &str,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await
}

/// A brand-new, properly certified police client publishes successfully:
/// the broker kept serving after whatever the test did to it.
async fn assert_still_serving(broker: &TestBroker) -> PublishResponse {
    let police = broker.pki.agency("police");
    let channel = tokio::time::timeout(
        CALL,
        connect(broker.addr, Some(&police), &broker.pki.ca_pem),
    )
    .await
    .expect("connecting a good client hung")
    .expect("a good client could not connect after the bad request");
    let mut client = BrokerClient::new(channel);
    let published = tokio::time::timeout(CALL, publish(&mut client, envelope("still serving")))
        .await
        .expect("a good publish hung after the bad request")
        .expect("a good client could not publish after the bad request");
    assert!(published.sequence >= 1, "{published:?}");
    published
}

/// A broker whose `broker.max_message_bytes` is 2048, set through the
/// `JOINERY_BROKER_MAX_MESSAGE_BYTES` override.
async fn limited_broker() -> TestBroker {
    let broker =
        TestBroker::start_with_env(BODY, &[("JOINERY_BROKER_MAX_MESSAGE_BYTES", "2048")]).await;
    assert_eq!(broker.config.broker.max_message_bytes, 2048);
    broker
}

async fn publish_to(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    envelope: Option<joinery::proto::Envelope>,
) -> Result<PublishResponse, Status> {
    tokio::time::timeout(
        CALL,
        client.publish(PublishRequest {
            topic: topic.into(),
            envelope,
        }),
    )
    .await
    .expect("publish hung")
    .map(|r| r.into_inner())
}

async fn open_err(client: &mut BrokerClient<Channel>, subscription: &str) -> Status {
    match tokio::time::timeout(CALL, TestConsumer::open(client, subscription, 10))
        .await
        .expect("subscribe hung")
    {
        Ok(_) => panic!("opening {subscription:?} should have been refused"),
        Err(status) => status,
    }
}

/// Completes the client side of a TLS handshake presenting `identity`, sends
/// nothing, and returns how the broker ended the connection (the error a read
/// gets, or a description of what arrived instead).
async fn raw_tls_refusal(addr: SocketAddr, ca_pem: &str, identity: &IssuedCert) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(joinery::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let outcome = tokio::time::timeout(CALL, async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await
    })
    .await
    .expect("the broker neither served nor refused a foreign certificate");
    match outcome {
        Err(e) => e.to_string(),
        Ok(0) => "the broker closed the connection without an alert".into(),
        Ok(n) => format!("the broker sent {n} bytes of application data"),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Sends raw bytes as the request message; decodes the answer as `U`.
#[derive(Clone, Copy, Default)]
struct RawCodec<U>(std::marker::PhantomData<U>);

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl<U: prost::Message + Default + Send + 'static> Codec for RawCodec<U> {
    type Encode = Vec<u8>;
    type Decode = U;
    type Encoder = RawEncoder;
    type Decoder = ProstOnly<U>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ProstOnly<U> {
        ProstOnly(std::marker::PhantomData)
    }
}

struct ProstOnly<U>(std::marker::PhantomData<U>);

impl<U: prost::Message + Default> Decoder for ProstOnly<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("client could not decode the answer: {e}")))
    }
}

// ---------------------------------------------------------------------------
// Who may connect (UNAUTHENTICATED)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused_even_for_a_configured_agency() {
    let broker = TestBroker::start(BODY).await;
    // A real agency id, signed by a CA the broker does not trust.
    let rogue_ca = CertificateAuthority::generate("rogue CA").unwrap();
    let rogue_police = rogue_ca.issue_agency("police").unwrap();

    let outcome: Result<PublishResponse, String> = tokio::time::timeout(CALL, async {
        // TLS 1.3 clients finish their side of the handshake before the
        // server has judged their certificate, so the refusal may surface at
        // connect or at the first call.
        let channel = connect(broker.addr, Some(&rogue_police), &broker.pki.ca_pem)
            .await
            .map_err(|e| format!("connect failed: {e:?}"))?;
        let mut client = BrokerClient::new(channel);
        publish(&mut client, envelope("from a rogue CA"))
            .await
            .map_err(|s| format!("call failed: {s:?}"))
    })
    .await
    .expect("a client with a foreign certificate hung instead of being refused");
    println!("foreign-CA gRPC client outcome: {outcome:?}");
    outcome.expect_err("a certificate from an untrusted CA must not be able to publish");

    // Which transport error tonic reports depends on a race (the alert, a
    // broken pipe or a closed connection), so read the refusal itself on a
    // bare TLS connection that sends nothing after its handshake.
    let refusal = raw_tls_refusal(broker.addr, &broker.pki.ca_pem, &rogue_police).await;
    println!("foreign-CA TLS refusal: {refusal}");
    assert!(
        refusal.contains("UnknownCA"),
        "the broker should refuse the chain with an unknown_ca alert: {refusal}"
    );

    let good = assert_still_serving(&broker).await;
    assert_eq!(
        good.sequence, 1,
        "the foreign-CA publish must not have been stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_unauthenticated_on_every_rpc() {
    let broker = TestBroker::start(BODY).await;
    let channel = broker
        .channel(None, &broker.pki.ca_pem)
        .await
        .expect("a client without a certificate completes the handshake");
    let mut anonymous = BrokerClient::new(channel);
    let mentions = ["no client certificate"];

    let status = publish_to(&mut anonymous, TOPIC, Some(envelope("anon")))
        .await
        .unwrap_err();
    assert_refused(&status, Code::Unauthenticated, "unauthenticated", &mentions);

    let status = open_err(&mut anonymous, "council.inbox").await;
    assert_refused(&status, Code::Unauthenticated, "unauthenticated", &mentions);

    let requests = tokio_stream::iter(vec![PublishRequest {
        topic: TOPIC.into(),
        envelope: Some(envelope("anon stream")),
    }]);
    let status = tokio::time::timeout(CALL, anonymous.publish_stream(requests))
        .await
        .expect("publish_stream hung")
        .expect_err("an anonymous PublishStream must be refused");
    assert_refused(&status, Code::Unauthenticated, "unauthenticated", &mentions);

    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 1, "no anonymous publish was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_without_agency_san_is_unauthenticated() {
    let broker = TestBroker::start(BODY).await;
    // Chains to the broker's CA and is a valid client certificate, but its
    // only names are a DNS SAN and a CN that happens to be an agency id.
    let mut params = CertificateParams::new(vec!["client.example.org".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "police");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let nameless = broker.pki.ca.issue_with(params).unwrap();

    let channel = connect(broker.addr, Some(&nameless), &broker.pki.ca_pem)
        .await
        .expect("a correctly chained certificate completes the handshake");
    let mut client = BrokerClient::new(channel);
    let status = publish_to(&mut client, TOPIC, Some(envelope("who am I")))
        .await
        .unwrap_err();
    assert_refused(
        &status,
        Code::Unauthenticated,
        "unauthenticated",
        &["no URI SAN", "urn:joinery:agency:"],
    );
    let status = open_err(&mut client, "council.inbox").await;
    assert_refused(
        &status,
        Code::Unauthenticated,
        "unauthenticated",
        &["no URI SAN"],
    );

    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 1, "the CN was not taken as an identity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_for_unconfigured_agency_is_unauthenticated_and_names_it() {
    let broker = TestBroker::start(BODY).await;
    let mut stranger = broker.client("unknown-agency").await;

    let status = publish_to(&mut stranger, TOPIC, Some(envelope("hello")))
        .await
        .unwrap_err();
    assert_refused(
        &status,
        Code::Unauthenticated,
        "unauthenticated",
        &["\"unknown-agency\"", "not configured"],
    );
    let status = open_err(&mut stranger, "council.inbox").await;
    assert_refused(
        &status,
        Code::Unauthenticated,
        "unauthenticated",
        &["\"unknown-agency\""],
    );

    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 1);
}

// ---------------------------------------------------------------------------
// What a known agency may do (PERMISSION_DENIED / NOT_FOUND)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_another_agencys_subscription_is_permission_denied() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    publish(&mut police, envelope("for the council only"))
        .await
        .unwrap();

    let status = open_err(&mut police, "council.inbox").await;
    assert_refused(
        &status,
        Code::PermissionDenied,
        "not_subscription_owner",
        &["\"council.inbox\"", "\"police\""],
    );

    // The owner still gets the message; nothing was taken by the refused open.
    let mut council = broker.client("council").await;
    let mut consumer = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let d = consumer.next(CALL).await.expect("the owner's delivery");
    assert_eq!(d.attempt, 1, "the refused open must not have consumed it");
    assert_eq!(payload_of(&d), "for the council only");

    assert_still_serving(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_an_unknown_subscription_is_not_found() {
    let broker = TestBroker::start(BODY).await;
    let mut council = broker.client("council").await;
    let status = open_err(&mut council, "council.nope").await;
    assert_refused(
        &status,
        Code::NotFound,
        "subscription_not_found",
        &["\"council.nope\""],
    );
    assert_still_serving(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_to_an_unknown_topic_is_not_found() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let status = publish_to(&mut police, "referral.nope", Some(envelope("x")))
        .await
        .unwrap_err();
    assert_refused(
        &status,
        Code::NotFound,
        "topic_not_found",
        &["\"referral.nope\""],
    );
    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agency_not_among_a_topics_publishers_is_permission_denied() {
    let broker = TestBroker::start(BODY).await;
    let mut council = broker.client("council").await;
    let status = publish_to(&mut council, TOPIC, Some(envelope("not mine to send")))
        .await
        .unwrap_err();
    assert_refused(
        &status,
        Code::PermissionDenied,
        "not_a_publisher",
        &["\"council\"", &format!("{TOPIC:?}")],
    );
    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 1, "the refused publish was not stored");
}

// ---------------------------------------------------------------------------
// Malformed publishes (INVALID_ARGUMENT / RESOURCE_EXHAUSTED)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_malformed_envelope_is_refused_with_its_own_reason() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;

    let past = prost_types::Timestamp {
        seconds: unix_now() - 60,
        nanos: 0,
    };
    let with = |f: &dyn Fn(&mut joinery::proto::Envelope)| {
        let mut e = envelope("bad");
        f(&mut e);
        Some(e)
    };
    type Case<'a> = (
        &'a str,
        Option<joinery::proto::Envelope>,
        Code,
        &'a str,
        Vec<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (
            "no envelope",
            None,
            Code::InvalidArgument,
            "missing_envelope",
            vec!["no envelope"],
        ),
        (
            "empty message_type",
            with(&|e| e.message_type.clear()),
            Code::InvalidArgument,
            "invalid_envelope",
            vec!["message_type is required"],
        ),
        (
            "type the topic does not accept",
            with(&|e| e.message_type = "test.v1.Other".into()),
            Code::InvalidArgument,
            "type_not_accepted",
            vec!["\"test.v1.Other\"", TYPE, TOPIC],
        ),
        (
            "message_id with a space",
            with(&|e| e.message_id = "case 17".into()),
            Code::InvalidArgument,
            "invalid_envelope",
            vec!["message_id", "without spaces"],
        ),
        (
            "message_id of 129 characters",
            with(&|e| e.message_id = "a".repeat(129)),
            Code::InvalidArgument,
            "invalid_envelope",
            vec!["message_id", "128"],
        ),
        (
            "sender set to another agency",
            with(&|e| e.sender = "nhs".into()),
            Code::InvalidArgument,
            "sender_mismatch",
            vec!["\"nhs\"", "\"police\""],
        ),
        (
            "unknown recipient",
            with(&|e| e.recipients = vec!["council".into(), "nobody".into()]),
            Code::InvalidArgument,
            "unknown_recipient",
            vec!["\"nobody\""],
        ),
        (
            "recipient listed twice",
            with(&|e| e.recipients = vec!["council".into(), "council".into()]),
            Code::InvalidArgument,
            "invalid_envelope",
            vec!["\"council\"", "twice"],
        ),
        (
            "recipient with no subscription on the topic",
            with(&|e| e.recipients = vec!["nhs".into()]),
            Code::FailedPrecondition,
            "recipient_not_subscribed",
            vec!["\"nhs\"", TOPIC],
        ),
        (
            "expires_at in the past",
            with(&|e| e.expires_at = Some(past)),
            Code::InvalidArgument,
            "invalid_envelope",
            vec!["expires_at is in the past"],
        ),
        (
            "expires_at with out-of-range nanos",
            with(&|e| {
                e.expires_at = Some(prost_types::Timestamp {
                    seconds: unix_now() + 3600,
                    nanos: -1,
                })
            }),
            Code::InvalidArgument,
            "invalid_envelope",
            vec!["expires_at is not a valid timestamp"],
        ),
    ];
    for (what, env, code, reason, mentions) in cases {
        let status = publish_to(&mut police, TOPIC, env).await.expect_err(what);
        println!("{what}: {status:?}");
        assert_refused(&status, code, reason, &mentions);
    }

    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 1, "no refused envelope took a sequence");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_set_to_the_callers_own_agency_and_a_128_character_id_are_accepted() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let mut e = envelope("signed by myself");
    e.sender = "police".into();
    e.message_id = "b".repeat(128);
    let published = publish(&mut police, e).await.expect("own sender accepted");
    assert_eq!(published.sequence, 1);
    assert_eq!(published.message_id, "b".repeat(128));

    let mut council = broker.client("council").await;
    let mut consumer = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let d = consumer.next(CALL).await.expect("delivery");
    assert_eq!(d.envelope.as_ref().unwrap().sender, "police");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_over_max_message_bytes_is_resource_exhausted() {
    let broker = limited_broker().await;
    let mut police = broker.client("police").await;

    // Just under the limit: accepted, so the limit really is 2048.
    let mut fits = envelope("");
    fits.payload = vec![b'x'; 1900].into();
    let published = publish(&mut police, fits).await.expect("1900 bytes fit");
    assert_eq!(published.sequence, 1);

    let mut big = envelope("");
    big.payload = vec![b'x'; 3000].into();
    let status = publish_to(&mut police, TOPIC, Some(big)).await.unwrap_err();
    println!("over the envelope limit: {status:?}");
    assert_refused(
        &status,
        Code::ResourceExhausted,
        "message_too_large",
        &["2048", "broker.max_message_bytes"],
    );

    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 2, "the oversized envelope was not stored");
}

/// Design §3/§5: exceeding the size limit is RESOURCE_EXHAUSTED with a
/// stable reason, however far over it a request is — including requests
/// beyond the gRPC decode limit (`max_message_bytes` + 64 KiB), which tonic
/// refuses before the broker sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_far_over_max_message_bytes_is_resource_exhausted_too() {
    let broker = limited_broker().await;
    let mut police = broker.client("police").await;
    let mut huge = envelope("");
    huge.payload = vec![b'x'; 200 * 1024].into();
    let status = publish_to(&mut police, TOPIC, Some(huge))
        .await
        .unwrap_err();
    println!("over the decode limit: {status:?}");

    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 1, "the oversized request was not stored");
    assert_refused(
        &status,
        Code::ResourceExhausted,
        "message_too_large",
        &["max_message_bytes"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bytes_that_are_not_protobuf_are_invalid_argument_not_internal() {
    let broker = TestBroker::start(BODY).await;
    let police = broker.pki.agency("police");
    let channel = connect(broker.addr, Some(&police), &broker.pki.ca_pem)
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let answer = tokio::time::timeout(
        CALL,
        grpc.unary(
            tonic::Request::new(vec![0xff, 0xff, 0xff]),
            PathAndQuery::from_static("/joinery.v1.Broker/Publish"),
            RawCodec::<PublishResponse>::default(),
        ),
    )
    .await
    .expect("a garbage request hung");
    let status = answer.expect_err("garbage must not be published");
    println!("non-protobuf request: {status:?}");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("malformed_request: ")
            && status
                .metadata()
                .get("joinery-reason")
                .is_some_and(|r| r == "malformed_request")
            && status.message().contains("not a valid protobuf message"),
        "{:?}",
        status.message()
    );

    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 1);
}

// ---------------------------------------------------------------------------
// Stream protocol
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_stream_that_does_not_start_with_open_is_invalid_argument() {
    let broker = TestBroker::start(BODY).await;
    let mut council = broker.client("council").await;

    let ack_first = tokio_stream::iter(vec![SubscribeRequest {
        request: Some(SubRequest::Ack(subscribe_request::Ack {
            delivery_ids: vec![1],
        })),
    }]);
    let status = tokio::time::timeout(CALL, council.subscribe(ack_first))
        .await
        .expect("subscribe hung")
        .expect_err("an ack before open must be refused");
    assert_refused(
        &status,
        Code::InvalidArgument,
        "not_opened",
        &["must be `open`"],
    );

    // A stream the client ends without sending anything is refused the same way.
    let empty = tokio_stream::iter(Vec::<SubscribeRequest>::new());
    let status = tokio::time::timeout(CALL, council.subscribe(empty))
        .await
        .expect("subscribe hung")
        .expect_err("an empty Subscribe stream must be refused");
    assert_refused(&status, Code::InvalidArgument, "not_opened", &["open"]);

    assert_still_serving(&broker).await;
    // The subscription itself is unharmed.
    let mut consumer = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    assert_eq!(consumer.next(CALL).await.expect("delivery").sequence, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_stream_answers_500_pipelined_requests_in_order() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let requests: Vec<PublishRequest> = (0..500)
        .map(|i| {
            let mut e = envelope(&format!("p{i}"));
            e.message_id = format!("pipelined-{i}");
            PublishRequest {
                topic: TOPIC.into(),
                envelope: Some(e),
            }
        })
        .collect();
    let mut responses = police
        .publish_stream(tokio_stream::iter(requests))
        .await
        .expect("publish_stream")
        .into_inner();
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(CALL, responses.message()).await {
            Ok(Ok(Some(r))) => got.push(r),
            Ok(Ok(None)) => break,
            Ok(Err(status)) => panic!("after {} responses: {status:?}", got.len()),
            Err(_) => panic!("response stream stalled after {} responses", got.len()),
        }
    }
    assert_eq!(got.len(), 500, "one response per request");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.sequence, i as u64 + 1, "response {i}");
        assert_eq!(r.message_id, format!("pipelined-{i}"), "response {i}");
        assert!(!r.duplicate, "response {i}");
    }
    let good = assert_still_serving(&broker).await;
    assert_eq!(good.sequence, 501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_stream_ends_with_the_first_invalid_requests_status() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let requests: Vec<PublishRequest> = (0..5)
        .map(|i| {
            let mut e = envelope(&format!("s{i}"));
            if i == 2 {
                e.message_type = "test.v1.Other".into();
            }
            PublishRequest {
                topic: TOPIC.into(),
                envelope: Some(e),
            }
        })
        .collect();
    let mut responses = police
        .publish_stream(tokio_stream::iter(requests))
        .await
        .expect("publish_stream")
        .into_inner();
    async fn next<T>(s: &mut tonic::Streaming<T>) -> Result<Option<T>, Status> {
        tokio::time::timeout(CALL, s.message())
            .await
            .expect("response stream stalled")
    }
    assert_eq!(next(&mut responses).await.unwrap().unwrap().sequence, 1);
    assert_eq!(next(&mut responses).await.unwrap().unwrap().sequence, 2);
    let status = next(&mut responses)
        .await
        .expect_err("request #3 is invalid and must end the stream with its status");
    assert_refused(
        &status,
        Code::InvalidArgument,
        "type_not_accepted",
        &["\"test.v1.Other\""],
    );
    let after = next(&mut responses).await;
    assert!(
        matches!(after, Ok(None)),
        "nothing may follow the error: {after:?}"
    );

    let good = assert_still_serving(&broker).await;
    assert_eq!(
        good.sequence, 3,
        "requests after the invalid one were not published"
    );
}

// ---------------------------------------------------------------------------
// Standard gRPC services
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_reports_serving_over_mtls() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let broker = TestBroker::start(BODY).await;
    let police = broker.pki.agency("police");
    let channel = connect(broker.addr, Some(&police), &broker.pki.ca_pem)
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "joinery.v1.Broker"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("health check of {service:?}: {s:?}"))
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    let status = health
        .check(HealthCheckRequest {
            service: "joinery.v1.Nope".into(),
        })
        .await
        .expect_err("an unknown service has no health");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    assert_still_serving(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_broker_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let broker = TestBroker::start(BODY).await;
    let police = broker.pki.agency("police");
    let channel = connect(broker.addr, Some(&police), &broker.pki.ca_pem)
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = tokio::time::timeout(CALL, answers.message())
        .await
        .expect("reflection hung")
        .expect("reflection answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("expected a service list, got {answer:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"joinery.v1.Broker"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    assert_still_serving(&broker).await;
}
