//! Access control of design §5: topic access lists with globs, protective
//! markings and clearances, the Admin service for operators only, and
//! refusals that name the rule, are counted and are audited.

mod common;

use std::time::Duration;

use common::*;
use joinery::config::Config;
use joinery::proto::admin_client::AdminClient;
use joinery::proto::{GetStatsRequest, ListTopicsRequest, Marking, PublishRequest};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(5);

/// Police and fire forces by glob, councils by glob, and a sensitive topic.
const GLOB_BODY: &str = r#"
[[agency]]
id = "police-west-yorkshire"
[[agency]]
id = "police-north-wales"
[[agency]]
id = "fire-west-yorkshire"
[[agency]]
id = "council-leeds"
clearance = "OFFICIAL_SENSITIVE"
[[agency]]
id = "council-york"
[[agency]]
id = "ops"

[[topic]]
name = "referral.safeguarding"
publishers = ["police-*"]
subscribers = ["council-*"]

[[topic]]
name = "referral.marac"
publishers = ["police-*"]
subscribers = ["council-leeds"]
max_marking = "OFFICIAL_SENSITIVE"

[[subscription]]
name = "leeds.safeguarding"
topic = "referral.safeguarding"
owner = "council-leeds"

[[subscription]]
name = "leeds.marac"
topic = "referral.marac"
owner = "council-leeds"
"#;

const OPERATORS: &str = r#"operators = ["ops"]"#;

