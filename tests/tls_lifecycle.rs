//! Certificate lifecycle over real mutual TLS (design §5, issue 3): CRLs
//! checked on every handshake and reloaded without a restart (stale ones fail
//! closed), connections of a newly revoked certificate closed, expired,
//! not-yet-valid and foreign certificates refused with the reason logged,
//! `[[identity]]` mappings by subject and SAN, the server certificate rotated
//! under a connected subscriber (file poll in-process; SIGHUP on the real
//! binary), and the maximum connection age.
//!
//! Every certificate and CRL is made here with rcgen.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use joinery::config::Config;
use joinery::pki::IssuedCert;
use joinery::proto::broker_client::BrokerClient;
use joinery::proto::{Delivery, PublishRequest};
use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// Longest any single call may take before it counts as a hang.
const CALL: Duration = Duration::from_secs(10);
/// Common name of the CA `TestPki` makes.
const TEST_CA_NAME: &str = "joinery test CA";

// ---------------------------------------------------------------------------
// Logs: every event of this test binary is kept, so tests can check that a
// refusal was logged with its reason and the peer's address.
// ---------------------------------------------------------------------------

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        joinery::tls::install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn,joinery=info"))
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init();
    });
}

/// Whether one log line contains every string in `all`.
fn logged(all: &[&str]) -> bool {
    let logs = LOGS.lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .any(|line| all.iter().all(|s| line.contains(s)))
}

#[track_caller]
fn assert_logged(all: &[&str]) {
    assert!(logged(all), "no log line contains all of {all:?}");
}

// ---------------------------------------------------------------------------
// A broker in this process with a CRL and any [tls] settings
// ---------------------------------------------------------------------------

struct Broker {
    addr: SocketAddr,
    pki: Arc<TestPki>,
    pki_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    _tmp: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// How to start a [`Broker`].
struct Setup<'a> {
    body: &'a str,
    /// Extra `[tls]` lines.
    tls: &'a str,
    /// Write `pki/ca.crl` (no revocations, next update this many seconds from
    /// now; negative is in the past) and list it in `[tls] crl`.
    crl_next_update: Option<i64>,
    /// Wait until a police client can complete a call.
    wait_ready: bool,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            body: BODY,
            tls: "",
            crl_next_update: Some(3600),
            wait_ready: true,
        }
    }
}

/// The config text of `tests/common::config_text`, with `[tls] crl` and
/// extra `[tls]` lines.
fn config_text_with(root: &Path, listen: &str, setup: &Setup<'_>) -> String {
    let pki = root.join("pki");
    let crl = match setup.crl_next_update {
        Some(_) => format!(r#"crl = ["{}/ca.crl"]"#, pki.display()),
        None => String::new(),
    };
    format!(
        r#"
[broker]
listen = "{listen}"
data_dir = "{data}"
shutdown_grace = "5s"

[tls]
ca = "{pki}/ca.pem"
cert = "{pki}/server.pem"
key = "{pki}/server.key"
{crl}
{tls}

[schemas]
dirs = ["{schemas}"]

[metrics]
listen = "127.0.0.1:0"
{body}
"#,
        data = root.join("data").display(),
        pki = pki.display(),
        schemas = TEST_SCHEMAS,
        tls = setup.tls,
        body = setup.body,
    )
}

impl Broker {
    async fn start(setup: Setup<'_>) -> Broker {
        capture_logs();
        let tmp = tempfile::tempdir().unwrap();
        let pki_dir = tmp.path().join("pki");
        let pki = Arc::new(TestPki::create(&pki_dir));
        if let Some(next_update) = setup.crl_next_update {
            write_atomic(&pki_dir.join("ca.crl"), &crl_pem(&pki, &[], next_update));
        }
        let text = config_text_with(tmp.path(), "127.0.0.1:0", &setup);
        let config = Arc::new(
            Config::load_str(&text, Vec::new())
                .unwrap_or_else(|e| panic!("test config invalid:\n{e}")),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let result = joinery::run(config, listener, async move {
                let _ = stopped.await;
            })
            .await;
            if let Err(e) = result {
                panic!("broker failed: {e:?}");
            }
        });
        let broker = Broker {
            addr,
            pki,
            pki_dir,
            stop: Some(stop),
            _tmp: tmp,
        };
        if setup.wait_ready {
            wait_ready(addr, &broker.pki).await;
        }
        broker
    }

    async fn client(&self, cert: &IssuedCert) -> BrokerClient<Channel> {
        BrokerClient::new(
            channel(self.addr, cert, &self.pki.ca_pem)
                .await
                .expect("connect"),
        )
    }

    fn write_crl(&self, revoked: &[&str], next_update: i64) {
        write_atomic(
            &self.pki_dir.join("ca.crl"),
            &crl_pem(&self.pki, revoked, next_update),
        );
    }
}

