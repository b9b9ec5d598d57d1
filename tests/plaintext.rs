//! The loopback-only plaintext mode (`[tls] insecure_plaintext_agency`), which
//! exists only to measure what mutual TLS costs: over real sockets on
//! 127.0.0.1 and real sled, a plain `http://` client publishes and consumes as
//! the configured agency; TLS and plaintext clients cannot cross over; and a
//! configuration that would serve plaintext anywhere but loopback, or as an
//! unknown agency, is refused with exit status 64 — and at run time too.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use joinery::config::Config;
use joinery::proto::broker_client::BrokerClient;
use tonic::transport::Channel;

/// Every plaintext connection acts as this agency, so it both publishes and
/// owns the subscription.
const AGENCY: &str = "bench";

const BODY_PLAINTEXT: &str = r#"
[[agency]]
id = "bench"
[[agency]]
id = "police"

[[topic]]
name = "referral.safeguarding"
message_types = ["test.v1.Referral"]
publishers = ["bench", "police"]
subscribers = ["bench"]

[[subscription]]
name = "bench.inbox"
topic = "referral.safeguarding"
owner = "bench"
ack_deadline = "5s"
"#;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn plaintext_client_publishes_and_consumes_as_the_configured_agency() {
    let broker = TestBroker::start_plaintext(BODY_PLAINTEXT, AGENCY).await;
    let mut publisher = broker.plain_client().await;
    let mut subscriber = broker.plain_client().await;
    let mut consumer = TestConsumer::open(&mut subscriber, "bench.inbox", 10)
        .await
        .expect("the configured agency owns bench.inbox");

    let published = publish(&mut publisher, envelope("over plaintext"))
        .await
        .expect("publish over plaintext");
    assert!(!published.message_id.is_empty());

    let delivery = consumer.next(WAIT).await.expect("a delivery");
    let got = delivery.envelope.as_ref().expect("an envelope");
    assert_eq!(payload_of(&delivery), "over plaintext");
    assert_eq!(got.sender, AGENCY, "the sender is the configured agency");
    assert_eq!(got.message_id, published.message_id);
    consumer.ack(vec![delivery.delivery_id]).await;

    // The identity is fixed: claiming another agency's name is refused.
    let claimed = publish(
        &mut publisher,
        joinery::proto::Envelope {
            sender: "police".into(),
            ..envelope("pretending")
        },
    )
    .await
    .expect_err("a claimed sender other than the configured agency");
    assert!(
        claimed.message().contains("police") && claimed.message().contains(AGENCY),
        "{claimed:?}"
    );

    consumer.close().await;
    broker.stop().await;
}

/// Asserts a client of the wrong kind gets nowhere: either the channel does not
/// connect, or its publish fails promptly.
async fn assert_cannot_publish(connected: Result<Channel, tonic::transport::Error>) {
    let Ok(channel) = connected else { return };
    let mut client = BrokerClient::new(channel);
    let outcome = tokio::time::timeout(WAIT, publish(&mut client, envelope("crossover")))
        .await
        .expect("the call ends promptly");
    assert!(
        outcome.is_err(),
        "published over the wrong transport: {outcome:?}"
    );
}

#[tokio::test]
async fn tls_client_cannot_use_the_plaintext_listener() {
    let broker = TestBroker::start_plaintext(BODY_PLAINTEXT, AGENCY).await;
    let cert = broker.pki.agency(AGENCY);
    let connected = tokio::time::timeout(
        WAIT,
        broker.channel(Some((cert.cert_pem, cert.key_pem)), &broker.pki.ca_pem),
    )
    .await
    .expect("the TLS client gives up promptly");
    assert_cannot_publish(connected).await;
    // The plaintext broker is unharmed.
    let mut plain = broker.plain_client().await;
    publish(&mut plain, envelope("still serving"))
        .await
        .expect("plaintext still served");
    broker.stop().await;
}

#[tokio::test]
async fn plaintext_client_cannot_use_a_tls_broker() {
    let broker = TestBroker::start(BODY_PLAINTEXT).await;
    let connected = tokio::time::timeout(WAIT, broker.plain_channel())
        .await
        .expect("the plaintext client gives up promptly");
    assert_cannot_publish(connected).await;
    // Nothing arrived: the TLS broker's only publish is the one below.
    let mut tls = broker.client(AGENCY).await;
    publish(&mut tls, envelope("over tls"))
        .await
        .expect("mutual TLS still served");
    let mut consumer = TestConsumer::open(&mut tls, "bench.inbox", 10)
        .await
        .unwrap();
    let delivery = consumer.next(WAIT).await.expect("a delivery");
    assert_eq!(payload_of(&delivery), "over tls");
    assert!(consumer.next(Duration::from_millis(300)).await.is_none());
    consumer.close().await;
    broker.stop().await;
}

