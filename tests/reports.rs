//! Delivery reports: when a message is dead-lettered or expires undelivered,
//! its sender gets a `joinery.v1.DeliveryReport` on `reports.<agency>`, read
//! through its subscription `<agency>.reports` (as NHS MESH non-delivery
//! reports).

mod common;

use std::time::Duration;

use common::*;
use joinery::proto::{DeliveryReport, PublishRequest};
use prost::Message;

const WAIT: Duration = Duration::from_secs(5);

fn report_of(d: &joinery::proto::Delivery) -> DeliveryReport {
    let envelope = d.envelope.as_ref().unwrap();
    assert_eq!(envelope.message_type, "joinery.v1.DeliveryReport");
    assert_eq!(envelope.sender, "joinery");
    DeliveryReport::decode(&envelope.payload[..]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_and_expired_messages_each_report_once_to_their_sender() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let mut nhs = broker.client("nhs").await;

    // Police: a message council cannot process (nacked until dead-lettered),
    // addressed to council only.
    let mut poison = envelope("poison");
    poison.message_id = "police-0001".into();
    poison.recipients = vec!["council".into()];
    poison.correlation_id = "case-9".into();
    let poisoned = publish(&mut police, poison).await.unwrap();
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    for attempt in 1..=3 {
        let d = c.next(WAIT).await.expect("delivery");
        assert_eq!(d.attempt, attempt);
        c.nack(vec![d.delivery_id], Duration::ZERO).await;
    }
    c.close().await;

    // NHS: a message to council that expires with nobody reading it.
    let mut fleeting = envelope("fleeting");
    fleeting.message_id = "nhs-0001".into();
    fleeting.recipients = vec!["council".into()];
    fleeting.expires_at = Some((std::time::SystemTime::now() + Duration::from_millis(700)).into());
    let expired = publish(&mut nhs, fleeting).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Police's report: exactly one, about its poisoned message.
    let mut police_reports = TestConsumer::open(&mut police, "police.reports", 10)
        .await
        .unwrap();
    let d = police_reports
        .next(WAIT)
        .await
        .expect("police's delivery report");
    let report = report_of(&d);
    assert_eq!(report.message_id, "police-0001");
    assert_eq!(report.sequence, poisoned.sequence);
    assert_eq!(report.topic, TOPIC);
    assert_eq!(report.subscription, "council.inbox");
    assert_eq!(report.owner_agency, "council");
    assert_eq!(report.reason, "max_deliveries");
    assert_eq!(report.attempts, 3);
    assert_eq!(report.message_type, TYPE);
    assert_eq!(d.envelope.as_ref().unwrap().correlation_id, "case-9");
    police_reports.ack(vec![d.delivery_id]).await;
    assert!(
        police_reports
            .next(Duration::from_millis(500))
            .await
            .is_none(),
        "one report only"
    );

    // NHS's report: exactly one, expired, about its own message.
    let mut nhs_reports = TestConsumer::open(&mut nhs, "nhs.reports", 10)
        .await
        .unwrap();
    let d = nhs_reports.next(WAIT).await.expect("nhs's delivery report");
    let report = report_of(&d);
    assert_eq!(report.message_id, "nhs-0001");
    assert_eq!(report.sequence, expired.sequence);
    assert_eq!(report.reason, "expired");
    assert_eq!(report.subscription, "council.inbox");
    assert_eq!(report.attempts, 0);
    nhs_reports.ack(vec![d.delivery_id]).await;
    assert!(
        nhs_reports.next(Duration::from_millis(500)).await.is_none(),
        "one report only"
    );

    // Nobody else heard about it, and nobody can write to a report topic.
    let mut fire = broker.client("fire").await;
    let mut fire_reports = TestConsumer::open(&mut fire, "fire.reports", 10)
        .await
        .unwrap();
    assert!(fire_reports
        .next(Duration::from_millis(300))
        .await
        .is_none());
    let err = police
        .publish(PublishRequest {
            topic: "reports.police".into(),
            envelope: Some(envelope("forged report")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // And one agency cannot read another's reports.
    let err = match TestConsumer::open(&mut police, "nhs.reports", 1).await {
        Ok(_) => panic!("police must not read nhs's reports"),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Each report is in the audit log as a publish by the broker itself,
    // naming the message it reports on.
    drop((police_reports, nhs_reports, fire_reports));
    drop((police, nhs, fire));
    let data = broker.data_dir();
    let (_tmp, _pki) = broker.stop().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_joinery"))
        .args(["audit", "export", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut published: Vec<(String, String, String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "publish" && r["agency"] == "joinery")
        .map(|r| {
            let field = |name: &str| r[name].as_str().unwrap_or_default().to_string();
            (
                field("topic"),
                field("message_id"),
                field("message_type"),
                field("reason"),
            )
        })
        .collect();
    published.sort();
    assert_eq!(
        published,
        vec![
            (
                "reports.nhs".to_string(),
                format!("report:{TOPIC}:{}:council.inbox", expired.sequence),
                "joinery.v1.DeliveryReport".to_string(),
                "delivery report for nhs-0001".to_string(),
            ),
            (
                "reports.police".to_string(),
                format!("report:{TOPIC}:{}:council.inbox", poisoned.sequence),
                "joinery.v1.DeliveryReport".to_string(),
                "delivery report for police-0001".to_string(),
            ),
        ]
    );
}
