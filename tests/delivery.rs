//! Delivery semantics of design §4 over real mTLS, real sockets, real sled.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use joinery::storage::DeadReason;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_subscribe_ack_round_trip() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let mut council = broker.client("council").await;

    let mut env = envelope("referral for child A");
    env.correlation_id = "case-17".into();
    env.headers.insert("priority".into(), "high".into());
    let published = publish(&mut police, env).await.unwrap();
    assert_eq!(published.sequence, 1);
    assert!(!published.duplicate);
    assert!(
        !published.message_id.is_empty(),
        "broker chose a message id"
    );

    let mut consumer = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let d = consumer.next(WAIT).await.expect("delivery");
    let e = d.envelope.as_ref().unwrap();
    assert_eq!(d.sequence, 1);
    assert_eq!(d.attempt, 1);
    assert_eq!(d.subscription, "council.inbox");
    assert_eq!(d.topic, TOPIC);
    assert_eq!(e.sender, "police", "sender comes from the certificate");
    assert_eq!(e.message_id, published.message_id);
    assert_eq!(e.correlation_id, "case-17");
    assert_eq!(e.headers.get("priority").map(String::as_str), Some("high"));
    assert!(e.created_at.is_some());
    assert_eq!(payload_of(&d), "referral for child A");
    consumer.ack(vec![d.delivery_id]).await;
    consumer.close().await;

    // Acked: a new consumer gets nothing, even after the ack deadline.
    let mut again = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    assert!(again.next(Duration::from_millis(1500)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscription_of_a_topic_gets_every_message() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    for i in 0..5 {
        publish(&mut police, envelope(&format!("m{i}")))
            .await
            .unwrap();
    }
    for (agency, sub) in [("council", "council.inbox"), ("fire", "fire.inbox")] {
        let mut client = broker.client(agency).await;
        let mut c = TestConsumer::open(&mut client, sub, 10).await.unwrap();
        let got = c.take(5, WAIT).await;
        let payloads: Vec<String> = got.iter().map(payload_of).collect();
        assert_eq!(
            payloads,
            ["m0", "m1", "m2", "m3", "m4"],
            "{sub} in publish order"
        );
        c.ack(got.iter().map(|d| d.delivery_id).collect()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_a_subscription_without_duplicates() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let mut council = broker.client("council").await;
    let mut a = TestConsumer::open(&mut council, "council.inbox", 5)
        .await
        .unwrap();
    let mut b = TestConsumer::open(&mut council, "council.inbox", 5)
        .await
        .unwrap();
    const N: usize = 200;
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            publish(&mut police, envelope(&format!("m{i}")))
                .await
                .unwrap();
        }
    });
    let mut seen = Vec::new();
    let (mut from_a, mut from_b) = (0, 0);
    while seen.len() < N {
        tokio::select! {
            d = a.next(WAIT) => {
                let d = d.expect("consumer a starved");
                a.ack(vec![d.delivery_id]).await;
                from_a += 1;
                seen.push(d.sequence);
            }
            d = b.next(WAIT) => {
                let d = d.expect("consumer b starved");
                b.ack(vec![d.delivery_id]).await;
                from_b += 1;
                seen.push(d.sequence);
            }
        }
    }
    publisher.await.unwrap();
    let unique: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), N, "no duplicates while everything is acked");
    assert!(
        from_a > 0 && from_b > 0,
        "both consumers got work: {from_a}/{from_b}"
    );
    assert!(a.next(QUIET).await.is_none() && b.next(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_limit_delivery_to_their_subscriptions() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let mut only_fire = envelope("for fire only");
    only_fire.recipients = vec!["fire".into()];
    publish(&mut police, only_fire).await.unwrap();
    publish(&mut police, envelope("for everyone"))
        .await
        .unwrap();

    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let d = c.next(WAIT).await.unwrap();
    assert_eq!(payload_of(&d), "for everyone");
    assert!(
        c.next(QUIET).await.is_none(),
        "council must not see fire's message"
    );

    let mut fire = broker.client("fire").await;
    let mut f = TestConsumer::open(&mut fire, "fire.inbox", 10)
        .await
        .unwrap();
    let got: Vec<String> = f.take(2, WAIT).await.iter().map(payload_of).collect();
    assert_eq!(got, ["for fire only", "for everyone"]);

    // A recipient with no subscription on the topic is refused, not dropped.
    let mut to_nhs = envelope("x");
    to_nhs.recipients = vec!["nhs".into()];
    let err = publish(&mut police, to_nhs).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("recipient_not_subscribed"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivers_unacked_message_after_ack_deadline() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    publish(&mut police, envelope("please ack")).await.unwrap();
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let first = c.next(WAIT).await.unwrap();
    assert_eq!(first.attempt, 1);
    // Not acked: the 1s ack deadline passes and it comes again.
    let second = c.next(WAIT).await.expect("redelivery");
    assert_eq!(second.sequence, first.sequence);
    assert_eq!(second.attempt, 2);
    assert_ne!(second.delivery_id, first.delivery_id);
    // The stale delivery id no longer settles anything; the new one does.
    c.ack(vec![first.delivery_id, second.delivery_id]).await;
    assert!(c.next(Duration::from_millis(1500)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_single_acks_with_a_nack_among_them_settles_each_as_sent() {
    // The broker takes acks that arrive together as one batch: none may be
    // lost, and a nack in their midst must still requeue its message. (Ack
    // deadlines long enough that nothing is redelivered for being slow.)
    let broker = TestBroker::start(&BODY.replace("\"1s\"", "\"60s\"")).await;
    let mut police = broker.client("police").await;
    const N: usize = 200;
    for i in 0..N {
        publish(&mut police, envelope(&format!("m{i}")))
            .await
            .unwrap();
    }
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", N as u32)
        .await
        .unwrap();
    let got = c.take(N, WAIT).await;
    assert_eq!(got.len(), N);
    let nacked = got[N / 2].sequence;
    for d in &got {
        if d.sequence == nacked {
            c.nack(vec![d.delivery_id], Duration::ZERO).await;
        } else {
            c.ack(vec![d.delivery_id]).await;
        }
    }
    // Only the nacked message comes again.
    let again = c.next(WAIT).await.expect("the nacked message again");
    assert_eq!((again.sequence, again.attempt), (nacked, 2));
    assert!(c.next(QUIET).await.is_none(), "only the nacked one again");
    c.ack(vec![again.delivery_id]).await;
    c.close().await;
    let (store, _guards) = stop_and_open_store(broker).await;
    let sub = store.subscription("council.inbox").unwrap();
    assert_eq!(sub.depth(), 0, "every ack recorded");
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_delay_requeues_after_the_delay() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    publish(&mut police, envelope("try later")).await.unwrap();
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let first = c.next(WAIT).await.unwrap();
    let nacked_at = tokio::time::Instant::now();
    c.nack(vec![first.delivery_id], Duration::from_millis(700))
        .await;
    let again = c.next(WAIT).await.expect("requeued");
    let waited = nacked_at.elapsed();
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(again.attempt, 2);
    assert!(
        waited >= Duration::from_millis(650),
        "came back after {waited:?}"
    );
    c.ack(vec![again.delivery_id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_after_max_deliveries() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    publish(&mut police, envelope("poison")).await.unwrap();
    publish(&mut police, envelope("fine")).await.unwrap();
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let mut poison_attempts = Vec::new();
    // max_deliveries = 3: nack "poison" each time, ack "fine".
    while let Some(d) = c.next(Duration::from_secs(2)).await {
        if payload_of(&d) == "poison" {
            poison_attempts.push(d.attempt);
            c.nack(vec![d.delivery_id], Duration::ZERO).await;
        } else {
            c.ack(vec![d.delivery_id]).await;
        }
    }
    assert_eq!(poison_attempts, [1, 2, 3]);
    c.close().await;
    let config = broker.config.clone();
    let data = broker.data_dir();
    let (_tmp, _pki) = broker.stop().await;
    let store = open_store(&data, &config);
    let sub = store.subscription("council.inbox").unwrap();
    let dead = store.dead_letters(&sub, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadReason::MaxDeliveries);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(sub.depth(), 0);
    assert_eq!(sub.dead_letters(), 1);
    store.close().await.unwrap();
}

/// A consumer of `council.inbox` gets exactly one message, `payload`, and acks it.
async fn council_receives_only(broker: &TestBroker, payload: &str) {
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let d = c.next(WAIT).await.unwrap();
    assert_eq!(payload_of(&d), payload);
    c.ack(vec![d.delivery_id]).await;
    assert!(c.next(QUIET).await.is_none());
    c.close().await;
}

/// Stops the broker and opens its store; keep the guards while it is used.
async fn stop_and_open_store(
    broker: TestBroker,
) -> (
    joinery::storage::Store,
    (std::sync::Arc<tempfile::TempDir>, std::sync::Arc<TestPki>),
) {
    let config = broker.config.clone();
    let data = broker.data_dir();
    let guards = broker.stop().await;
    (open_store(&data, &config), guards)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dead_lettered_and_never_delivered() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let mut short = envelope("expires soon");
    let at = std::time::SystemTime::now() + Duration::from_millis(800);
    short.expires_at = Some(at.into());
    publish(&mut police, short).await.unwrap();
    publish(&mut police, envelope("keeps")).await.unwrap();

    // In the past at publish time: refused outright.
    let mut stale = envelope("already expired");
    stale.expires_at = Some((std::time::SystemTime::now() - Duration::from_secs(1)).into());
    let err = publish(&mut police, stale).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // No consumer while it expires: the sweep dead-letters it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    council_receives_only(&broker, "keeps").await;

    let (store, _guards) = stop_and_open_store(broker).await;
    for name in ["council.inbox", "fire.inbox"] {
        let sub = store.subscription(name).unwrap();
        let dead = store.dead_letters(&sub, 10).unwrap();
        assert_eq!(dead.len(), 1, "{name}");
        assert_eq!(dead[0].reason, DeadReason::Expired, "{name}");
    }
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_retention_expires_messages_nobody_consumed() {
    // Retention-expiry has no index entry: the sweep walks the topic in order.
    let body = BODY.replace(
        "subscribers = [\"council\", \"fire\"]\n",
        "subscribers = [\"council\", \"fire\"]\nretention = \"1s\"\n",
    );
    assert!(body.contains("retention = \"1s\""));
    let broker = TestBroker::start(&body).await;
    let mut police = broker.client("police").await;
    let mut early = envelope("expires_at before the retention");
    early.expires_at = Some((std::time::SystemTime::now() + Duration::from_millis(500)).into());
    for env in [envelope("old 1"), early, envelope("old 2")] {
        publish(&mut police, env).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    publish(&mut police, envelope("fresh")).await.unwrap();
    council_receives_only(&broker, "fresh").await;

    let (store, _guards) = stop_and_open_store(broker).await;
    for name in ["council.inbox", "fire.inbox"] {
        let sub = store.subscription(name).unwrap();
        let dead = store.dead_letters(&sub, 10).unwrap();
        let seqs: Vec<u64> = dead.iter().map(|d| d.message.seq).collect();
        assert_eq!(seqs, [1, 2, 3], "{name}");
        assert!(
            dead.iter().all(|d| d.reason == DeadReason::Expired),
            "{name}"
        );
    }
    // Every copy of the expired messages is gone, and no expiry entry is left.
    let topic = store.topic(TOPIC).unwrap();
    for seq in 1..=3 {
        assert!(store.load_message(topic.id, seq).unwrap().is_none());
    }
    // (Delivery reports to the senders keep theirs: they expire by expires_at.)
    let expiry_entries = store
        .db()
        .scan_prefix([joinery::storage::keys::EXPIRY])
        .filter_map(|kv| joinery::storage::keys::parse_expiry(&kv.unwrap().0))
        .filter(|(_, t, _)| *t == topic.id)
        .count();
    assert_eq!(expiry_entries, 0);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republishing_a_message_id_returns_the_original_sequence() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    let mut nhs = broker.client("nhs").await;
    let mut env = envelope("once");
    env.message_id = "01J9Z8Q4W5X6Y7Z8A9B0C1D2E3".into();
    let first = publish(&mut police, env.clone()).await.unwrap();
    publish(&mut police, envelope("other")).await.unwrap();
    let again = publish(&mut police, env.clone()).await.unwrap();
    assert_eq!((again.sequence, again.duplicate), (first.sequence, true));
    // Same id from another sender is another message.
    let from_nhs = publish(&mut nhs, env).await.unwrap();
    assert!(!from_nhs.duplicate);
    assert_ne!(from_nhs.sequence, first.sequence);

    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let got: Vec<String> = c.take(3, WAIT).await.iter().map(payload_of).collect();
    assert_eq!(got, ["once", "other", "once"]);
    assert!(
        c.next(QUIET).await.is_none(),
        "the duplicate stored nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_in_one_group_commit_store_one_message() {
    let broker = TestBroker::start(BODY).await;
    let police = broker.client("police").await;
    let mut env = envelope("raced");
    env.message_id = "same-id".into();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut client = police.clone();
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            publish(&mut client, env).await.unwrap()
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let seqs: HashSet<u64> = results.iter().map(|r| r.sequence).collect();
    assert_eq!(seqs.len(), 1, "one sequence for all: {results:?}");
    assert_eq!(results.iter().filter(|r| !r.duplicate).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_never_exceeds_max_in_flight_and_credit() {
    // Ack deadlines long enough that nothing is redelivered during the test.
    let broker = TestBroker::start(&BODY.replace("\"1s\"", "\"60s\"")).await;
    let mut police = broker.client("police").await;
    for i in 0..10 {
        publish(&mut police, envelope(&format!("m{i}")))
            .await
            .unwrap();
    }
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 3)
        .await
        .unwrap();
    let first = c.take(3, WAIT).await;
    assert!(c.next(QUIET).await.is_none(), "max_in_flight = 3 reached");
    c.ack(vec![first[0].delivery_id]).await;
    let one_more = c.take(1, WAIT).await;
    assert_eq!(one_more[0].sequence, 4);
    assert!(c.next(QUIET).await.is_none());
    drop(c);

    // Credit mode: 2 up front, then only what is granted.
    let mut fire = broker.client("fire").await;
    let mut f = TestConsumer::open_with(&mut fire, "fire.inbox", 100, Some(2))
        .await
        .unwrap();
    let got = f.take(2, WAIT).await;
    f.ack(got.iter().map(|d| d.delivery_id).collect()).await;
    assert!(f.next(QUIET).await.is_none(), "credit exhausted");
    f.credit(3).await;
    let got = f.take(3, WAIT).await;
    assert_eq!(
        got.iter().map(|d| d.sequence).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert!(f.next(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_deliveries_of_a_departed_consumer_go_to_another() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    publish(&mut police, envelope("m")).await.unwrap();
    let mut council = broker.client("council").await;
    let mut a = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let d = a.next(WAIT).await.unwrap();
    drop(a); // leaves without acking
    let mut b = TestConsumer::open(&mut council, "council.inbox", 10)
        .await
        .unwrap();
    let again = b.next(WAIT).await.expect("redelivered to b");
    assert_eq!((again.sequence, again.attempt), (d.sequence, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_every_unacked_message_in_order() {
    let broker = TestBroker::start(BODY).await;
    let mut police = broker.client("police").await;
    for i in 0..50 {
        publish(&mut police, envelope(&format!("m{i}")))
            .await
            .unwrap();
    }
    // Ack the first ten, leave one in flight unacked.
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 11)
        .await
        .unwrap();
    let got = c.take(11, WAIT).await;
    c.ack(got[..10].iter().map(|d| d.delivery_id).collect())
        .await;
    c.close().await;
    let (tmp, pki) = broker.stop().await;

    let broker = TestBroker::start_in(tmp, pki, BODY).await;
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 100)
        .await
        .unwrap();
    let got = c.take(40, WAIT).await;
    let payloads: Vec<String> = got.iter().map(payload_of).collect();
    let expected: Vec<String> = (10..50).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads, expected);
    assert!(c.next(QUIET).await.is_none());
    // Sequences continue after a restart.
    let next = publish(&mut police_again(&broker).await, envelope("after"))
        .await
        .unwrap();
    assert_eq!(next.sequence, 51);
}

async fn police_again(
    broker: &TestBroker,
) -> joinery::proto::broker_client::BrokerClient<tonic::transport::Channel> {
    broker.client("police").await
}
