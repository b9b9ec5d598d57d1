//! The Admin service's operator actions on a real broker: listing and
//! redriving dead letters, purging a subscription, peeking at pending
//! messages — each for operators only, each audited with the operator.

mod common;

use std::time::Duration;

use common::*;
use joinery::proto::admin_client::AdminClient;
use joinery::proto::{
    GetStatsRequest, ListDeadLettersRequest, Marking, PeekMessagesRequest,
    PurgeSubscriptionRequest, RedriveDeadLettersRequest, SubscriptionStats,
};
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(5);

/// `council.inbox` dead-letters on the first nack (max_deliveries = 1);
/// `council.archive` receives the same messages; `referral.marac` carries
/// OFFICIAL-SENSITIVE, which only `ops-cleared` of the operators may read.
const ADMIN_BODY: &str = r#"
[[agency]]
id = "police"
[[agency]]
id = "council"
clearance = "OFFICIAL_SENSITIVE"
[[agency]]
id = "ops"
[[agency]]
id = "ops-cleared"
clearance = "OFFICIAL_SENSITIVE"

[[topic]]
name = "referral.safeguarding"
message_types = ["test.v1.Referral"]
publishers = ["police"]
subscribers = ["council"]

[[topic]]
name = "referral.marac"
message_types = ["test.v1.Referral"]
publishers = ["police"]
subscribers = ["council"]
max_marking = "OFFICIAL_SENSITIVE"

[[subscription]]
name = "council.inbox"
topic = "referral.safeguarding"
owner = "council"
ack_deadline = "1s"
max_deliveries = 1

[[subscription]]
name = "council.archive"
topic = "referral.safeguarding"
owner = "council"
ack_deadline = "1s"
max_deliveries = 5

[[subscription]]
name = "council.marac"
topic = "referral.marac"
owner = "council"
"#;

const OPERATORS: &str = r#"operators = ["ops", "ops-cleared"]"#;

async fn start() -> TestBroker {
    TestBroker::start_with(ADMIN_BODY, OPERATORS, &[]).await
}

async fn admin(broker: &TestBroker, agency: &str) -> AdminClient<Channel> {
    let cert = broker.pki.agency(agency);
    let channel = broker
        .channel(Some((cert.cert_pem, cert.key_pem)), &broker.pki.ca_pem)
        .await
        .expect("connect");
    AdminClient::new(channel)
}

