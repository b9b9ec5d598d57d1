//! Operations endpoints: /metrics values after a scripted workload, /healthz,
//! /readyz (unready during shutdown), and the status page rendered by a real
//! headless Chromium.
//!
//! The Prometheus recorder is global to the process, so the workload whose
//! counts are checked runs in one test with names no other test here uses.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use joinery::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(5);

/// A broker with its operations listener, both on 127.0.0.1:0.
struct OpsBroker {
    ops: std::net::SocketAddr,
    broker: TestBroker,
}

static RECORDER: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
    std::sync::OnceLock::new();

async fn start(
    body: &str,
) -> (
    OpsBroker,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), joinery::RunError>>,
) {
    joinery::tls::install_crypto_provider();
    let prometheus = RECORDER.get_or_init(joinery::metrics::install).clone();
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let pki = Arc::new(TestPki::create(&tmp.path().join("pki")));
    let text = config_text(tmp.path(), body);
    let config = Arc::new(Config::load_str(&text, Vec::<(String, String)>::new()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = ops_listener.local_addr().unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(joinery::run_with(
        config.clone(),
        listener,
        Some(joinery::OpsListener {
            listener: ops_listener,
            prometheus,
        }),
        async move {
            let _ = stopped.await;
        },
    ));
    // A TestBroker view over the same broker, for its client helpers (its
    // own stop is unused: this test stops the task above).
    let broker = TestBroker::attach(addr, tmp, pki, config);
    eventually(Duration::from_secs(10), || async move {
        get(ops, "/readyz")
            .await
            .is_some_and(|(code, _)| code == 200)
    })
    .await;
    (OpsBroker { ops, broker }, stop, task)
}

/// A plain HTTP/1.1 GET: (status code, body), or None if nothing answers.
async fn get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The value of one sample line `name{labels} value` in Prometheus text.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

const OPS_BODY: &str = r#"
[[agency]]
id = "police"
[[agency]]
id = "council"
[[agency]]
id = "fire"

[[topic]]
name = "ops.referrals"
message_types = ["test.v1.Referral"]
publishers = ["police"]
subscribers = ["council", "fire"]

[[subscription]]
name = "ops.council"
topic = "ops.referrals"
owner = "council"
ack_deadline = "30s"

[[subscription]]
name = "ops.fire"
topic = "ops.referrals"
owner = "fire"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_a_scripted_workload_and_readyz_turns_unready_on_shutdown() {
    let (ops, stop, task) = start(OPS_BODY).await;
    let mut police = ops.broker.client("police").await;
    for i in 0..5 {
        let mut env = envelope(&format!("m{i}"));
        env.message_type = TYPE.into();
        police
            .publish(joinery::proto::PublishRequest {
                topic: "ops.referrals".into(),
                envelope: Some(env),
            })
            .await
            .unwrap();
    }
    // One refused publish: fire is not a publisher.
    let mut fire = ops.broker.client("fire").await;
    fire.publish(joinery::proto::PublishRequest {
        topic: "ops.referrals".into(),
        envelope: Some(envelope("no")),
    })
    .await
    .unwrap_err();
    // Council: acks four, nacks one and acks its redelivery.
    let mut council = ops.broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "ops.council", 10)
        .await
        .unwrap();
    let got = c.take(5, WAIT).await;
    c.ack(got[1..].iter().map(|d| d.delivery_id).collect())
        .await;
    c.nack(vec![got[0].delivery_id], Duration::ZERO).await;
    let again = c.take(1, WAIT).await;
    assert_eq!(again[0].attempt, 2);
    c.ack(vec![again[0].delivery_id]).await;
    c.close().await;

    // Counters exactly; gauges once the sampler has run at rest.
    let council_sub = [("subscription", "ops.council")];
    let fire_sub = [("subscription", "ops.fire")];
    let metrics = {
        let mut last = String::new();
        for _ in 0..50 {
            let (code, body) = get(ops.ops, "/metrics").await.unwrap();
            assert_eq!(code, 200);
            let settled = sample(&body, joinery::metrics::DEPTH, &council_sub) == Some(0.0)
                && sample(&body, joinery::metrics::DEPTH, &fire_sub) == Some(5.0);
            last = body;
            if settled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    };
    let check = |name: &str, labels: &[(&str, &str)], want: f64| {
        assert_eq!(
            sample(&metrics, name, labels),
            Some(want),
            "{name} {labels:?}\n{metrics}"
        );
    };
    use joinery::metrics as m;
    check(
        m::PUBLISHED,
        &[("topic", "ops.referrals"), ("agency", "police")],
        5.0,
    );
    check(m::DELIVERED, &council_sub, 6.0);
    check(m::REDELIVERED, &council_sub, 1.0);
    check(m::ACKED, &council_sub, 5.0);
    check(m::NACKED, &council_sub, 1.0);
    check(m::DENIED, &[("reason", "not_a_publisher")], 1.0);
    check(m::REJECTED, &[("reason", "not_a_publisher")], 1.0);
    check(m::DEPTH, &council_sub, 0.0);
    check(m::DEPTH, &fire_sub, 5.0);
    check(m::IN_FLIGHT, &council_sub, 0.0);
    check(m::DEAD_LETTERS, &fire_sub, 0.0);
    assert!(sample(&metrics, m::OLDEST_UNACKED, &fire_sub).is_some());
    for histogram in [m::FLUSH_SECONDS, m::APPLY_SECONDS] {
        assert!(
            sample(&metrics, &format!("{histogram}_count"), &[]).is_some_and(|n| n >= 1.0),
            "{histogram}\n{metrics}"
        );
    }
    assert!(sample(&metrics, m::STORAGE_BYTES, &[]).is_some_and(|b| b > 0.0));
    assert!(metrics.contains("# HELP joinery_messages_published_total"));
    // Certificate expiry: the server's and the CA's, in the future.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for certificate in ["server", "ca:joinery test CA"] {
        let expiry = sample(&metrics, m::CERT_EXPIRY, &[("certificate", certificate)]);
        assert!(
            expiry.is_some_and(|at| at > now),
            "{certificate}: {expiry:?}\n{metrics}"
        );
    }

    // Health and readiness.
    assert_eq!(get(ops.ops, "/healthz").await.map(|r| r.0), Some(200));
    assert_eq!(get(ops.ops, "/readyz").await.map(|r| r.0), Some(200));
    let status = get(ops.ops, "/api/status").await.unwrap().1;
    assert!(
        status.contains("\"ops.fire\"") && status.contains("\"depth\":5"),
        "{status}"
    );

    // Shutdown: /readyz answers 503 "shutting down" before the listener goes.
    stop.send(()).unwrap();
    let mut saw_unready = false;
    for _ in 0..2000 {
        match get(ops.ops, "/readyz").await {
            Some((503, body)) => {
                assert!(body.contains("shutting down"), "{body}");
                saw_unready = true;
                break;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            None => break,
        }
    }
    assert!(saw_unready, "/readyz never reported the shutdown");
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

const PAGE_BODY: &str = r#"
[[agency]]
id = "police"
[[agency]]
id = "council"

[[topic]]
name = "page.referrals"
message_types = ["test.v1.Referral"]
publishers = ["police"]
subscribers = ["council"]

[[subscription]]
name = "page.backlog"
topic = "page.referrals"
owner = "council"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_headless_chromium_and_shows_the_backlog() {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium is needed for this test (.ci/run installs Debian's chromium)");
    let (ops, stop, task) = start(PAGE_BODY).await;
    let mut police = ops.broker.client("police").await;
    for i in 0..7 {
        police
            .publish(joinery::proto::PublishRequest {
                topic: "page.referrals".into(),
                envelope: Some(envelope(&format!("m{i}"))),
            })
            .await
            .unwrap();
    }
    // Let the sampler see the backlog.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", ops.ops);
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=3000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(&url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish within 60 s")
    .expect("chromium runs");
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains("<tr data-subscription=\"page.backlog\">"),
        "the rendered page lists the subscription:\n{dom}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Its row shows the backlog of 7, highlighted, and the topic's sequence.
    let row = dom
        .split("<tr data-subscription=\"page.backlog\">")
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_default();
    assert!(row.contains("<td class=\"n backlog\">7</td>"), "{row}");
    assert!(
        dom.contains("<td>page.referrals</td><td class=\"n\">7</td>"),
        "{dom}"
    );
    assert!(dom.contains("class=\"ready\">ready<"), "{dom}");
    stop.send(()).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
}