/// Ready once a police client's Publish to an unknown topic gets NOT_FOUND.
async fn wait_ready(addr: SocketAddr, pki: &TestPki) {
    let police = pki.agency("police");
    eventually(Duration::from_secs(15), || {
        let police = police.clone();
        let ca = pki.ca_pem.clone();
        async move {
            let Ok(Ok(channel)) =
                tokio::time::timeout(Duration::from_secs(2), channel(addr, &police, &ca)).await
            else {
                return false;
            };
            let mut client = BrokerClient::new(channel);
            let call = client.publish(PublishRequest {
                topic: "no.such.topic".into(),
                envelope: None,
            });
            matches!(
                tokio::time::timeout(Duration::from_secs(2), call).await,
                Ok(Err(status)) if status.code() == Code::NotFound
            )
        }
    })
    .await;
}

async fn channel(
    addr: SocketAddr,
    cert: &IssuedCert,
    ca_pem: &str,
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(CALL)
        .connect()
        .await
}

// ---------------------------------------------------------------------------
// Certificates, CRLs and raw handshakes
// ---------------------------------------------------------------------------

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

/// A PEM CRL signed by the test CA, revoking `serials` (lowercase hex).
fn crl_pem(pki: &TestPki, serials: &[&str], next_update_in: i64) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, TEST_CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = Issuer::new(params, KeyPair::from_pem(&pki.ca.key_pem()).unwrap());
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = unix_now();
    let this_update = epoch + now - Duration::from_secs(7200);
    let offset = Duration::from_secs(next_update_in.unsigned_abs());
    let next_update = if next_update_in >= 0 {
        epoch + now + offset
    } else {
        epoch + now - offset
    };
    let serial = u64::try_from(now.as_nanos() % u128::from(u64::MAX)).unwrap();
    CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from(serial),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&unhex(s)),
                revocation_time: this_update,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .unwrap()
    .pem()
    .unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Replaces `path` atomically (write a sibling, rename over).
fn write_atomic(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A client certificate from the test CA: clientAuth, valid from an hour ago
/// for a day, then whatever `customise` changes.
fn client_cert(pki: &TestPki, customise: impl FnOnce(&mut CertificateParams)) -> IssuedCert {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "client");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + unix_now() - Duration::from_secs(3600);
    params.not_after = epoch + unix_now() + Duration::from_secs(86_400);
    customise(&mut params);
    pki.ca.issue_with(params).unwrap()
}

fn agency_san(id: &str) -> SanType {
    SanType::URI(Ia5String::try_from(format!("urn:joinery:agency:{id}")).unwrap())
}

/// How the broker answered a raw TLS handshake.
#[derive(Debug)]
enum Answer {
    /// It served the connection (sent HTTP/2 data); the certificate it presented.
    Served { server_cert: Vec<u8> },
    /// It refused: the client's error (e.g. the alert received).
    Refused(String),
}

