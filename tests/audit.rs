//! The tamper-evident audit log: every publish, delivery and settlement is
//! recorded in a hash chain that `joinery audit verify` checks, naming the
//! first broken record when one byte is changed or a record removed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use joinery::audit::{AuditRecord, HASH_LEN};
use prost::Message;

const BIN: &str = env!("CARGO_BIN_EXE_joinery");
const WAIT: Duration = Duration::from_secs(5);

/// Publishes from two agencies, consumes with acks and a nack, and stops.
/// Returns the temp dir (kept alive) and the data dir.
async fn busy_run() -> (std::sync::Arc<tempfile::TempDir>, std::path::PathBuf) {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let mut nhs = broker.client("nhs").await;
    for i in 0..30 {
        publish(&mut police, envelope(&format!("police secret {i}")))
            .await
            .unwrap();
        publish(&mut nhs, envelope(&format!("nhs secret {i}")))
            .await
            .unwrap();
    }
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 100)
        .await
        .unwrap();
    let got = c.take(60, WAIT).await;
    c.nack(vec![got[0].delivery_id], Duration::ZERO).await;
    c.ack(got[1..].iter().map(|d| d.delivery_id).collect())
        .await;
    let again = c.take(1, WAIT).await;
    c.ack(vec![again[0].delivery_id]).await;
    c.close().await;
    // A refused request is audited too.
    let mut fire = broker.client("fire").await;
    publish(&mut fire, envelope("fire may not publish"))
        .await
        .unwrap_err();
    let data = broker.data_dir();
    let (tmp, _pki) = broker.stop().await;
    (tmp, data)
}

fn audit_cli(args: &[&str], data: &Path) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("audit")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn records(data: &Path) -> Vec<serde_json::Value> {
    let (ok, stdout, stderr) = audit_cli(&["export"], data);
    assert!(ok, "{stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_chain_verifies_after_a_busy_run_and_records_everything() {
    let (_tmp, data) = busy_run().await;
    let (ok, stdout, stderr) = audit_cli(&["verify"], &data);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("audit log verified"), "{stdout}");

    let all = records(&data);
    let count = |event: &str| all.iter().filter(|r| r["event"] == event).count();
    assert_eq!(count("publish"), 60);
    // fan-out: council got 60 + 1 redelivery; fire.inbox had no consumer.
    assert_eq!(count("delivery"), 61);
    assert_eq!(count("ack"), 60);
    assert_eq!(count("nack"), 1);
    // fire's refused publish (the harness's readiness probe is one too).
    let fire_denied = all
        .iter()
        .filter(|r| r["event"] == "denied" && r["agency"] == "fire")
        .count();
    assert_eq!(fire_denied, 1);
    assert_eq!(count("denied"), 2);
    // Sequence numbers run 1..=n without gaps.
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r["seq"], (i + 1) as u64);
    }
    // Never the payload, always its digest.
    let text = all.iter().map(|r| r.to_string()).collect::<String>();
    assert!(
        !text.contains("secret"),
        "payload leaked into the audit log"
    );
    let first = all.iter().find(|r| r["event"] == "publish").unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &payload("police secret 0"));
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(first["payload_sha256"], hex);
    assert_eq!(first["agency"], "police");
    assert_eq!(first["topic"], TOPIC);
    assert_eq!(first["message_type"], TYPE);

    // Filters.
    let (ok, stdout, _) = audit_cli(&["export", "--agency", "nhs"], &data);
    assert!(ok);
    assert_eq!(stdout.lines().count(), 30);
    assert!(stdout.lines().all(|l| l.contains("\"agency\":\"nhs\"")));
    let (ok, stdout, _) = audit_cli(&["export", "--since", "2999-01-01T00:00:00Z"], &data);
    assert!(ok);
    assert_eq!(stdout.lines().count(), 0);
    let (ok, stdout, _) = audit_cli(&["export", "--since", "1h"], &data);
    assert!(ok);
    assert_eq!(stdout.lines().count(), all.len());
}