fn reason(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("joinery-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn publish_to(
    broker: &TestBroker,
    agency: &str,
    topic: &str,
    marking: Marking,
) -> Result<u64, tonic::Status> {
    let mut client = broker.client(agency).await;
    let mut env = envelope("x");
    env.message_type = TYPE.into();
    env.marking = marking as i32;
    client
        .publish(PublishRequest {
            topic: topic.into(),
            envelope: Some(env),
        })
        .await
        .map(|r| r.into_inner().sequence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_access_lists_allow_and_deny_as_configured() {
    let broker = TestBroker::start_with(GLOB_BODY, OPERATORS, &[]).await;
    // police-* matches both forces.
    for force in ["police-west-yorkshire", "police-north-wales"] {
        publish_to(
            &broker,
            force,
            "referral.safeguarding",
            Marking::Unspecified,
        )
        .await
        .unwrap_or_else(|e| panic!("{force} is a publisher: {e}"));
    }
    // fire-* is not in the list: refused, naming the rule.
    let err = publish_to(
        &broker,
        "fire-west-yorkshire",
        "referral.safeguarding",
        Marking::Unspecified,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason(&err), "not_a_publisher");
    assert!(
        err.message().contains("police-*"),
        "names the rule: {}",
        err.message()
    );

    // Only the owner may consume; another council is refused.
    let mut york = broker.client("council-york").await;
    let err = match TestConsumer::open(&mut york, "leeds.safeguarding", 1).await {
        Ok(_) => panic!("council-york must not read council-leeds' subscription"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason(&err), "not_subscription_owner");
    let mut leeds = broker.client("council-leeds").await;
    let mut c = TestConsumer::open(&mut leeds, "leeds.safeguarding", 10)
        .await
        .unwrap();
    let got = c.take(2, WAIT).await;
    let senders: Vec<String> = got
        .iter()
        .map(|d| d.envelope.as_ref().unwrap().sender.clone())
        .collect();
    assert_eq!(senders, ["police-west-yorkshire", "police-north-wales"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marking_above_the_topic_maximum_is_refused() {
    let broker = TestBroker::start_with(GLOB_BODY, OPERATORS, &[]).await;
    let err = publish_to(
        &broker,
        "police-north-wales",
        "referral.safeguarding",
        Marking::OfficialSensitive,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason(&err), "marking_above_topic");
    assert!(err.message().contains("OFFICIAL_SENSITIVE") && err.message().contains("max_marking"));

    // The sensitive topic takes it, and the cleared owner receives it marked.
    publish_to(
        &broker,
        "police-north-wales",
        "referral.marac",
        Marking::OfficialSensitive,
    )
    .await
    .unwrap();
    // Unset means OFFICIAL, and says so on delivery.
    publish_to(
        &broker,
        "police-north-wales",
        "referral.marac",
        Marking::Unspecified,
    )
    .await
    .unwrap();
    let mut leeds = broker.client("council-leeds").await;
    let mut c = TestConsumer::open(&mut leeds, "leeds.marac", 10)
        .await
        .unwrap();
    let got = c.take(2, WAIT).await;
    let markings: Vec<i32> = got
        .iter()
        .map(|d| d.envelope.as_ref().unwrap().marking)
        .collect();
    assert_eq!(
        markings,
        [Marking::OfficialSensitive as i32, Marking::Official as i32]
    );

    // A marking value that does not exist is invalid, not silently OFFICIAL.
    let mut client = broker.client("police-north-wales").await;
    let mut env = envelope("x");
    env.message_type = TYPE.into();
    env.marking = 7;
    let err = client
        .publish(PublishRequest {
            topic: "referral.marac".into(),
            envelope: Some(env),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[test]
fn an_under_cleared_owner_is_rejected_at_config_load() {
    let body = GLOB_BODY.replace(
        "id = \"council-leeds\"\nclearance = \"OFFICIAL_SENSITIVE\"",
        "id = \"council-leeds\"",
    );
    let text = config_text(std::path::Path::new("/tmp/unused"), &body);
    let errors = Config::load_str(&text, Vec::<(String, String)>::new())
        .expect_err("an owner without clearance for the topic must be refused");
    let all = errors.to_string();
    assert!(
        all.contains("leeds.marac")
            && all.contains("clearance OFFICIAL")
            && all.contains("OFFICIAL_SENSITIVE"),
        "{all}"
    );
}

#[test]
fn config_refuses_unknown_agencies_in_access_lists_and_operators() {
    let body = GLOB_BODY.replace("publishers = [\"police-*\"]\nsubscribers = [\"council-*\"]",
        "publishers = [\"police-*\", \"police-nowhere\"]\nsubscribers = [\"ambulance-*\", \"council-*\"]");
    let body = format!("{body}\n[[identity]]\nsubject = \"no equals sign\"\nagency = \"ops\"\n");
    let text = config_text_with(
        std::path::Path::new("/tmp/unused"),
        "operators = [\"nobody\"]",
        &body,
    );
    let all = Config::load_str(&text, Vec::<(String, String)>::new())
        .expect_err("must be refused")
        .to_string();
    for needle in ["police-nowhere", "ambulance-*", "nobody", "no equals sign"] {
        assert!(all.contains(needle), "{needle} reported: {all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_service_is_for_operators_only() {
    let broker = TestBroker::start_with(GLOB_BODY, OPERATORS, &[]).await;
    let ops = broker
        .channel(
            Some({
                let c = broker.pki.agency("ops");
                (c.cert_pem, c.key_pem)
            }),
            &broker.pki.ca_pem,
        )
        .await
        .unwrap();
    let mut admin = AdminClient::new(ops);
    let topics = admin
        .list_topics(ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = topics.topics.iter().map(|t| t.name.as_str()).collect();
    // The configured topics, then every agency's delivery-report topic.
    assert_eq!(names[..2], ["referral.safeguarding", "referral.marac"]);
    assert!(names.contains(&"reports.council-leeds"), "{names:?}");

    for agency in ["council-leeds", "police-north-wales"] {
        let c = broker.pki.agency(agency);
        let channel = broker
            .channel(Some((c.cert_pem, c.key_pem)), &broker.pki.ca_pem)
            .await
            .unwrap();
        let mut not_ops = AdminClient::new(channel);
        let err = not_ops.get_stats(GetStatsRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{agency}");
        assert_eq!(reason(&err), "not_an_operator");
        let err = not_ops.list_topics(ListTopicsRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{agency}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_and_audited() {
    let broker = TestBroker::start_with(GLOB_BODY, OPERATORS, &[]).await;
    for _ in 0..3 {
        publish_to(
            &broker,
            "fire-west-yorkshire",
            "referral.safeguarding",
            Marking::Unspecified,
        )
        .await
        .unwrap_err();
    }
    publish_to(
        &broker,
        "police-north-wales",
        "referral.safeguarding",
        Marking::OfficialSensitive,
    )
    .await
    .unwrap_err();
    let c = broker.pki.agency("ops");
    let channel = broker
        .channel(Some((c.cert_pem, c.key_pem)), &broker.pki.ca_pem)
        .await
        .unwrap();
    let stats = AdminClient::new(channel)
        .get_stats(GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    let count = |r: &str| {
        stats
            .refusals
            .iter()
            .find(|c| c.reason == r)
            .map(|c| c.count)
    };
    assert_eq!(count("not_a_publisher"), Some(3));
    assert_eq!(count("marking_above_topic"), Some(1));

    let data = broker.data_dir();
    let (_tmp, _pki) = broker.stop().await;
    let db = joinery::storage::open_existing(&data).unwrap();
    let mut denied = Vec::new();
    joinery::audit::export(&db, &data, 0, None, |r| {
        if r.event == "denied" {
            denied.push((r.agency, r.topic, r.reason));
        }
        Ok(())
    })
    .unwrap();
    // (The harness's readiness probe is an audited refusal too.)
    denied.retain(|(agency, _, _)| !agency.starts_with("unidentified@"));
    assert_eq!(denied.len(), 4, "{denied:?}");
    assert!(denied.contains(&(
        "fire-west-yorkshire".into(),
        "referral.safeguarding".into(),
        "not_a_publisher".into()
    )));
}