/// Completes the client side of a TLS handshake presenting `identity` and
/// trusting the test CA, then reads once: the broker either starts HTTP/2 or
/// ends the connection with an alert. Also returns the client's address, as
/// the broker logs it.
async fn raw_handshake(
    addr: SocketAddr,
    ca_pem: &str,
    identity: &IssuedCert,
) -> (SocketAddr, Answer) {
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
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let answer = tokio::time::timeout(CALL, async {
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = match connector.connect(name, tcp).await {
            Ok(tls) => tls,
            Err(e) => return Answer::Refused(e.to_string()),
        };
        let server_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(n) if n > 0 => Answer::Served { server_cert },
            Ok(_) => Answer::Refused("closed without an alert".into()),
            Err(e) => Answer::Refused(e.to_string()),
        }
    })
    .await
    .expect("the broker neither served nor refused the handshake");
    (local, answer)
}

/// Asserts the broker refused `identity` with `alert`, and logged `reason`
/// with the client's address.
async fn assert_handshake_refused(
    broker: &Broker,
    identity: &IssuedCert,
    alert: &str,
    reason: &str,
) {
    let (local, answer) = raw_handshake(broker.addr, &broker.pki.ca_pem, identity).await;
    match answer {
        Answer::Refused(e) => assert!(e.contains(alert), "expected alert {alert}, got {e}"),
        Answer::Served { .. } => {
            panic!("the broker served a certificate it should refuse ({reason})")
        }
    }
    let peer = format!("peer={local}");
    eventually(Duration::from_secs(5), || async {
        logged(&["tls handshake failed", &peer, reason])
    })
    .await;
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Waits for the end of a Subscribe stream: `Ok(None)` or an error status.
async fn stream_ends(consumer: &mut TestConsumer, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, consumer.stream.message()).await {
            Err(_) => return false,
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) | Ok(Err(_)) => return true,
        }
    }
}

/// The next delivery's payload, acked so it is not redelivered.
async fn receive(consumer: &mut TestConsumer) -> String {
    let delivery = consumer
        .next(CALL)
        .await
        .expect("a delivery within the deadline");
    consumer.ack(vec![delivery.delivery_id]).await;
    payload_of(&delivery)
}