/// Rewrites one stored audit record with `edit` (or, when it returns false,
/// takes it out of its block) in its segment file, bypassing the broker.
fn tamper(data: &Path, seq: u64, edit: impl FnOnce(&mut Vec<u8>) -> bool) {
    use joinery::audit::segments;
    let (path, first, mut records, at) = segments::block_of(data, seq)
        .unwrap()
        .expect("record exists");
    if !edit(&mut records[at]) {
        records.remove(at);
    }
    segments::replace_block(&path, first, &records).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_record_with_one_changed_byte() {
    let (_tmp, data) = busy_run().await;
    // Change one byte of record 17's agency ("police" -> "polide").
    tamper(&data, 17, |value| {
        let body_len = value.len() - HASH_LEN;
        let record = AuditRecord::decode(&value[..body_len]).unwrap();
        assert!(!record.agency.is_empty());
        let at = value
            .windows(record.agency.len())
            .position(|w| w == record.agency.as_bytes())
            .unwrap();
        value[at + 3] ^= 0x01;
        true
    });
    let (ok, stdout, stderr) = audit_cli(&["verify"], &data);
    assert!(!ok, "a changed record must fail verification: {stdout}");
    assert!(stderr.contains("audit record 17 is broken"), "{stderr}");
    assert!(stderr.contains("altered"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_re_hashed_edit_by_the_broken_link() {
    let (_tmp, data) = busy_run().await;
    // A careful forger edits record 9 and recomputes its own hash.
    tamper(&data, 9, |value| {
        let body_len = value.len() - HASH_LEN;
        let mut record = AuditRecord::decode(&value[..body_len]).unwrap();
        record.agency = "someone-else".into();
        let mut body = record.encode_to_vec();
        let hash = ring::digest::digest(&ring::digest::SHA256, &body);
        body.extend_from_slice(hash.as_ref());
        *value = body;
        true
    });
    let (ok, _, stderr) = audit_cli(&["verify"], &data);
    assert!(!ok);
    assert!(stderr.contains("audit record 10 is broken"), "{stderr}");
    assert!(stderr.contains("record 9"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_a_removed_record() {
    let (_tmp, data) = busy_run().await;
    tamper(&data, 23, |_| false);
    let (ok, _, stderr) = audit_cli(&["verify"], &data);
    assert!(!ok);
    assert!(stderr.contains("audit record 23 is broken"), "{stderr}");
    assert!(stderr.contains("missing"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_and_its_audit_record_are_durable_together() {
    // The crash test covers SIGKILL; here: every publish answered OK has its
    // record, with the same sequence, right after a stop.
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let mut seqs = Vec::new();
    for i in 0..20 {
        seqs.push(
            publish(&mut police, envelope(&format!("m{i}")))
                .await
                .unwrap()
                .sequence,
        );
    }
    let data = broker.data_dir();
    let (_tmp, _pki) = broker.stop().await;
    let recorded: Vec<u64> = records(&data)
        .iter()
        .filter(|r| r["event"] == "publish")
        .map(|r| r["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(recorded, seqs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_can_be_turned_off() {
    let body = format!("{BODY}\n[audit]\nenabled = false\n");
    let broker = TestBroker::start(&body).await;
    let mut police = broker.client("police").await;
    publish(&mut police, envelope("m")).await.unwrap();
    let data = broker.data_dir();
    let (_tmp, _pki) = broker.stop().await;
    assert!(records(&data).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_reloads_are_audited() {
    let broker = TestBroker::start_with_env(BODY, &[("JOINERY_TLS_RELOAD_INTERVAL", "1s")]).await;
    // Rewrite the server certificate with a fresh one from the same CA.
    let server = broker
        .pki
        .ca
        .issue_server(&["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(broker.pki.dir.join("server.pem"), &server.cert_pem).unwrap();
    std::fs::write(broker.pki.dir.join("server.key"), &server.key_pem).unwrap();
    let data = broker.data_dir();
    // The file poll runs every second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut police = broker.client("police").await;
    publish(&mut police, envelope("after the reload"))
        .await
        .unwrap();
    let (_tmp, _pki) = broker.stop().await;
    let reloads: Vec<String> = records(&data)
        .iter()
        .filter(|r| r["event"] == "config_reload")
        .map(|r| r["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        reloads.iter().any(|r| r == "tls reloaded"),
        "a reload record: {reloads:?}"
    );
}

/// `joinery usage` on the same data directory: the keys it counts are the
/// ones the run left (fire.inbox never consumed, so its 60 pending entries
/// and their topic copies remain; the messages went to two subscriptions,
/// so none is inline), and its byte totals add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_what_a_busy_run_left_in_the_store() {
    let (_tmp, data) = busy_run().await;
    let out = Command::new(BIN)
        .args(["usage", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let usage: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds = usage["kinds"].as_array().unwrap();
    let keys = |kind: &str| {
        kinds
            .iter()
            .find(|k| k["kind"] == kind)
            .map(|k| k["keys"].as_u64().unwrap())
    };
    assert_eq!(keys("pending entries"), Some(60), "{usage}");
    assert_eq!(keys("topic copies of messages"), Some(60), "{usage}");
    assert_eq!(
        keys("pending entries holding their message"),
        None,
        "{usage}"
    );
    // Every record, in the segment files; none left in sled.
    assert_eq!(
        keys("audit records in segment files"),
        Some(records(&data).len() as u64),
        "{usage}"
    );
    assert_eq!(keys("audit blocks"), None, "{usage}");
    let sum = |audit: bool| -> u64 {
        kinds
            .iter()
            .filter(|k| k["kind"].as_str().unwrap().starts_with("audit") == audit)
            .map(|k| k["bytes"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(usage["audit_bytes"].as_u64(), Some(sum(true)));
    assert_eq!(usage["queue_bytes"].as_u64(), Some(sum(false)));
    assert_eq!(usage["live_bytes"].as_u64(), Some(sum(true) + sum(false)));
    assert!(usage["dir_bytes_on_disk"].as_u64().unwrap() > usage["live_bytes"].as_u64().unwrap());

    // The table for people says the same.
    let out = Command::new(BIN)
        .args(["usage", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(table.contains("topic copies of messages"), "{table}");
    assert!(
        table.contains("live: ") && table.contains("x the live bytes"),
        "{table}"
    );
}