fn reason(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("joinery-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn stats(admin: &mut AdminClient<Channel>, subscription: &str) -> SubscriptionStats {
    admin
        .get_stats(GetStatsRequest {})
        .await
        .expect("stats")
        .into_inner()
        .subscriptions
        .into_iter()
        .find(|s| s.name == subscription)
        .expect("subscription in stats")
}

/// Waits until `subscription` shows `depth` pending and `dead` dead letters.
async fn counts_become(
    admin: &AdminClient<Channel>,
    subscription: &'static str,
    depth: u64,
    dead: u64,
) {
    eventually(WAIT, || {
        let mut admin = admin.clone();
        async move {
            let s = stats(&mut admin, subscription).await;
            s.depth == depth && s.dead_letters == dead
        }
    })
    .await;
}

/// Audit records of `event` as (agency, subscription, count).
fn audited(data: &std::path::Path, event: &str) -> Vec<(String, String, u64)> {
    let db = joinery::storage::open_existing(data).expect("open stopped store");
    let mut out = Vec::new();
    joinery::audit::export(&db, data, 0, None, |r| {
        if r.event == event {
            out.push((r.agency, r.subscription, r.count));
        }
        Ok(())
    })
    .expect("export");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_action_is_refused_to_non_operators() {
    let broker = start().await;
    for agency in ["council", "police"] {
        let mut not_ops = admin(&broker, agency).await;
        let refusals = [
            not_ops
                .list_dead_letters(ListDeadLettersRequest {
                    subscription: "council.inbox".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            not_ops
                .redrive_dead_letters(RedriveDeadLettersRequest {
                    subscription: "council.inbox".into(),
                    sequences: Vec::new(),
                })
                .await
                .map(|_| ()),
            not_ops
                .purge_subscription(PurgeSubscriptionRequest {
                    subscription: "council.inbox".into(),
                    confirm: "council.inbox".into(),
                })
                .await
                .map(|_| ()),
            not_ops
                .peek_messages(PeekMessagesRequest {
                    subscription: "council.inbox".into(),
                    limit: 1,
                    include_payload: true,
                })
                .await
                .map(|_| ()),
        ];
        for (i, refused) in refusals.into_iter().enumerate() {
            let err = refused.expect_err("a non-operator must be refused");
            assert_eq!(err.code(), Code::PermissionDenied, "{agency} call {i}");
            assert_eq!(reason(&err), "not_an_operator", "{agency} call {i}");
        }
    }
    let mut ops = admin(&broker, "ops").await;
    let refused = ops
        .get_stats(GetStatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .refusals
        .into_iter()
        .find(|r| r.reason == "not_an_operator")
        .map(|r| r.count);
    assert_eq!(refused, Some(8), "each refusal is counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_redriven_then_delivered_again() {
    let broker = start().await;
    let mut ops = admin(&broker, "ops").await;
    let mut police = broker.client("police").await;
    let mut seqs = Vec::new();
    for text in ["poison 1", "poison 2", "poison 3"] {
        let mut env = envelope(text);
        env.correlation_id = format!("case-{text}");
        seqs.push(publish(&mut police, env).await.unwrap().sequence);
    }
    let mut council = broker.client("council").await;
    // The archive takes and acks everything, so the topic copies go and a
    // redrive has to put them back from the dead letters.
    let mut archive = TestConsumer::open(&mut council, "council.archive", 10)
        .await
        .unwrap();
    let ids = archive
        .take(3, WAIT)
        .await
        .iter()
        .map(|d| d.delivery_id)
        .collect();
    archive.ack(ids).await;
    // max_deliveries = 1: one nack and each is dead-lettered.
    let mut inbox = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let first = inbox.take(3, WAIT).await;
    assert!(first.iter().all(|d| d.attempt == 1));
    inbox
        .nack(
            first.iter().map(|d| d.delivery_id).collect(),
            Duration::ZERO,
        )
        .await;
    counts_become(&ops, "council.inbox", 0, 3).await;
    counts_become(&ops, "council.archive", 0, 0).await;

    // Listed oldest first, in pages, with reason and attempts, no payload.
    let page = ops
        .list_dead_letters(ListDeadLettersRequest {
            subscription: "council.inbox".into(),
            limit: 2,
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.total, 3);
    let listed: Vec<u64> = page.dead_letters.iter().map(|d| d.sequence).collect();
    assert_eq!(listed, seqs[..2]);
    assert_eq!(page.next_after_sequence, seqs[1]);
    let d = &page.dead_letters[0];
    assert_eq!(d.reason, "max_deliveries");
    assert_eq!(d.attempts, 1);
    assert_eq!(d.sender, "police");
    assert_eq!(d.message_type, TYPE);
    assert_eq!(d.correlation_id, "case-poison 1");
    assert_eq!(d.message_id, first[0].envelope.as_ref().unwrap().message_id);
    assert!(d.dead_lettered_at.is_some() && d.published_at.is_some());
    assert_eq!(d.payload_bytes, payload("poison 1").len() as u64);
    let rest = ops
        .list_dead_letters(ListDeadLettersRequest {
            subscription: "council.inbox".into(),
            limit: 2,
            after_sequence: page.next_after_sequence,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.dead_letters.len(), 1);
    assert_eq!(rest.dead_letters[0].sequence, seqs[2]);
    assert_eq!(rest.next_after_sequence, 0);

    // By sequence: the named one goes back; one that is not a dead letter is reported.
    let answer = ops
        .redrive_dead_letters(RedriveDeadLettersRequest {
            subscription: "council.inbox".into(),
            sequences: vec![seqs[0], 9_999],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.redriven, 1);
    assert_eq!(answer.sequences, [seqs[0]]);
    assert_eq!(answer.missing, [9_999]);
    assert_eq!(answer.remaining, 2);
    // The consumer already attached gets it again, from attempt 1.
    let again = inbox.next(WAIT).await.expect("redriven message delivered");
    assert_eq!(again.sequence, seqs[0]);
    assert_eq!(again.attempt, 1);
    assert_eq!(payload_of(&again), "poison 1");
    let s = stats(&mut ops, "council.inbox").await;
    assert_eq!((s.depth, s.dead_letters), (1, 2));
    inbox.ack(vec![again.delivery_id]).await;
    counts_become(&ops, "council.inbox", 0, 2).await;

    // All of them (empty list).
    let answer = ops
        .redrive_dead_letters(RedriveDeadLettersRequest {
            subscription: "council.inbox".into(),
            sequences: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.redriven, answer.remaining), (2, 0));
    assert_eq!(answer.sequences, seqs[1..]);
    let back = inbox.take(2, WAIT).await;
    let mut got: Vec<(u64, u32, String)> = back
        .iter()
        .map(|d| (d.sequence, d.attempt, payload_of(d)))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (seqs[1], 1, "poison 2".to_string()),
            (seqs[2], 1, "poison 3".to_string())
        ]
    );
    counts_become(&ops, "council.inbox", 2, 0).await;
    inbox
        .ack(back.iter().map(|d| d.delivery_id).collect())
        .await;
    counts_become(&ops, "council.inbox", 0, 0).await;
    // Nothing is delivered twice.
    assert!(inbox.next(Duration::from_millis(1500)).await.is_none());
    inbox.close().await;
    archive.close().await;

    let data = broker.data_dir();
    let (_tmp, _pki) = broker.stop().await;
    // Listing dead letters shows their headers: audited as peeks.
    assert_eq!(
        audited(&data, "peek"),
        [
            ("ops".to_string(), "council.inbox".to_string(), 2),
            ("ops".to_string(), "council.inbox".to_string(), 1),
        ]
    );
    let mut redrives = audited(&data, "redrive");
    redrives.sort();
    assert_eq!(
        redrives,
        [
            ("ops".to_string(), "council.inbox".to_string(), 1),
            ("ops".to_string(), "council.inbox".to_string(), 2),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_confirmation_and_nothing_purged_is_delivered_afterwards() {
    let broker = start().await;
    let mut ops = admin(&broker, "ops").await;
    let mut police = broker.client("police").await;
    for i in 0..20 {
        publish(&mut police, envelope(&format!("m{i}")))
            .await
            .unwrap();
    }
    let mut council = broker.client("council").await;
    // An attached consumer with two deliveries in flight.
    let mut archive = TestConsumer::open(&mut council, "council.archive", 2)
        .await
        .unwrap();
    let held = archive.take(2, WAIT).await;
    counts_become(&ops, "council.archive", 20, 0).await;

    for confirm in ["", "council.inbox", "yes"] {
        let err = ops
            .purge_subscription(PurgeSubscriptionRequest {
                subscription: "council.archive".into(),
                confirm: confirm.into(),
            })
            .await
            .expect_err("an unconfirmed purge must be refused");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(reason(&err), "purge_not_confirmed");
        assert!(err.message().contains("confirm"), "{}", err.message());
    }
    assert_eq!(stats(&mut ops, "council.archive").await.depth, 20);

    let purged = ops
        .purge_subscription(PurgeSubscriptionRequest {
            subscription: "council.archive".into(),
            confirm: "council.archive".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 20);
    let s = stats(&mut ops, "council.archive").await;
    assert_eq!((s.depth, s.dead_letters), (0, 0));

    // Past the ack deadline the two it held do not come back, nor does
    // anything else purged; their acks are ignored.
    assert!(
        archive.next(Duration::from_millis(2500)).await.is_none(),
        "nothing purged is delivered"
    );
    archive
        .ack(held.iter().map(|d| d.delivery_id).collect())
        .await;
    let peeked = ops
        .peek_messages(PeekMessagesRequest {
            subscription: "council.archive".into(),
            limit: 10,
            include_payload: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(peeked.messages.is_empty());

    // The same consumer gets what is published afterwards, and only that.
    let fresh = publish(&mut police, envelope("after the purge"))
        .await
        .unwrap()
        .sequence;
    let d = archive.next(WAIT).await.expect("new message delivered");
    assert_eq!((d.sequence, d.attempt), (fresh, 1));
    assert_eq!(payload_of(&d), "after the purge");
    archive.ack(vec![d.delivery_id]).await;
    counts_become(&ops, "council.archive", 0, 0).await;

    // The other subscription of the topic still has every message: purging
    // one subscription released no copy another still needed.
    let mut inbox = TestConsumer::open(&mut council, "council.inbox", 100)
        .await
        .unwrap();
    let all = inbox.take(21, WAIT).await;
    let texts: Vec<String> = all.iter().map(payload_of).collect();
    assert_eq!(texts[0], "m0");
    assert_eq!(texts[20], "after the purge");
    inbox.ack(all.iter().map(|d| d.delivery_id).collect()).await;
    counts_become(&ops, "council.inbox", 0, 0).await;

    // Purging an empty subscription is fine (and audited too).
    let purged = ops
        .purge_subscription(PurgeSubscriptionRequest {
            subscription: "council.archive".into(),
            confirm: "council.archive".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 0);
    // An unknown subscription is NOT_FOUND.
    let err = ops
        .purge_subscription(PurgeSubscriptionRequest {
            subscription: "no.such".into(),
            confirm: "no.such".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    inbox.close().await;
    archive.close().await;

    let data = broker.data_dir();
    let (_tmp, _pki) = broker.stop().await;
    assert_eq!(
        audited(&data, "purge"),
        [
            ("ops".to_string(), "council.archive".to_string(), 20),
            ("ops".to_string(), "council.archive".to_string(), 0),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_shows_headers_and_payloads_only_to_a_cleared_operator() {
    let broker = start().await;
    let mut police = broker.client("police").await;
    let mut env = envelope("sensitive detail");
    env.marking = Marking::OfficialSensitive as i32;
    env.correlation_id = "case-42".into();
    env.headers.insert("priority".into(), "high".into());
    env.recipients = vec!["council".into()];
    let seq = police
        .publish(joinery::proto::PublishRequest {
            topic: "referral.marac".into(),
            envelope: Some(env),
        })
        .await
        .unwrap()
        .into_inner()
        .sequence;

    let peek = |include_payload| PeekMessagesRequest {
        subscription: "council.marac".into(),
        limit: 5,
        include_payload,
    };
    let mut ops = admin(&broker, "ops").await;
    let headers = ops.peek_messages(peek(false)).await.unwrap().into_inner();
    assert_eq!(headers.messages.len(), 1);
    let m = &headers.messages[0];
    assert_eq!((m.sequence, m.attempts), (seq, 0));
    assert_eq!(m.payload_bytes, payload("sensitive detail").len() as u64);
    let e = m.envelope.as_ref().unwrap();
    assert!(e.payload.is_empty(), "no payload unless asked for");
    assert_eq!(e.sender, "police");
    assert_eq!(e.message_type, TYPE);
    assert_eq!(e.marking, Marking::OfficialSensitive as i32);
    assert_eq!(e.correlation_id, "case-42");
    assert_eq!(e.headers.get("priority").map(String::as_str), Some("high"));
    assert_eq!(e.recipients, ["council"]);
    assert!(e.created_at.is_some() && m.published_at.is_some());

    // Payloads: refused to an operator without clearance for the topic...
    let err = ops.peek_messages(peek(true)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason(&err), "insufficient_clearance");
    // ...shown to one with it.
    let mut cleared = admin(&broker, "ops-cleared").await;
    let full = cleared
        .peek_messages(peek(true))
        .await
        .unwrap()
        .into_inner();
    let e = full.messages[0].envelope.as_ref().unwrap();
    assert_eq!(text_of(&e.payload), "sensitive detail");

    // An OFFICIAL topic's payloads are open to any operator.
    publish(&mut police, envelope("plain")).await.unwrap();
    let plain = ops
        .peek_messages(PeekMessagesRequest {
            subscription: "council.inbox".into(),
            limit: 0,
            include_payload: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        text_of(&plain.messages[0].envelope.as_ref().unwrap().payload),
        "plain"
    );

    // Peeking takes nothing: the owner still gets it, first time.
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.marac", 10)
        .await
        .unwrap();
    let d = c.next(WAIT).await.expect("delivered");
    assert_eq!((d.sequence, d.attempt), (seq, 1));
    c.ack(vec![d.delivery_id]).await;
    c.close().await;

    let data = broker.data_dir();
    let (_tmp, _pki) = broker.stop().await;
    assert_eq!(
        audited(&data, "peek"),
        [
            ("ops".to_string(), "council.marac".to_string(), 1),
            ("ops-cleared".to_string(), "council.marac".to_string(), 1),
            ("ops".to_string(), "council.inbox".to_string(), 1),
        ]
    );
}