fn sender_of(d: &Delivery) -> &str {
    &d.envelope.as_ref().unwrap().sender
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn revoked_certificate_is_refused_after_a_crl_update_and_its_stream_is_closed() {
    let broker = Broker::start(Setup {
        tls: r#"reload_interval = "1s""#,
        ..Setup::default()
    })
    .await;
    let council_cert = broker.pki.agency("council");
    let mut council = broker.client(&council_cert).await;
    let mut council_inbox = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let mut fire = broker.client(&broker.pki.agency("fire")).await;
    let mut fire_inbox = TestConsumer::open(&mut fire, "fire.inbox", 10)
        .await
        .unwrap();
    let mut police = broker.client(&broker.pki.agency("police")).await;
    publish(&mut police, envelope("before")).await.unwrap();
    assert_eq!(receive(&mut council_inbox).await, "before");
    assert_eq!(receive(&mut fire_inbox).await, "before");

    // Revoke the council certificate: no restart, just a new CRL file.
    let revoked_at = tokio::time::Instant::now();
    broker.write_crl(&[&council_cert.serial], 3600);

    // Its open Subscribe stream is closed soon after the reload (<= 1s poll).
    assert!(
        stream_ends(&mut council_inbox, Duration::from_secs(5)).await,
        "the revoked certificate's stream stayed open"
    );
    println!(
        "revoked stream closed {:?} after the CRL was written",
        revoked_at.elapsed()
    );
    assert_logged(&["closing connection", "revoked", &council_cert.serial]);

    // A new connection with it fails the handshake, and the reason is logged.
    assert_handshake_refused(
        &broker,
        &council_cert,
        "CertificateRevoked",
        "certificate revoked",
    )
    .await;
    // Through tonic too: the connection or the call fails.
    if let Ok(again) = channel(broker.addr, &council_cert, &broker.pki.ca_pem).await {
        let opened = TestConsumer::open(&mut BrokerClient::new(again), "council.inbox", 10).await;
        assert!(
            opened.is_err(),
            "a revoked certificate opened a subscription"
        );
    }

    // Everyone else carries on: fire's open stream, police's connection, and
    // a new council certificate.
    publish(&mut police, envelope("after")).await.unwrap();
    assert_eq!(receive(&mut fire_inbox).await, "after");
    let mut council_again = broker.client(&broker.pki.agency("council")).await;
    let mut inbox = TestConsumer::open(&mut council_again, "council.inbox", 10)
        .await
        .unwrap();
    let delivered = inbox
        .next(CALL)
        .await
        .expect("the new council certificate is served");
    assert!(["before", "after"].contains(&payload_of(&delivered).as_str()));
}

#[tokio::test]
async fn stale_crl_fails_handshakes_closed_until_a_current_one_is_installed() {
    let broker = Broker::start(Setup {
        tls: r#"reload_interval = "1s""#,
        crl_next_update: Some(-60),
        wait_ready: false,
        ..Setup::default()
    })
    .await;
    let police = broker.pki.agency("police");
    assert_handshake_refused(&broker, &police, "UnknownCA", "CRL stale").await;
    if let Ok(channel) = channel(broker.addr, &police, &broker.pki.ca_pem).await {
        let published = publish(&mut BrokerClient::new(channel), envelope("while stale")).await;
        assert!(published.is_err(), "published through a stale CRL");
    }

    // A current CRL, picked up without a restart, lets everyone back in.
    broker.write_crl(&[], 3600);
    eventually(Duration::from_secs(5), || {
        let police = police.clone();
        let broker = &broker;
        async move {
            let (_, answer) = raw_handshake(broker.addr, &broker.pki.ca_pem, &police).await;
            matches!(answer, Answer::Served { .. })
        }
    })
    .await;
    let mut client = broker.client(&police).await;
    publish(&mut client, envelope("current")).await.unwrap();
}

#[tokio::test]
async fn expired_not_yet_valid_and_foreign_certificates_are_refused_with_the_reason_logged() {
    let broker = Broker::start(Setup::default()).await;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = unix_now();
    let day = Duration::from_secs(86_400);

    let expired = client_cert(&broker.pki, |p| {
        p.subject_alt_names = vec![agency_san("police")];
        p.not_before = epoch + now - 10 * day;
        p.not_after = epoch + now - day;
    });
    assert_handshake_refused(
        &broker,
        &expired,
        "CertificateExpired",
        "certificate expired",
    )
    .await;

    let not_yet_valid = client_cert(&broker.pki, |p| {
        p.subject_alt_names = vec![agency_san("police")];
        p.not_before = epoch + now + day;
        p.not_after = epoch + now + 10 * day;
    });
    assert_handshake_refused(
        &broker,
        &not_yet_valid,
        "CertificateExpired",
        "certificate not yet valid",
    )
    .await;

    let rogue_ca = joinery::pki::CertificateAuthority::generate("rogue CA").unwrap();
    let rogue = rogue_ca.issue_agency("police").unwrap();
    assert_handshake_refused(&broker, &rogue, "UnknownCA", "not issued by a trusted CA").await;

    // A rogue CA that copies the real CA's name fails on the signature.
    let impostor_ca = joinery::pki::CertificateAuthority::generate(TEST_CA_NAME).unwrap();
    let impostor = impostor_ca.issue_agency("police").unwrap();
    assert_handshake_refused(
        &broker,
        &impostor,
        "DecryptError",
        "certificate signature invalid",
    )
    .await;

    // A current certificate from the right CA is still served.
    let mut police = broker.client(&broker.pki.agency("police")).await;
    publish(&mut police, envelope("fine")).await.unwrap();
}

#[tokio::test]
async fn identity_mapping_by_subject_and_by_dns_san() {
    let body = format!(
        r#"{BODY}
[[identity]]
subject = "CN=nhs-gateway,O=Demo NHS Trust,C=GB"
agency = "nhs"

[[identity]]
san = "cad.police.example.gov.uk"
agency = "police"
"#
    );
    let broker = Broker::start(Setup {
        body: &body,
        ..Setup::default()
    })
    .await;
    let mut council = broker.client(&broker.pki.agency("council")).await;
    let mut inbox = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();

    // No agency SAN; the subject (C, O, CN in DER order) is mapped to nhs.
    let gateway = client_cert(&broker.pki, |p| {
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CountryName, "GB");
        p.distinguished_name
            .push(DnType::OrganizationName, "Demo NHS Trust");
        p.distinguished_name.push(DnType::CommonName, "nhs-gateway");
    });
    let mut nhs = broker.client(&gateway).await;
    publish(&mut nhs, envelope("from the gateway"))
        .await
        .unwrap();
    let d = inbox.next(CALL).await.unwrap();
    inbox.ack(vec![d.delivery_id]).await;
    assert_eq!(
        (payload_of(&d).as_str(), sender_of(&d)),
        ("from the gateway", "nhs")
    );

    // No agency SAN; a DNS SAN is mapped to police.
    let cad = client_cert(&broker.pki, |p| {
        p.subject_alt_names = vec![SanType::DnsName(
            Ia5String::try_from("cad.police.example.gov.uk").unwrap(),
        )];
    });
    let mut police = broker.client(&cad).await;
    publish(&mut police, envelope("from the cad"))
        .await
        .unwrap();
    let d = inbox.next(CALL).await.unwrap();
    inbox.ack(vec![d.delivery_id]).await;
    assert_eq!(
        (payload_of(&d).as_str(), sender_of(&d)),
        ("from the cad", "police")
    );

    // Neither an agency SAN nor a mapping: unauthenticated.
    let stranger = client_cert(&broker.pki, |p| {
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CountryName, "GB");
        p.distinguished_name
            .push(DnType::OrganizationName, "Other Trust");
        p.distinguished_name.push(DnType::CommonName, "nhs-gateway");
    });
    let mut stranger = broker.client(&stranger).await;
    let status = publish(&mut stranger, envelope("who am I"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("[[identity]]"), "{status:?}");
}