// ---------------------------------------------------------------------------
// Configuration refused: `joinery check-config` and `serve`, exit status 64
// ---------------------------------------------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_joinery");

/// A configuration file in `dir` (the harness's, with its test schemas)
/// serving plaintext as `agency` on `listen`.
fn plaintext_config(dir: &Path, listen: &str, agency: &str) -> String {
    let path = dir.join("joinery.toml");
    let text = config_text(dir, BODY_PLAINTEXT)
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{listen}\""),
            1,
        )
        .replacen(
            "[tls]\n",
            &format!("[tls]\ninsecure_plaintext_agency = \"{agency}\"\n"),
            1,
        );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn joinery(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run joinery")
}

/// Runs `check-config` and `serve` on `config`, expecting both to refuse it
/// with exit status 64 and a message containing each of `mentions`.
fn assert_refused(dir: &Path, config: &str, env: &[(&str, &str)], mentions: &[&str]) {
    for verb in ["check-config", "serve"] {
        let out = joinery(dir, &[verb, "--config", config], env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{verb}: {err}");
        for m in mentions {
            assert!(err.contains(m), "{verb}: should mention {m:?}: {err}");
        }
    }
    assert!(
        !dir.join("data").exists(),
        "nothing created for a refused config"
    );
}

#[test]
fn plaintext_on_a_non_loopback_address_is_refused_with_exit_64() {
    let tmp = tempfile::tempdir().unwrap();
    for listen in ["0.0.0.0:7443", "[::]:7443", "192.0.2.10:7443"] {
        let config = plaintext_config(tmp.path(), listen, AGENCY);
        assert_refused(
            tmp.path(),
            &config,
            &[],
            &[
                "tls.insecure_plaintext_agency",
                "for measuring TLS cost only",
                "only on loopback",
                listen,
            ],
        );
    }
}

#[test]
fn plaintext_moved_off_loopback_by_the_environment_is_refused_with_exit_64() {
    let tmp = tempfile::tempdir().unwrap();
    let config = plaintext_config(tmp.path(), "127.0.0.1:7443", AGENCY);
    let out = joinery(tmp.path(), &["check-config", "--config", &config], &[]);
    assert!(
        out.status.success(),
        "loopback is accepted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_refused(
        tmp.path(),
        &config,
        &[("JOINERY_BROKER_LISTEN", "0.0.0.0:7443")],
        &["for measuring TLS cost only", "only on loopback"],
    );
}

#[test]
fn plaintext_as_an_unknown_agency_is_refused_with_exit_64() {
    let tmp = tempfile::tempdir().unwrap();
    let config = plaintext_config(tmp.path(), "127.0.0.1:7443", "nobody");
    assert_refused(
        tmp.path(),
        &config,
        &[],
        &[
            "tls.insecure_plaintext_agency",
            "\"nobody\" is not a configured agency",
        ],
    );
}

#[test]
fn serve_in_plaintext_mode_warns_loudly_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let config = plaintext_config(tmp.path(), &listen, AGENCY);
    let log = tmp.path().join("serve.log");
    let mut child = Command::new(BIN)
        .current_dir(tmp.path())
        .args(["serve", "--config", &config])
        .env("JOINERY_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("joinery is serving") || std::time::Instant::now() > deadline {
            break text;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited early ({status}): {text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains(&format!(
            "WARNING: serving PLAINTEXT without TLS on {listen}, every connection acts as \
             agency {AGENCY} — for measuring TLS cost only"
        )),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// Defence in depth: the run-time check of the bound listener
// ---------------------------------------------------------------------------

#[tokio::test]
async fn run_refuses_plaintext_on_a_listener_that_is_not_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    // Valid: the configuration says loopback (its TLS files need not exist:
    // plaintext mode does not read them) ...
    let config = Config::load_str(
        &config_text(tmp.path(), BODY_PLAINTEXT),
        [(
            "JOINERY_TLS_INSECURE_PLAINTEXT_AGENCY".to_string(),
            AGENCY.to_string(),
        )],
    )
    .expect("valid config");
    // ... but the listener handed to the library is not.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let result = tokio::time::timeout(
        WAIT,
        joinery::run(Arc::new(config), listener, std::future::pending()),
    )
    .await
    .expect("refused at once, not served");
    let err = result.expect_err("plaintext on a non-loopback listener");
    let source = std::error::Error::source(&err)
        .map(|s| s.to_string())
        .unwrap_or_default();
    assert!(
        source.contains(&addr.to_string()) && source.contains("loopback"),
        "{err}: {source}"
    );
    assert!(
        !tmp.path().join("data").exists(),
        "refused before opening storage"
    );
}
