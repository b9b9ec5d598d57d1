//! Every limit is configurable and enforced with a clear RESOURCE_EXHAUSTED
//! or UNAVAILABLE, and the broker keeps serving.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(5);

fn reason(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("joinery-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subscription_refuses_publishes_until_it_drains() {
    let body = BODY.replacen(
        "max_deliveries = 3\n",
        "max_deliveries = 3\nmax_depth = 3\n",
        1,
    );
    let broker = TestBroker::start(&body).await;
    let mut police = broker.client("police").await;
    for i in 0..3 {
        publish(&mut police, envelope(&format!("m{i}")))
            .await
            .unwrap();
    }
    let err = publish(&mut police, envelope("one too many"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "subscription_full");
    assert!(err.message().contains("council.inbox"), "{}", err.message());

    // Draining one makes room for one.
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 1)
        .await
        .unwrap();
    let d = c.next(WAIT).await.unwrap();
    c.ack(vec![d.delivery_id]).await;
    eventually(WAIT, || {
        let mut police = police.clone();
        async move { publish(&mut police, envelope("fits now")).await.is_ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_the_agency_rate_are_refused() {
    let broker =
        TestBroker::start_with_env(BODY, &[("JOINERY_BROKER_MAX_PUBLISH_RATE", "5")]).await;
    let mut police = broker.client("police").await;
    let mut refused = None;
    let mut ok = 0;
    for i in 0..50 {
        match publish(&mut police, envelope(&format!("m{i}"))).await {
            Ok(_) => ok += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("the 5/s limit must refuse a burst of 50");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "rate_limited");
    // The startup probe in TestBroker used one token of the burst.
    assert!((3..=6).contains(&ok), "burst allowed {ok}");
    // Another agency has its own budget.
    let mut nhs = broker.client("nhs").await;
    publish(&mut nhs, envelope("nhs")).await.unwrap();
    // And the budget refills.
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish(&mut police, envelope("later")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agency_cannot_open_more_streams_than_allowed() {
    let broker =
        TestBroker::start_with_env(BODY, &[("JOINERY_BROKER_MAX_STREAMS_PER_AGENCY", "2")]).await;
    let mut council = broker.client("council").await;
    let a = TestConsumer::open(&mut council, "council.inbox", 1)
        .await
        .unwrap();
    let _b = TestConsumer::open(&mut council, "council.inbox", 1)
        .await
        .unwrap();
    let err = match TestConsumer::open(&mut council, "council.inbox", 1).await {
        Ok(_) => panic!("a third stream must be refused"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "too_many_streams");
    // Other agencies are unaffected; closing a stream frees its place.
    let mut fire = broker.client("fire").await;
    TestConsumer::open(&mut fire, "fire.inbox", 1)
        .await
        .unwrap();
    a.close().await;
    eventually(WAIT, || {
        let mut council = council.clone();
        async move {
            TestConsumer::open(&mut council, "council.inbox", 1)
                .await
                .is_ok()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_refuses_consumers_beyond_its_maximum() {
    let broker = TestBroker::start_with_env(
        BODY,
        &[("JOINERY_BROKER_MAX_CONSUMERS_PER_SUBSCRIPTION", "1")],
    )
    .await;
    let mut council = broker.client("council").await;
    let _a = TestConsumer::open(&mut council, "council.inbox", 1)
        .await
        .unwrap();
    let err = match TestConsumer::open(&mut council, "council.inbox", 1).await {
        Ok(_) => panic!("a second consumer must be refused"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "too_many_consumers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_disk_pauses_publishing_but_consumers_still_drain() {
    // A watermark no disk can meet: publishing pauses at once.
    let broker = TestBroker::start_with_env(
        BODY,
        &[("JOINERY_BROKER_MIN_FREE_DISK", "9000000000000000000")],
    )
    .await;
    let mut police = broker.client("police").await;
    let err = publish(&mut police, envelope("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason(&err), "disk_low");
    assert!(err.message().contains("nearly full"), "{}", err.message());
    // Consumers are still served.
    let mut council = broker.client("council").await;
    let mut c = TestConsumer::open(&mut council, "council.inbox", 1)
        .await
        .unwrap();
    assert!(c.next(Duration::from_millis(200)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_refused() {
    let broker =
        TestBroker::start_with_env(BODY, &[("JOINERY_BROKER_MAX_MESSAGE_BYTES", "2048")]).await;
    let mut police = broker.client("police").await;
    publish(&mut police, envelope(&"x".repeat(1500)))
        .await
        .unwrap();
    let err = publish(&mut police, envelope(&"x".repeat(2100)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "message_too_large");
    // Beyond the limit plus 64 KiB the frame is refused before it is decoded:
    // same code and reason.
    let err = publish(&mut police, envelope(&"x".repeat(200_000)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "message_too_large");
    publish(&mut police, envelope("still serving"))
        .await
        .unwrap();
}