#[tokio::test]
async fn server_certificate_rotated_on_file_change_while_a_subscriber_stays_connected() {
    let broker = Broker::start(Setup {
        tls: r#"reload_interval = "1s""#,
        ..Setup::default()
    })
    .await;
    let mut council = broker.client(&broker.pki.agency("council")).await;
    let mut inbox = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let mut police = broker.client(&broker.pki.agency("police")).await;
    publish(&mut police, envelope("before")).await.unwrap();
    assert_eq!(receive(&mut inbox).await, "before");
    let old_cert = der_of(&std::fs::read_to_string(broker.pki_dir.join("server.pem")).unwrap());

    let new_server = rotate_server_cert(&broker.pki, &broker.pki_dir);
    let police_cert = broker.pki.agency("police");
    let served =
        served_certificate_becomes(broker.addr, &broker.pki.ca_pem, &police_cert, &new_server)
            .await;
    assert_ne!(served, old_cert);

    // The subscriber connected before the rotation still gets messages.
    publish(&mut police, envelope("after")).await.unwrap();
    assert_eq!(receive(&mut inbox).await, "after");
    assert_logged(&[
        "TLS certificate, CA bundle and CRLs reloaded",
        "files changed",
    ]);
}

/// Issues a new server certificate from the same CA and installs it (key
/// first, then certificate, each replaced atomically). Returns its DER.
fn rotate_server_cert(pki: &TestPki, dir: &Path) -> Vec<u8> {
    let server = pki
        .ca
        .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap();
    write_atomic(&dir.join("server.key"), &server.key_pem);
    write_atomic(&dir.join("server.pem"), &server.cert_pem);
    der_of(&server.cert_pem)
}

/// Waits until a new connection is served `expected`; returns what was served.
async fn served_certificate_becomes(
    addr: SocketAddr,
    ca_pem: &str,
    client: &IssuedCert,
    expected: &[u8],
) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, answer) = raw_handshake(addr, ca_pem, client).await;
        let Answer::Served { server_cert } = answer else {
            panic!("a good client was refused during the rotation: {answer:?}");
        };
        if server_cert == expected {
            return server_cert;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new server certificate was not served within 5s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn max_connection_age_closes_an_idle_subscriber() {
    let broker = Broker::start(Setup {
        tls: r#"max_connection_age = "2s""#,
        ..Setup::default()
    })
    .await;
    let council_cert = broker.pki.agency("council");
    let mut council = broker.client(&council_cert).await;
    let opened = tokio::time::Instant::now();
    let mut inbox = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    assert!(
        stream_ends(&mut inbox, Duration::from_secs(4)).await,
        "an idle stream outlived the 2s connection age"
    );
    let age = opened.elapsed();
    assert!(
        age >= Duration::from_millis(1500),
        "closed after only {age:?}"
    );
    assert_logged(&["closing connection", "maximum connection age"]);
}

// ---------------------------------------------------------------------------
// SIGHUP on the real binary
// ---------------------------------------------------------------------------

/// The spawned `joinery serve`; killed on drop.
struct Served {
    child: Child,
    log: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn sighup_rotates_the_server_certificate_of_the_real_binary_under_a_subscriber() {
    capture_logs();
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let pki = TestPki::create(&pki_dir);
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    // Only SIGHUP reloads: the file poll would not run within the test.
    let setup = Setup {
        tls: r#"reload_interval = "1h""#,
        crl_next_update: None,
        ..Setup::default()
    };
    let config_path = tmp.path().join("joinery.toml");
    std::fs::write(
        &config_path,
        config_text_with(tmp.path(), &addr.to_string(), &setup),
    )
    .unwrap();
    let log = tmp.path().join("joinery.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_joinery"));
    command
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env("JOINERY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("JOINERY_") && var != "JOINERY_LOG" {
            command.env_remove(&var);
        }
    }
    let served = Served {
        child: command.spawn().expect("spawn joinery serve"),
        log,
    };
    let pid = served.child.id();
    let ready = tokio::time::timeout(Duration::from_secs(20), wait_ready(addr, &pki)).await;
    assert!(ready.is_ok(), "joinery serve not ready:\n{}", served.log());

    let mut council = BrokerClient::new(
        channel(addr, &pki.agency("council"), &pki.ca_pem)
            .await
            .unwrap(),
    );
    let mut inbox = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let mut police = BrokerClient::new(
        channel(addr, &pki.agency("police"), &pki.ca_pem)
            .await
            .unwrap(),
    );
    publish(&mut police, envelope("before")).await.unwrap();
    assert_eq!(receive(&mut inbox).await, "before");

    let old_cert = der_of(&std::fs::read_to_string(pki_dir.join("server.pem")).unwrap());
    let new_cert = rotate_server_cert(&pki, &pki_dir);
    let police_cert = pki.agency("police");
    // Without a reload the old certificate is still served.
    match raw_handshake(addr, &pki.ca_pem, &police_cert).await.1 {
        Answer::Served { server_cert } => assert_eq!(server_cert, old_cert),
        refused => panic!("refused before the reload: {refused:?}"),
    }

    let hup = Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .status()
        .expect("run kill -HUP");
    assert!(hup.success(), "kill -HUP {pid} failed");
    served_certificate_becomes(addr, &pki.ca_pem, &police_cert, &new_cert).await;

    publish(&mut police, envelope("after")).await.unwrap();
    assert_eq!(receive(&mut inbox).await, "after");
    let log = served.log();
    assert!(
        log.lines()
            .any(|l| l.contains("reloaded") && l.contains("SIGHUP")),
        "no SIGHUP reload in the log:\n{log}"
    );
}
