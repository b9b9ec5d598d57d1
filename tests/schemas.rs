//! The schema registry of design §6 (issue 4): the standard library's
//! examples validate and round-trip, every kind of rule refuses a payload that
//! breaks it (in-process with the exact field path and rule id, and through a
//! real broker), topics refuse types they do not list, the Schemas service
//! registers packages and refuses breaking changes, registered schemas survive
//! a restart, and `joinery schema check` reports what it finds.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use joinery::proto::schemas_client::SchemasClient;
use joinery::proto::{
    validate_message_request::Payload, Envelope, GetSchemaRequest, ListSchemasRequest, ProtoFile,
    PublishRequest, RegisterSchemaRequest, SchemaPackage, ValidateMessageRequest,
};
use joinery::schema::{FieldViolation, Registry, SchemaError};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(5);

const EXAMPLES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/broker-config/examples");

/// Every example file (without `.json`) and its message type, as
/// `broker-config/examples/README.md` maps them.
const EXAMPLES: [(&str, &str); 11] = [
    (
        "safeguarding_referral",
        "interop.referral.v1.SafeguardingReferral",
    ),
    ("marac_referral", "interop.referral.v1.MaracReferral"),
    (
        "child_protection_plan_notice",
        "interop.care.v1.ChildProtectionPlanNotice",
    ),
    (
        "unscheduled_care_attendance_notice",
        "interop.care.v1.UnscheduledCareAttendanceNotice",
    ),
    ("assessment_notice", "interop.care.v1.AssessmentNotice"),
    ("discharge_notice", "interop.care.v1.DischargeNotice"),
    ("withdrawal_notice", "interop.care.v1.WithdrawalNotice"),
    (
        "incident_notification",
        "interop.incident.v1.IncidentNotification",
    ),
    (
        "home_fire_safety_referral",
        "interop.incident.v1.HomeFireSafetyReferral",
    ),
    ("case_update", "interop.case.v1.CaseUpdate"),
    (
        "business_acknowledgement",
        "interop.case.v1.BusinessAcknowledgement",
    ),
];

/// A broker whose `any` topic accepts every registered type, whose
/// `referral.safeguarding` accepts only safeguarding referrals, with "ops" as
/// its operator.
const BODY: &str = r#"
[[agency]]
id = "police"
[[agency]]
id = "council"
[[agency]]
id = "ops"

[[topic]]
name = "any"
publishers = ["police"]
subscribers = ["council"]

[[topic]]
name = "referral.safeguarding"
message_types = ["interop.referral.v1.SafeguardingReferral"]
publishers = ["police"]
subscribers = ["council"]

[[subscription]]
name = "council.any"
topic = "any"
owner = "council"
ack_deadline = "30s"
"#;

const OPERATORS: &str = r#"operators = ["ops"]"#;

// ---------------------------------------------------------------------------
// Helpers

/// The registry with the standard library only, built once.
fn library() -> &'static Registry {
    static LIBRARY: OnceLock<Registry> = OnceLock::new();
    LIBRARY.get_or_init(|| Registry::load(&[], Vec::new()).expect("standard library loads"))
}

fn type_of(example: &str) -> &'static str {
    EXAMPLES
        .iter()
        .find(|(file, _)| *file == example)
        .unwrap_or_else(|| panic!("no example {example}"))
        .1
}

fn example_text(example: &str) -> String {
    std::fs::read_to_string(format!("{EXAMPLES_DIR}/{example}.json"))
        .unwrap_or_else(|e| panic!("{example}.json: {e}"))
}

fn example(example: &str) -> Value {
    serde_json::from_str(&example_text(example)).unwrap()
}

/// Applies JSON-pointer edits: each key is replaced by its value, or removed
/// when the value is `null`. Panics when an edit has nothing to act on.
fn edited(mut doc: Value, edits: &Value) -> Value {
    let before = doc.clone();
    for (pointer, value) in edits.as_object().expect("edits are an object") {
        let (parent, last) = pointer.rsplit_once('/').unwrap();
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("no {parent} to edit"));
        match (target, value) {
            (Value::Object(o), Value::Null) => {
                o.remove(last)
                    .unwrap_or_else(|| panic!("no {pointer} to remove"));
            }
            (Value::Object(o), v) => {
                o.insert(last.to_string(), v.clone());
            }
            (Value::Array(a), v) => {
                let i: usize = last.parse().unwrap();
                if i == a.len() {
                    a.push(v.clone());
                } else {
                    a[i] = v.clone();
                }
            }
            _ => panic!("cannot edit {pointer}"),
        }
    }
    assert_ne!(doc, before, "the edits {edits} change nothing");
    doc
}

/// Protobuf encoding of `json` as `message_type`, without validating it (as a
/// producer that skips validation would send it).
fn encode_unchecked(message_type: &str, json: &Value) -> Vec<u8> {
    let descriptor = library().snapshot().message(message_type).unwrap();
    DynamicMessage::deserialize(descriptor, json.clone())
        .unwrap_or_else(|e| panic!("{message_type}: {e}"))
        .encode_to_vec()
}

fn violations(result: Result<DynamicMessage, SchemaError>) -> Vec<FieldViolation> {
    match result {
        Err(SchemaError::Invalid { violations, .. }) => violations,
        Err(other) => panic!("expected rule violations, got {other}"),
        // (Not `{message:?}`: a recursive type's descriptor never ends.)
        Ok(message) => panic!(
            "expected rule violations, got a valid message: {}",
            serde_json::to_string(&message).unwrap_or_default()
        ),
    }
}

fn reason(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("joinery-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn channel_for(broker: &TestBroker, agency: &str) -> Channel {
    let cert = broker.pki.agency(agency);
    broker
        .channel(Some((cert.cert_pem, cert.key_pem)), &broker.pki.ca_pem)
        .await
        .expect("connect")
}

async fn schemas(broker: &TestBroker, agency: &str) -> SchemasClient<Channel> {
    SchemasClient::new(channel_for(broker, agency).await)
}

async fn publish_to(
    broker: &TestBroker,
    topic: &str,
    message_type: &str,
    payload: Vec<u8>,
) -> Result<u64, tonic::Status> {
    let mut client = broker.client("police").await;
    client
        .publish(PublishRequest {
            topic: topic.into(),
            envelope: Some(Envelope {
                message_type: message_type.into(),
                payload: payload.into(),
                ..Default::default()
            }),
        })
        .await
        .map(|r| r.into_inner().sequence)
}

// ---------------------------------------------------------------------------
// The examples

#[test]
fn every_example_is_listed_in_the_readme_and_covered_here() {
    let readme = std::fs::read_to_string(format!("{EXAMPLES_DIR}/README.md")).unwrap();
    let mut listed = BTreeMap::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('`').collect();
        if cells.len() >= 5 && cells[1].ends_with(".json") {
            listed.insert(
                cells[1].trim_end_matches(".json").to_string(),
                cells[3].to_string(),
            );
        }
    }
    let ours: BTreeMap<String, String> = EXAMPLES
        .iter()
        .map(|(f, t)| (f.to_string(), t.to_string()))
        .collect();
    assert_eq!(listed, ours, "README's table and this test's list differ");
    let on_disk: BTreeSet<String> = std::fs::read_dir(EXAMPLES_DIR)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|name| name.strip_suffix(".json").map(str::to_string))
        .collect();
    assert_eq!(on_disk, ours.keys().cloned().collect::<BTreeSet<_>>());
}

#[test]
fn every_example_validates_and_round_trips_json_protobuf_json() {
    let snapshot = library().snapshot();
    for (file, message_type) in EXAMPLES {
        let text = example_text(file);
        let message = snapshot
            .from_json(message_type, &text)
            .unwrap_or_else(|e| panic!("{file}.json: {e}"));
        assert_eq!(message.descriptor().full_name(), message_type);
        let bytes = message.encode_to_vec();
        let decoded = snapshot
            .validate(message_type, &bytes)
            .unwrap_or_else(|e| panic!("{file}.json as protobuf: {e}"));
        assert_eq!(
            decoded.encode_to_vec(),
            bytes,
            "{file}: re-encoding differs"
        );
        let back = serde_json::to_value(&decoded).unwrap();
        let original: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, original, "{file}.json does not round-trip");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_is_published_and_delivered_unchanged() {
    let broker = TestBroker::start(BODY).await;
    let mut sent = Vec::new();
    for (file, message_type) in EXAMPLES {
        let payload = encode_unchecked(message_type, &example(file));
        publish_to(&broker, "any", message_type, payload.clone())
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        sent.push((message_type.to_string(), payload));
    }
    // The listing topic takes its own type.
    let referral = encode_unchecked(
        type_of("safeguarding_referral"),
        &example("safeguarding_referral"),
    );
    publish_to(
        &broker,
        "referral.safeguarding",
        type_of("safeguarding_referral"),
        referral,
    )
    .await
    .unwrap();

    let mut council = broker.client("council").await;
    let mut consumer = TestConsumer::open(&mut council, "council.any", 64)
        .await
        .unwrap();
    let got: Vec<(String, Vec<u8>)> = consumer
        .take(sent.len(), WAIT)
        .await
        .into_iter()
        .map(|d| {
            let e = d.envelope.unwrap();
            (e.message_type, e.payload.to_vec())
        })
        .collect();
    assert_eq!(got, sent, "payloads arrive byte for byte, in order");
}

// ---------------------------------------------------------------------------
// Every rule kind

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Valid after the edit (a boundary that must still pass).
    Valid,
    /// Refused with exactly this field path ("" = the message itself) and
    /// this rule id among the violations.
    Refused(&'static str, &'static str),
    /// Not even valid protobuf JSON.
    BadJson,
}
use Expect::*;

struct Case {
    example: &'static str,
    name: &'static str,
    edits: Value,
    expect: Expect,
}

fn c(example: &'static str, name: &'static str, edits: Value, expect: Expect) -> Case {
    Case {
        example,
        name,
        edits,
        expect,
    }
}

/// Edits of the examples, each breaking one rule (or probing a boundary
/// that must pass). Field paths use proto names; list items are `[i]`; a
/// message-level rule reports the path of its message ("" at the root).
fn cases() -> Vec<Case> {
    vec![
        c(
            "safeguarding_referral",
            "required string",
            json!({"/referralReference": ""}),
            Refused("referral_reference", "required"),
        ),
        c(
            "safeguarding_referral",
            "required message",
            json!({"/subject": null}),
            Refused("subject", "required"),
        ),
        c(
            "safeguarding_referral",
            "required timestamp",
            json!({"/referredAt": null}),
            Refused("referred_at", "required"),
        ),
        c(
            "safeguarding_referral",
            "enum unspecified",
            json!({"/subjectKind": "SUBJECT_KIND_UNSPECIFIED"}),
            Refused("subject_kind", "enum.not_in"),
        ),
        c(
            "safeguarding_referral",
            "enum undefined number",
            json!({"/subjectKind": 99}),
            Refused("subject_kind", "enum.defined_only"),
        ),
        c(
            "safeguarding_referral",
            "repeated min_items",
            json!({"/concerns": []}),
            Refused("concerns", "repeated.min_items"),
        ),
        c(
            "safeguarding_referral",
            "repeated max_items",
            json!({"/concerns": vec![json!({"description": "x"}); 21]}),
            Refused("concerns", "repeated.max_items"),
        ),
        c(
            "safeguarding_referral",
            "nested required",
            json!({"/concerns/0/description": ""}),
            Refused("concerns[0].description", "required"),
        ),
        c(
            "safeguarding_referral",
            "max_len",
            json!({"/concerns/0/description": "x".repeat(10001)}),
            Refused("concerns[0].description", "string.max_len"),
        ),
        c(
            "safeguarding_referral",
            "nhs check digit",
            json!({"/subject/nhsNumber": "9434765918"}),
            Refused("subject.nhs_number", "joinery.nhs_number"),
        ),
        c(
            "safeguarding_referral",
            "nhs check digit 10",
            json!({"/subject/nhsNumber": "1000000010"}),
            Refused("subject.nhs_number", "joinery.nhs_number"),
        ),
        c(
            "safeguarding_referral",
            "nhs pattern",
            json!({"/subject/nhsNumber": "943476591"}),
            Refused("subject.nhs_number", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "nhs spaces",
            json!({"/subject/nhsNumber": "943 476 5919"}),
            Refused("subject.nhs_number", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "postcode lower",
            json!({"/subject/address/postcode": "ls1 1ur"}),
            Refused("subject.address.postcode", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "postcode no space",
            json!({"/subject/address/postcode": "LS11UR"}),
            Refused("subject.address.postcode", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "postcode SW1A 1AA ok",
            json!({"/subject/address/postcode": "SW1A 1AA"}),
            Valid,
        ),
        c(
            "safeguarding_referral",
            "postcode W1A 0AX ok",
            json!({"/subject/address/postcode": "W1A 0AX"}),
            Valid,
        ),
        c(
            "safeguarding_referral",
            "postcode M1 1AE ok",
            json!({"/subject/address/postcode": "M1 1AE"}),
            Valid,
        ),
        c(
            "safeguarding_referral",
            "postcode CR2 6XH ok",
            json!({"/subject/address/postcode": "CR2 6XH"}),
            Valid,
        ),
        c(
            "safeguarding_referral",
            "postcode bad inward",
            json!({"/subject/address/postcode": "LS1 1CI"}),
            Refused("subject.address.postcode", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "uprn leading zero",
            json!({"/subject/address/uprn": "0123"}),
            Refused("subject.address.uprn", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "uprn 13 digits",
            json!({"/subject/address/uprn": "1234567890123"}),
            Refused("subject.address.uprn", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "address empty",
            json!({"/subject/address": {}}),
            Refused("subject.address", "address.not_empty"),
        ),
        c(
            "safeguarding_referral",
            "address empty line",
            json!({"/subject/address/lines/0": ""}),
            Refused("subject.address.lines[0]", "string.min_len"),
        ),
        c(
            "safeguarding_referral",
            "ods lower",
            json!({"/referringOrganisation/odsCode": "rr8"}),
            Refused("referring_organisation.ods_code", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "org no code",
            json!({"/referringOrganisation/odsCode": null}),
            Refused("referring_organisation", "organisation.code_required"),
        ),
        c(
            "safeguarding_referral",
            "org no name",
            json!({"/referringOrganisation/name": null}),
            Refused("referring_organisation.name", "required"),
        ),
        c(
            "business_acknowledgement",
            "gss short",
            json!({"/acknowledgingOrganisation/gssCode": "E0800003"}),
            Refused("acknowledging_organisation.gss_code", "string.pattern"),
        ),
        c(
            "business_acknowledgement",
            "agency id",
            json!({"/acknowledgingOrganisation/agencyId": "Council_Leeds"}),
            Refused("acknowledging_organisation.agency_id", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "email",
            json!({"/referrer/email": "not-an-email"}),
            Refused("referrer.email", "string.email"),
        ),
        c(
            "safeguarding_referral",
            "contact unreachable",
            json!({"/referrer/email": null, "/referrer/phone": null}),
            Refused("referrer", "contact.reachable"),
        ),
        c(
            "safeguarding_referral",
            "phone letters",
            json!({"/subject/phone": "call me"}),
            Refused("subject.phone", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "month 13",
            json!({"/subject/dateOfBirth/month": 13}),
            Refused("subject.date_of_birth.month", "int32.gte_lte"),
        ),
        c(
            "safeguarding_referral",
            "year 1700",
            json!({"/subject/dateOfBirth/year": 1700}),
            Refused("subject.date_of_birth.year", "int32.gte_lte"),
        ),
        c(
            "safeguarding_referral",
            "29 feb 2023",
            json!({"/subject/dateOfBirth": {"year": 2023, "month": 2, "day": 29}}),
            Refused("subject.date_of_birth", "date.valid_day"),
        ),
        c(
            "safeguarding_referral",
            "31 apr",
            json!({"/subject/dateOfBirth": {"year": 2020, "month": 4, "day": 31}}),
            Refused("subject.date_of_birth", "date.valid_day"),
        ),
        c(
            "safeguarding_referral",
            "29 feb 2024 ok",
            json!({"/subject/dateOfBirth": {"year": 2024, "month": 2, "day": 29}}),
            Valid,
        ),
        c(
            "safeguarding_referral",
            "29 feb 1900",
            json!({"/subject/dateOfBirth": {"year": 1900, "month": 2, "day": 29}}),
            Refused("subject.date_of_birth", "date.valid_day"),
        ),
        c(
            "safeguarding_referral",
            "29 feb 2000 ok",
            json!({"/subject/dateOfBirth": {"year": 2000, "month": 2, "day": 29}}),
            Valid,
        ),
        c(
            "safeguarding_referral",
            "empty name",
            json!({"/subject/name": {"title": "Ms"}}),
            Refused("subject.name", "person_name.given_or_family"),
        ),
        c(
            "safeguarding_referral",
            "ethnic I",
            json!({"/subject/ethnicCategory": "I"}),
            Refused("subject.ethnic_category", "string.pattern"),
        ),
        c(
            "safeguarding_referral",
            "upn format",
            json!({"/subject/identifiers/0/value": "X1"}),
            Refused("subject.identifiers[0]", "identifier.upn_format"),
        ),
        c(
            "safeguarding_referral",
            "local id no issuer",
            json!({"/subject/identifiers/0": {"kind": "IDENTIFIER_KIND_LOCAL", "value": "12345"}}),
            Refused("subject.identifiers[0]", "identifier.local_needs_issuer"),
        ),
        c(
            "safeguarding_referral",
            "local id issuer ok",
            json!({"/subject/identifiers/0": {"kind": "IDENTIFIER_KIND_LOCAL", "value": "12345", "issuer": {"odsCode": "RR8", "name": "LTHT"}}}),
            Valid,
        ),
        c(
            "safeguarding_referral",
            "nino",
            json!({"/subject/identifiers/0": {"kind": "IDENTIFIER_KIND_NATIONAL_INSURANCE_NUMBER", "value": "QQ12345C"}}),
            Refused("subject.identifiers[0]", "identifier.nino_format"),
        ),
        c(
            "safeguarding_referral",
            "nino ok",
            json!({"/subject/identifiers/0": {"kind": "IDENTIFIER_KIND_NATIONAL_INSURANCE_NUMBER", "value": "AB123456C"}}),
            Valid,
        ),
        c(
            "safeguarding_referral",
            "unborn no edd",
            json!({"/subjectKind": "SUBJECT_KIND_UNBORN_CHILD"}),
            Refused("", "safeguarding_referral.unborn_needs_edd"),
        ),
        c(
            "safeguarding_referral",
            "unborn edd ok",
            json!({"/subjectKind": "SUBJECT_KIND_UNBORN_CHILD", "/expectedDateOfDelivery": {"year": 2025, "month": 7, "day": 1}}),
            Valid,
        ),
        c(
            "safeguarding_referral",
            "not aware no reason",
            json!({"/parentalAwareness": "PARENTAL_AWARENESS_NOT_AWARE"}),
            Refused("", "safeguarding_referral.parents_not_aware_reason"),
        ),
        c(
            "safeguarding_referral",
            "n/a for child",
            json!({"/parentalAwareness": "PARENTAL_AWARENESS_NOT_APPLICABLE"}),
            Refused("", "safeguarding_referral.parental_awareness_for_child"),
        ),
        c(
            "safeguarding_referral",
            "consent refused no reason",
            json!({"/consent": {"status": "CONSENT_STATUS_REFUSED"}}),
            Refused("consent", "consent.reason_required"),
        ),
        c(
            "safeguarding_referral",
            "consent missing",
            json!({"/consent": null}),
            Refused("consent", "required"),
        ),
        c(
            "safeguarding_referral",
            "consent dup grounds",
            json!({"/consent/sharingGrounds": ["SHARING_GROUND_VITAL_INTERESTS", "SHARING_GROUND_VITAL_INTERESTS"]}),
            Refused("consent.sharing_grounds", "repeated.unique"),
        ),
        c(
            "safeguarding_referral",
            "household relationship",
            json!({"/householdMembers/0/relationship": ""}),
            Refused("household_members[0].relationship", "required"),
        ),
        c(
            "safeguarding_referral",
            "household nhs",
            json!({"/householdMembers/0/person/nhsNumber": "9434765871"}),
            Refused(
                "household_members[0].person.nhs_number",
                "joinery.nhs_number",
            ),
        ),
        c(
            "safeguarding_referral",
            "professional unreachable",
            json!({"/professionalsInvolved/0/phone": null}),
            Refused("professionals_involved[0]", "contact.reachable"),
        ),
        c(
            "safeguarding_referral",
            "unknown JSON field",
            json!({"/subject/shoeSize": 9}),
            BadJson,
        ),
        c(
            "marac_referral",
            "criteria dup",
            json!({"/referralCriteria": ["REFERRAL_CRITERION_PROFESSIONAL_JUDGEMENT", "REFERRAL_CRITERION_PROFESSIONAL_JUDGEMENT"]}),
            Refused("referral_criteria", "repeated.unique"),
        ),
        c(
            "marac_referral",
            "criteria unspecified",
            json!({"/referralCriteria": ["REFERRAL_CRITERION_UNSPECIFIED"]}),
            Refused("referral_criteria[0]", "enum.not_in"),
        ),
        c(
            "marac_referral",
            "criteria empty",
            json!({"/referralCriteria": []}),
            Refused("referral_criteria", "repeated.min_items"),
        ),
        c(
            "marac_referral",
            "vhr score 13",
            json!({"/risk/dashScore": 13}),
            Refused("", "marac_referral.visible_high_risk_score"),
        ),
        c(
            "marac_referral",
            "vhr no score",
            json!({"/risk/dashScore": null}),
            Refused("", "marac_referral.visible_high_risk_score"),
        ),
        c(
            "marac_referral",
            "pj no score ok",
            json!({"/risk/dashScore": null, "/referralCriteria": ["REFERRAL_CRITERION_PROFESSIONAL_JUDGEMENT"]}),
            Valid,
        ),
        c(
            "marac_referral",
            "dash 28",
            json!({"/risk/dashScore": 28}),
            Refused("risk.dash_score", "int32.gte_lte"),
        ),
        c(
            "marac_referral",
            "risk summary",
            json!({"/risk/summary": ""}),
            Refused("risk.summary", "required"),
        ),
        c(
            "marac_referral",
            "risk level",
            json!({"/risk/level": "RISK_LEVEL_UNSPECIFIED"}),
            Refused("risk.level", "enum.not_in"),
        ),
        c(
            "marac_referral",
            "marac no consent grounds",
            json!({"/consent": {"status": "CONSENT_STATUS_REFUSED", "reason": "Victim fears retaliation"}}),
            Refused("", "marac_referral.consent_or_grounds"),
        ),
        c(
            "marac_referral",
            "marac grounds ok",
            json!({"/consent": {"status": "CONSENT_STATUS_REFUSED", "reason": "Victim fears retaliation", "sharingGrounds": ["SHARING_GROUND_RISK_OF_SERIOUS_HARM"]}}),
            Valid,
        ),
        c(
            "marac_referral",
            "safe contact no phone",
            json!({"/victim/safeContact/phone": null}),
            Refused("victim.safe_contact", "safe_contact.means_required"),
        ),
        c(
            "marac_referral",
            "unsafe no instructions",
            json!({"/victim/safeContact/safeToContact": false, "/victim/safeContact/instructions": null}),
            Refused("victim.safe_contact", "safe_contact.instructions_required"),
        ),
        c(
            "marac_referral",
            "no perpetrators",
            json!({"/perpetrators": []}),
            Refused("perpetrators", "repeated.min_items"),
        ),
        c(
            "marac_referral",
            "perp relationship",
            json!({"/perpetrators/0/relationship": "PERPETRATOR_RELATIONSHIP_UNSPECIFIED"}),
            Refused("perpetrators[0].relationship", "enum.not_in"),
        ),
        c(
            "marac_referral",
            "pnc format",
            json!({"/perpetrators/0/person/identifiers/0/value": "123"}),
            Refused(
                "perpetrators[0].person.identifiers[0]",
                "identifier.pnc_id_format",
            ),
        ),
        c(
            "marac_referral",
            "child relationship",
            json!({"/children/0/relationshipToVictim": ""}),
            Refused("children[0].relationship_to_victim", "required"),
        ),
        c(
            "marac_referral",
            "child nhs",
            json!({"/children/0/person/nhsNumber": "9434765936"}),
            Refused("children[0].person.nhs_number", "joinery.nhs_number"),
        ),
        c(
            "child_protection_plan_notice",
            "cpp nhs empty",
            json!({"/nhsNumber": ""}),
            Refused("nhs_number", "required"),
        ),
        c(
            "child_protection_plan_notice",
            "cpp nhs check",
            json!({"/nhsNumber": "9434765910"}),
            Refused("nhs_number", "joinery.nhs_number"),
        ),
        c(
            "child_protection_plan_notice",
            "cpp end before start",
            json!({"/endDate": {"year": 2025, "month": 3, "day": 27}}),
            Refused("", "child_protection_plan_notice.end_after_start"),
        ),
        c(
            "child_protection_plan_notice",
            "cpp end same day ok",
            json!({"/endDate": {"year": 2025, "month": 3, "day": 28}}),
            Valid,
        ),
        c(
            "child_protection_plan_notice",
            "cpp ended no end",
            json!({"/action": "PLAN_ACTION_ENDED"}),
            Refused("", "child_protection_plan_notice.ended_needs_end_date"),
        ),
        c(
            "child_protection_plan_notice",
            "cpp ended ok",
            json!({"/action": "PLAN_ACTION_ENDED", "/endDate": {"year": 2026, "month": 1, "day": 5}}),
            Valid,
        ),
        c(
            "child_protection_plan_notice",
            "cpp start missing",
            json!({"/startDate": null}),
            Refused("start_date", "required"),
        ),
        c(
            "child_protection_plan_notice",
            "cpp plan type",
            json!({"/planType": "PLAN_TYPE_UNSPECIFIED"}),
            Refused("plan_type", "enum.not_in"),
        ),
        c(
            "unscheduled_care_attendance_notice",
            "uca setting kind",
            json!({"/careSettingKind": "CARE_SETTING_KIND_UNSPECIFIED"}),
            Refused("care_setting_kind", "enum.not_in"),
        ),
        c(
            "unscheduled_care_attendance_notice",
            "uca nhs",
            json!({"/nhsNumber": "12345"}),
            Refused("nhs_number", "string.pattern"),
        ),
        c(
            "unscheduled_care_attendance_notice",
            "uca ods site lower",
            json!({"/careSetting/odsCode": "rr801"}),
            Refused("care_setting.ods_code", "string.pattern"),
        ),
        c(
            "assessment_notice",
            "an patient nhs",
            json!({"/patient/nhsNumber": null}),
            Refused("patient", "patient.nhs_number_required"),
        ),
        c(
            "assessment_notice",
            "an patient nhs bad",
            json!({"/patient/nhsNumber": "9434765944"}),
            Refused("patient.nhs_number", "joinery.nhs_number"),
        ),
        c(
            "assessment_notice",
            "an patient n/a",
            json!({"/patientConsultation": "CONSULTATION_NOT_APPLICABLE"}),
            Refused("patient_consultation", "enum.in"),
        ),
        c(
            "assessment_notice",
            "an carer unspecified",
            json!({"/carerConsultation": "CONSULTATION_UNSPECIFIED"}),
            Refused("carer_consultation", "enum.not_in"),
        ),
        c(
            "assessment_notice",
            "an not consulted no notes",
            json!({"/carerConsultation": "CONSULTATION_NOT_CONSULTED", "/consultationNotes": null}),
            Refused("", "assessment_notice.consultation_notes_required"),
        ),
        c(
            "assessment_notice",
            "an consulted no carer",
            json!({"/carer": null}),
            Refused("", "assessment_notice.carer_required"),
        ),
        c(
            "assessment_notice",
            "an chc not considered",
            json!({"/continuingHealthcare": "CONTINUING_HEALTHCARE_NOT_CONSIDERED", "/continuingHealthcareNotes": null}),
            Refused("", "assessment_notice.chc_notes_required"),
        ),
        c(
            "assessment_notice",
            "an edd missing",
            json!({"/expectedDischargeDate": null}),
            Refused("expected_discharge_date", "required"),
        ),
        c(
            "assessment_notice",
            "an liaison missing",
            json!({"/liaisonContact": null}),
            Refused("liaison_contact", "required"),
        ),
        c(
            "assessment_notice",
            "an hospital no name",
            json!({"/hospital/name": ""}),
            Refused("hospital.name", "required"),
        ),
        c(
            "discharge_notice",
            "dn assessment ref",
            json!({"/assessmentNoticeReference": ""}),
            Refused("assessment_notice_reference", "required"),
        ),
        c(
            "discharge_notice",
            "dn discharge date",
            json!({"/dischargeDate/day": 0}),
            Refused("discharge_date.day", "int32.gte_lte"),
        ),
        c(
            "discharge_notice",
            "dn patient nhs",
            json!({"/patient/nhsNumber": null}),
            Refused("patient", "patient.nhs_number_required"),
        ),
        c(
            "withdrawal_notice",
            "wn other no detail",
            json!({"/reason": "WITHDRAWAL_REASON_OTHER", "/reasonDetail": null}),
            Refused("", "withdrawal_notice.reason_detail_required"),
        ),
        c(
            "withdrawal_notice",
            "wn kind",
            json!({"/withdrawnNoticeKind": "NOTICE_KIND_UNSPECIFIED"}),
            Refused("withdrawn_notice_kind", "enum.not_in"),
        ),
        c(
            "withdrawal_notice",
            "wn patient nhs",
            json!({"/patient/nhsNumber": null}),
            Refused("patient", "patient.nhs_number_required"),
        ),
        c(
            "incident_notification",
            "inc create no location",
            json!({"/location": null}),
            Refused("", "incident_notification.create_needs_location"),
        ),
        c(
            "incident_notification",
            "inc create no reported",
            json!({"/reportedAt": null}),
            Refused("", "incident_notification.create_needs_location"),
        ),
        c(
            "incident_notification",
            "inc update no location ok",
            json!({"/action": "INCIDENT_ACTION_UPDATE", "/location": null, "/reportedAt": null, "/revision": 2}),
            Valid,
        ),
        c(
            "incident_notification",
            "inc location no grid",
            json!({"/location/gridReference": null, "/location/position": null}),
            Refused("location", "location.address_or_grid_reference"),
        ),
        c(
            "incident_notification",
            "inc location address ok",
            json!({"/location/gridReference": null, "/location/position": null, "/location/address": {"lines": ["M62"], "postcode": "WF17 9LA"}}),
            Valid,
        ),
        c(
            "incident_notification",
            "inc close no closure",
            json!({"/action": "INCIDENT_ACTION_CLOSE"}),
            Refused("", "incident_notification.close_needs_closure"),
        ),
        c(
            "incident_notification",
            "inc close ok",
            json!({"/action": "INCIDENT_ACTION_CLOSE", "/revision": 5, "/closure": {"closedAt": "2025-03-14T10:30:00Z", "outcome": "Casualty released and conveyed; road reopened."}}),
            Valid,
        ),
        c(
            "incident_notification",
            "inc closure on create",
            json!({"/closure": {"closedAt": "2025-03-14T10:30:00Z", "outcome": "x"}}),
            Refused("", "incident_notification.closure_only_on_close"),
        ),
        c(
            "incident_notification",
            "inc closure no outcome",
            json!({"/action": "INCIDENT_ACTION_CLOSE", "/closure": {"closedAt": "2025-03-14T10:30:00Z"}}),
            Refused("closure.outcome", "required"),
        ),
        c(
            "incident_notification",
            "inc revision 0",
            json!({"/revision": 0}),
            Refused("revision", "uint32.gte_lte"),
        ),
        c(
            "incident_notification",
            "inc easting",
            json!({"/location/gridReference/easting": 800000}),
            Refused("location.grid_reference.easting", "int32.gte_lte"),
        ),
        c(
            "incident_notification",
            "inc latitude",
            json!({"/location/position/latitude": 91}),
            Refused("location.position.latitude", "double.gte_lte"),
        ),
        c(
            "incident_notification",
            "inc person undescribed",
            json!({"/people/0/description": ""}),
            Refused("people[0]", "person_involved.identified_or_described"),
        ),
        c(
            "incident_notification",
            "inc resource status",
            json!({"/resources/0/status": "RESOURCE_STATUS_UNSPECIFIED"}),
            Refused("resources[0].status", "enum.not_in"),
        ),
        c(
            "incident_notification",
            "inc resource callsign",
            json!({"/resources/0/callsign": ""}),
            Refused("resources[0].callsign", "required"),
        ),
        c(
            "incident_notification",
            "inc casualty count 0",
            json!({"/casualtyCounts/0/count": 0}),
            Refused("casualty_counts[0].count", "uint32.gte_lte"),
        ),
        c(
            "incident_notification",
            "inc type category",
            json!({"/incidentType/category": "INCIDENT_CATEGORY_UNSPECIFIED"}),
            Refused("incident_type.category", "enum.not_in"),
        ),
        c(
            "incident_notification",
            "inc action",
            json!({"/action": "INCIDENT_ACTION_UNSPECIFIED"}),
            Refused("action", "enum.not_in"),
        ),
        c(
            "incident_notification",
            "inc control room unreachable",
            json!({"/controlRoom/phone": null}),
            Refused("control_room", "contact.reachable"),
        ),
        c(
            "home_fire_safety_referral",
            "hfs no factors",
            json!({"/riskFactors": []}),
            Refused("risk_factors", "repeated.min_items"),
        ),
        c(
            "home_fire_safety_referral",
            "hfs dup factors",
            json!({"/riskFactors": ["FIRE_RISK_FACTOR_SMOKER", "FIRE_RISK_FACTOR_SMOKER"]}),
            Refused("risk_factors", "repeated.unique"),
        ),
        c(
            "home_fire_safety_referral",
            "hfs other no notes",
            json!({"/riskFactors/5": "FIRE_RISK_FACTOR_OTHER", "/riskNotes": null}),
            Refused("", "home_fire_safety_referral.other_risk_needs_notes"),
        ),
        c(
            "home_fire_safety_referral",
            "hfs premises no postcode",
            json!({"/premises/postcode": null}),
            Refused("premises", "premises.postcode_required"),
        ),
        c(
            "home_fire_safety_referral",
            "hfs household 0",
            json!({"/householdSize": 0}),
            Refused("household_size", "uint32.gte_lte"),
        ),
        c(
            "home_fire_safety_referral",
            "hfs urgency",
            json!({"/urgency": "VISIT_URGENCY_UNSPECIFIED"}),
            Refused("urgency", "enum.not_in"),
        ),
        c(
            "home_fire_safety_referral",
            "hfs occupant nhs",
            json!({"/occupant/nhsNumber": "9434765950"}),
            Refused("occupant.nhs_number", "joinery.nhs_number"),
        ),
        c(
            "case_update",
            "cu closed no outcome",
            json!({"/status": "CASE_STATUS_CLOSED"}),
            Refused("", "case_update.closed_needs_outcome"),
        ),
        c(
            "case_update",
            "cu closed ok",
            json!({"/status": "CASE_STATUS_CLOSED", "/outcome": "CASE_OUTCOME_NO_FURTHER_ACTION"}),
            Valid,
        ),
        c(
            "case_update",
            "cu outcome while open",
            json!({"/outcome": "CASE_OUTCOME_EARLY_HELP"}),
            Refused("", "case_update.outcome_only_when_closed"),
        ),
        c(
            "case_update",
            "cu transferred no dest",
            json!({"/status": "CASE_STATUS_TRANSFERRED"}),
            Refused("", "case_update.transferred_needs_destination"),
        ),
        c(
            "case_update",
            "cu related id non-ascii",
            json!({"/relatedMessageId": "référral-1"}),
            Refused("related_message_id", "string.pattern"),
        ),
        c(
            "case_update",
            "cu summary",
            json!({"/summary": ""}),
            Refused("summary", "required"),
        ),
        c(
            "case_update",
            "cu review date",
            json!({"/nextReviewDate/month": 0}),
            Refused("next_review_date.month", "int32.gte_lte"),
        ),
        c(
            "business_acknowledgement",
            "ack rejected no reason",
            json!({"/status": "ACKNOWLEDGEMENT_STATUS_REJECTED"}),
            Refused("", "business_acknowledgement.rejection_needs_reason"),
        ),
        c(
            "business_acknowledgement",
            "ack rejected code only",
            json!({"/status": "ACKNOWLEDGEMENT_STATUS_REJECTED", "/rejectionReason": "REJECTION_REASON_WRONG_AREA"}),
            Refused("", "business_acknowledgement.rejection_needs_reason"),
        ),
        c(
            "business_acknowledgement",
            "ack rejected ok",
            json!({"/status": "ACKNOWLEDGEMENT_STATUS_REJECTED", "/rejectionReason": "REJECTION_REASON_WRONG_AREA", "/reason": "The address is in Bradford: please refer to Bradford Children's Services.", "/receiverReference": null}),
            Valid,
        ),
        c(
            "business_acknowledgement",
            "ack reason while accepted",
            json!({"/rejectionReason": "REJECTION_REASON_DUPLICATE"}),
            Refused(
                "",
                "business_acknowledgement.rejection_reason_only_when_rejected",
            ),
        ),
        c(
            "business_acknowledgement",
            "ack no original id",
            json!({"/originalMessageId": ""}),
            Refused("original_message_id", "required"),
        ),
        c(
            "business_acknowledgement",
            "ack original id too long",
            json!({"/originalMessageId": "a".repeat(129)}),
            Refused("original_message_id", "string.pattern"),
        ),
        c(
            "business_acknowledgement",
            "ack bad type",
            json!({"/originalMessageType": "not a type"}),
            Refused("original_message_type", "string.pattern"),
        ),
        c(
            "business_acknowledgement",
            "ack status",
            json!({"/status": "ACKNOWLEDGEMENT_STATUS_UNSPECIFIED"}),
            Refused("status", "enum.not_in"),
        ),
    ]
}

fn case(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

#[test]
fn a_payload_breaking_any_rule_is_refused_with_its_field_path_and_rule_id() {
    let snapshot = library().snapshot();
    let mut rules_seen = BTreeSet::new();
    let mut failures = Vec::new();
    for case in cases() {
        let message_type = type_of(case.example);
        let doc = edited(example(case.example), &case.edits);
        let json_result = snapshot.from_json(message_type, &doc.to_string());
        match case.expect {
            Valid => {
                if let Err(e) = json_result {
                    failures.push(format!("{}: expected valid, got {e}", case.name));
                }
                continue;
            }
            BadJson => {
                if !matches!(json_result, Err(SchemaError::BadJson { .. })) {
                    failures.push(format!(
                        "{}: expected bad JSON, got {json_result:?}",
                        case.name
                    ));
                }
                continue;
            }
            Refused(field, rule) => {
                let from_json = violations(json_result);
                // The same payload as protobuf (what Publish carries) is
                // refused identically.
                let bytes = encode_unchecked(message_type, &doc);
                let from_binary = violations(snapshot.validate(message_type, &bytes));
                assert_eq!(
                    from_json, from_binary,
                    "{}: JSON and binary disagree",
                    case.name
                );
                let fields: BTreeSet<&str> = from_json.iter().map(|v| v.field.as_str()).collect();
                let rules: Vec<&str> = from_json.iter().map(|v| v.rule.as_str()).collect();
                if fields != BTreeSet::from([field]) || !rules.contains(&rule) {
                    failures.push(format!(
                        "{}: expected {field:?} ({rule}), got {from_json:?}",
                        case.name
                    ));
                }
                rules_seen.insert(rule.to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every kind of rule the library uses was exercised.
    for rule in [
        "required",
        "string.min_len",
        "string.max_len",
        "string.pattern",
        "string.email",
        "enum.defined_only",
        "enum.not_in",
        "enum.in",
        "repeated.min_items",
        "repeated.max_items",
        "repeated.unique",
        "int32.gte_lte",
        "uint32.gte_lte",
        "double.gte_lte",
        "joinery.nhs_number",
        // message-level CEL, at the root and nested
        "safeguarding_referral.unborn_needs_edd",
        "marac_referral.consent_or_grounds",
        "consent.reason_required",
        "date.valid_day",
        "identifier.nino_format",
        // field-level CEL
        "patient.nhs_number_required",
        "premises.postcode_required",
    ] {
        assert!(rules_seen.contains(rule), "no case breaks {rule}");
    }
}

#[test]
fn message_rule_violations_carry_the_message_their_proto_declares() {
    let snapshot = library().snapshot();
    for (name, declared) in [
        (
            "unborn no edd",
            "a referral about an unborn child needs the expected date of delivery",
        ),
        (
            "consent refused no reason",
            "consent refused or not sought needs a reason",
        ),
        ("29 feb 2023", "day must exist in the given month and year"),
    ] {
        let case = case(name);
        let doc = edited(example(case.example), &case.edits);
        let found = violations(snapshot.from_json(type_of(case.example), &doc.to_string()));
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        assert_eq!(found[0].message, declared, "{name}: {found:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_invalid_payloads_naming_the_field_and_stores_none() {
    let broker = TestBroker::start(BODY).await;
    for name in [
        "required string",
        "postcode lower",
        "uprn leading zero",
        "ods lower",
        "nhs check digit",
        "enum unspecified",
        "repeated min_items",
        "dash 28",
        "consent refused no reason",
        "unborn no edd",
        "an patient nhs",
    ] {
        let case = case(name);
        let Refused(field, rule) = case.expect else {
            panic!("{name} is not a refusal case")
        };
        let message_type = type_of(case.example);
        let doc = edited(example(case.example), &case.edits);
        let payload = encode_unchecked(message_type, &doc);
        let err = publish_to(&broker, "any", message_type, payload)
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert_eq!(reason(&err), "invalid_payload", "{name}");
        assert!(
            err.message().contains(&format!("{field} ({rule})")),
            "{name}: names {field} ({rule}): {}",
            err.message()
        );
        assert!(err.message().contains(message_type), "{}", err.message());
    }
    // Bytes that are not the declared type at all.
    let err = publish_to(
        &broker,
        "any",
        "interop.referral.v1.SafeguardingReferral",
        vec![0xff, 0xff, 0xff],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "invalid_payload");

    // Nothing refused was stored: the only delivery is the valid message
    // published afterwards.
    let valid = encode_unchecked(type_of("marac_referral"), &example("marac_referral"));
    publish_to(&broker, "any", type_of("marac_referral"), valid.clone())
        .await
        .unwrap();
    let mut council = broker.client("council").await;
    let mut consumer = TestConsumer::open(&mut council, "council.any", 64)
        .await
        .unwrap();
    let first = consumer.next(WAIT).await.expect("the valid message");
    assert_eq!(first.envelope.unwrap().payload, valid);
    assert!(consumer.next(Duration::from_millis(300)).await.is_none());
}

// ---------------------------------------------------------------------------
// NHS numbers

/// Modulus 11 as the NHS Data Dictionary defines it, written independently
/// of the broker's: the check digit of nine digits, or None when it would be
/// 10 (no valid number has those nine digits).
fn check_digit(nine: &str) -> Option<u32> {
    let sum: u32 = nine
        .chars()
        .zip((2..=10).rev())
        .map(|(c, w)| c.to_digit(10).unwrap() * w)
        .sum();
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        d => Some(d),
    }
}

#[test]
fn nhs_numbers_with_a_wrong_check_digit_are_refused_and_right_ones_accepted() {
    let snapshot = library().snapshot();
    let prefixes = [
        "943476591",
        "943476587",
        "943476593",
        "100000001",
        "401023213",
    ];
    assert_eq!(check_digit("943476591"), Some(9), "9434765919 is valid");
    assert_eq!(
        check_digit("100000001"),
        None,
        "a prefix with no valid number"
    );
    // A top-level field (ChildProtectionPlanNotice.nhs_number), a Person's
    // (SafeguardingReferral.subject), and one inside a list.
    let places = [
        ("child_protection_plan_notice", "/nhsNumber", "nhs_number"),
        (
            "safeguarding_referral",
            "/subject/nhsNumber",
            "subject.nhs_number",
        ),
        (
            "safeguarding_referral",
            "/householdMembers/0/person/nhsNumber",
            "household_members[0].person.nhs_number",
        ),
    ];
    let (mut accepted, mut refused) = (0, 0);
    for (file, pointer, field) in places {
        let message_type = type_of(file);
        for prefix in prefixes {
            for last in 0..=9 {
                let number = format!("{prefix}{last}");
                let mut doc = example(file);
                *doc.pointer_mut(pointer).expect(pointer) = json!(number);
                let result = snapshot.from_json(message_type, &doc.to_string());
                if check_digit(prefix) == Some(last) {
                    result.unwrap_or_else(|e| panic!("{number} is valid at {field}: {e}"));
                    accepted += 1;
                } else {
                    let found = violations(result);
                    assert_eq!(
                        found
                            .iter()
                            .map(|v| (v.field.as_str(), v.rule.as_str()))
                            .collect::<Vec<_>>(),
                        [(field, "joinery.nhs_number")],
                        "{number} at {field}"
                    );
                    refused += 1;
                }
            }
        }
    }
    assert_eq!((accepted, refused), (12, 138));
}

#[test]
fn nhs_numbers_are_checked_inside_mutually_recursive_messages() {
    let registry = Registry::load(&[], Vec::new()).unwrap();
    let source = r#"syntax = "proto3";
package council.tree.v1;
import "joinery/rules/v1/rules.proto";
message Member {
  string nhs_number = 1 [(joinery.rules.v1.field).nhs_number = true];
  Household household = 2;
}
message Household {
  Member head = 1;
}
"#;
    let (_, next) = registry
        .prepare(&[("council/tree/v1/tree.proto".into(), source.into())])
        .unwrap();
    registry.commit(next);
    let snapshot = registry.snapshot();
    assert!(snapshot
        .from_json("council.tree.v1.Member", r#"{"nhsNumber": "9434765919"}"#)
        .is_ok());
    let top =
        violations(snapshot.from_json("council.tree.v1.Member", r#"{"nhsNumber": "9434765918"}"#));
    assert_eq!(top[0].field, "nhs_number");
    let nested = snapshot.from_json(
        "council.tree.v1.Member",
        r#"{"household": {"head": {"nhsNumber": "9434765918"}}}"#,
    );
    let nested = violations(nested);
    assert_eq!(nested[0].field, "household.head.nhs_number");
    let from_household = violations(snapshot.from_json(
        "council.tree.v1.Household",
        r#"{"head": {"nhsNumber": "9434765918"}}"#,
    ));
    assert_eq!(from_household[0].field, "head.nhs_number");
}

// ---------------------------------------------------------------------------
// Topics and types

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_refuses_types_it_does_not_list_and_unknown_types_are_refused() {
    let broker = TestBroker::start(BODY).await;
    let marac = encode_unchecked(type_of("marac_referral"), &example("marac_referral"));
    let err = publish_to(
        &broker,
        "referral.safeguarding",
        type_of("marac_referral"),
        marac.clone(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "type_not_accepted");
    assert!(
        err.message().contains("interop.referral.v1.MaracReferral")
            && err
                .message()
                .contains("interop.referral.v1.SafeguardingReferral"),
        "names the type and what the topic accepts: {}",
        err.message()
    );
    // The topic that accepts any type takes it.
    publish_to(&broker, "any", type_of("marac_referral"), marac.clone())
        .await
        .unwrap();

    // A type no schema defines.
    let err = publish_to(&broker, "any", "council.nothing.v1.Thing", marac.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "unknown_message_type");
    assert!(
        err.message().contains("council.nothing.v1.Thing"),
        "{}",
        err.message()
    );
    // On a topic that lists its types, an unknown type is not accepted either.
    let err = publish_to(
        &broker,
        "referral.safeguarding",
        "council.nothing.v1.Thing",
        marac,
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&err), "type_not_accepted");
}

// ---------------------------------------------------------------------------
// The Schemas service

const VISIT_PATH: &str = "council/visits/v1/visit.proto";

/// A made-up local package: a home visit, importing the standard library's
/// common types and buf.validate.
const VISIT_V1: &str = r#"syntax = "proto3";

package council.visits.v1;

import "buf/validate/validate.proto";
import "interop/common/v1/common.proto";

// What happened at a home visit.
enum VisitOutcome {
  VISIT_OUTCOME_UNSPECIFIED = 0;
  VISIT_OUTCOME_SEEN = 1;
  VISIT_OUTCOME_NO_ACCESS = 2;
}

// Who visited.
message Visitor {
  string name = 1;
}

// A home visit by a council officer.
message Visit {
  string visit_reference = 1 [(buf.validate.field).required = true, (buf.validate.field).string.max_len = 64];
  interop.common.v1.Person resident = 2 [(buf.validate.field).required = true];
  interop.common.v1.Address address = 3;
  VisitOutcome outcome = 4 [(buf.validate.field).enum = {defined_only: true, not_in: [0]}];
  string notes = 5 [(buf.validate.field).string.max_len = 2000];
  int32 minutes = 6 [(buf.validate.field).int32 = {gte: 0, lte: 600}];
  string officer = 7;
}
"#;

const VISIT_TYPE: &str = "council.visits.v1.Visit";

fn visit_json() -> Value {
    json!({
        "visitReference": "LCC-V-0001",
        "resident": {
            "name": {"givenNames": "Alex", "familyName": "Example"},
            "nhsNumber": "9434765919"
        },
        "address": {"lines": ["1 Example Street", "Leeds"], "postcode": "LS1 1UR"},
        "outcome": "VISIT_OUTCOME_SEEN",
        "minutes": 45,
        "officer": "Sam Sample"
    })
}

/// `source` with `from` replaced by `to`; `from` must be there.
fn change(source: &str, from: &str, to: &str) -> String {
    assert!(source.contains(from), "{from:?} not in the schema");
    source.replacen(from, to, 1)
}

fn visit_files(source: &str) -> Vec<ProtoFile> {
    vec![ProtoFile {
        path: VISIT_PATH.into(),
        content: source.into(),
    }]
}

async fn register(
    client: &mut SchemasClient<Channel>,
    source: &str,
    dry_run: bool,
) -> Result<joinery::proto::RegisterSchemaResponse, tonic::Status> {
    client
        .register_schema(RegisterSchemaRequest {
            files: visit_files(source),
            dry_run,
        })
        .await
        .map(|r| r.into_inner())
}

async fn package(client: &mut SchemasClient<Channel>, name: &str) -> Option<SchemaPackage> {
    client
        .list_schemas(ListSchemasRequest {})
        .await
        .unwrap()
        .into_inner()
        .packages
        .into_iter()
        .find(|p| p.package == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_breaking_change_is_refused_and_compatible_changes_bump_the_revision() {
    let broker = TestBroker::start_with(BODY, OPERATORS, &[]).await;
    let mut ops = schemas(&broker, "ops").await;
    assert!(package(&mut ops, "council.visits.v1").await.is_none());
    let registered = register(&mut ops, VISIT_V1, false).await.unwrap();
    assert_eq!(registered.packages, ["council.visits.v1"]);
    let types: BTreeSet<&str> = registered
        .message_types
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        types,
        BTreeSet::from([VISIT_TYPE, "council.visits.v1.Visitor"])
    );
    let listed = package(&mut ops, "council.visits.v1").await.unwrap();
    assert_eq!((listed.source.as_str(), listed.revision), ("registered", 1));
    assert_eq!(listed.files, [VISIT_PATH]);

    let breaking = [
        (
            "field number reused with another type",
            change(
                VISIT_V1,
                "int32 minutes = 6 [(buf.validate.field).int32 = {gte: 0, lte: 600}];",
                "string minutes = 6;",
            ),
            "council.visits.v1.Visit.minutes",
            "FIELD_TYPE_CHANGED",
        ),
        (
            "field number reused with another name",
            change(VISIT_V1, "string notes = 5", "string remarks = 5"),
            "council.visits.v1.Visit.notes",
            "FIELD_NUMBER_REUSED",
        ),
        (
            "field removed without reserved",
            change(VISIT_V1, "  string officer = 7;\n", ""),
            "council.visits.v1.Visit.officer",
            "FIELD_REMOVED_NOT_RESERVED",
        ),
        (
            "field removed, only its name reserved",
            change(
                VISIT_V1,
                "  string officer = 7;\n",
                "  reserved \"officer\";\n",
            ),
            "council.visits.v1.Visit.officer",
            "FIELD_REMOVED_NOT_RESERVED",
        ),
        (
            "message removed",
            change(
                VISIT_V1,
                "// Who visited.\nmessage Visitor {\n  string name = 1;\n}\n",
                "",
            ),
            "council.visits.v1.Visitor",
            "MESSAGE_REMOVED",
        ),
        (
            "enum value removed",
            change(VISIT_V1, "  VISIT_OUTCOME_NO_ACCESS = 2;\n", ""),
            "council.visits.v1.VisitOutcome.VISIT_OUTCOME_NO_ACCESS",
            "ENUM_VALUE_REMOVED",
        ),
        (
            "required rule added",
            change(
                VISIT_V1,
                "string officer = 7;",
                "string officer = 7 [(buf.validate.field).required = true];",
            ),
            "council.visits.v1.Visit.officer",
            "REQUIRED_RULE_ADDED",
        ),
    ];
    for (what, source, element, kind) in &breaking {
        // A dry run lists exactly that change...
        let report = register(&mut ops, source, true).await.unwrap();
        let found: Vec<(&str, &str)> = report
            .breaking_changes
            .iter()
            .map(|c| (c.element.as_str(), c.kind.as_str()))
            .collect();
        assert_eq!(found, [(*element, *kind)], "{what}");
        assert!(!report.breaking_changes[0].detail.is_empty());
        // ...and registering it is refused, naming it.
        let err = register(&mut ops, source, false).await.expect_err(what);
        assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {err:?}");
        assert_eq!(reason(&err), "breaking_change", "{what}");
        assert!(
            err.message().contains(&format!("{kind} {element}")),
            "{what}: {}",
            err.message()
        );
    }
    // Nothing refused was stored.
    assert_eq!(
        package(&mut ops, "council.visits.v1")
            .await
            .unwrap()
            .revision,
        1
    );
    let unchanged = register(&mut ops, VISIT_V1, true).await.unwrap();
    assert!(unchanged.breaking_changes.is_empty());

    // Compatible: a new optional field...
    let v2 = change(
        VISIT_V1,
        "  string officer = 7;\n",
        "  string officer = 7;\n  optional string language = 8;\n",
    );
    register(&mut ops, &v2, false).await.unwrap();
    assert_eq!(
        package(&mut ops, "council.visits.v1")
            .await
            .unwrap()
            .revision,
        2
    );
    // ...and a field removed with its number reserved.
    let v3 = change(&v2, "  string officer = 7;\n", "  reserved 7;\n");
    register(&mut ops, &v3, false).await.unwrap();
    assert_eq!(
        package(&mut ops, "council.visits.v1")
            .await
            .unwrap()
            .revision,
        3
    );
    // The live registry has the new version: `language` is known, `officer`
    // is not.
    let validated = ops
        .validate_message(ValidateMessageRequest {
            message_type: VISIT_TYPE.into(),
            payload: Some(Payload::Json(r#"{"visitReference": "V1", "resident": {"name": {"familyName": "Example"}}, "outcome": "VISIT_OUTCOME_SEEN", "language": "Welsh"}"#.into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(validated.valid, "{:?}", validated.violations);
    let stale = ops
        .validate_message(ValidateMessageRequest {
            message_type: VISIT_TYPE.into(),
            payload: Some(Payload::Json(visit_json().to_string())),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stale.valid, "officer was removed in v3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_operators_may_register_schemas() {
    let broker = TestBroker::start_with(BODY, OPERATORS, &[]).await;
    for agency in ["council", "police"] {
        let mut client = schemas(&broker, agency).await;
        let err = register(&mut client, VISIT_V1, false).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{agency}");
        assert_eq!(reason(&err), "not_an_operator", "{agency}");
        let err = register(&mut client, VISIT_V1, true).await.unwrap_err();
        assert_eq!(reason(&err), "not_an_operator", "{agency}: dry runs too");
        // Reading is open to every agency.
        assert!(package(&mut client, "interop.referral.v1").await.is_some());
        assert!(package(&mut client, "council.visits.v1").await.is_none());
    }
    register(&mut schemas(&broker, "ops").await, VISIT_V1, false)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_type_is_validated_fetched_published_and_decoded() {
    let broker = TestBroker::start_with(BODY, OPERATORS, &[]).await;
    let mut ops = schemas(&broker, "ops").await;
    register(&mut ops, VISIT_V1, false).await.unwrap();
    let mut council = schemas(&broker, "council").await;

    // ValidateMessage with JSON: valid, and its protobuf returned.
    let valid = council
        .validate_message(ValidateMessageRequest {
            message_type: VISIT_TYPE.into(),
            payload: Some(Payload::Json(visit_json().to_string())),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(valid.valid, "{:?}", valid.violations);
    assert!(valid.violations.is_empty());
    assert!(!valid.binary.is_empty());

    // Invalid: each broken rule named with its field path.
    let bad = edited(
        visit_json(),
        &json!({"/resident/nhsNumber": "9434765918", "/outcome": "VISIT_OUTCOME_UNSPECIFIED", "/visitReference": ""}),
    );
    let invalid = council
        .validate_message(ValidateMessageRequest {
            message_type: VISIT_TYPE.into(),
            payload: Some(Payload::Json(bad.to_string())),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!invalid.valid);
    assert!(invalid.binary.is_empty());
    let found: BTreeSet<(&str, &str)> = invalid
        .violations
        .iter()
        .map(|v| (v.field.as_str(), v.rule.as_str()))
        .collect();
    assert_eq!(
        found,
        BTreeSet::from([
            ("visit_reference", "required"),
            ("outcome", "enum.not_in"),
            ("resident.nhs_number", "joinery.nhs_number"),
        ])
    );

    // GetSchema: a descriptor set with the imports and the rules intact.
    let schema = council
        .get_schema(GetSchemaRequest {
            name: VISIT_TYPE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(schema.package, "council.visits.v1");
    let pool = DescriptorPool::decode(schema.descriptor_set.as_slice()).unwrap();
    let descriptor = pool
        .get_message_by_name(VISIT_TYPE)
        .expect("Visit in the set");
    assert!(pool
        .get_message_by_name("interop.common.v1.Person")
        .is_some());
    let empty = DynamicMessage::new(descriptor.clone());
    assert!(
        prost_protovalidate::Validator::new()
            .validate(&empty)
            .is_err(),
        "the fetched descriptors keep the rules"
    );

    // Published as the bytes ValidateMessage returned; delivered unchanged
    // and decodable with the fetched descriptors.
    publish_to(&broker, "any", VISIT_TYPE, valid.binary.clone())
        .await
        .unwrap();
    let mut client = broker.client("council").await;
    let mut consumer = TestConsumer::open(&mut client, "council.any", 8)
        .await
        .unwrap();
    let delivery = consumer.next(WAIT).await.expect("the visit");
    let envelope = delivery.envelope.unwrap();
    assert_eq!(envelope.message_type, VISIT_TYPE);
    assert_eq!(envelope.payload, valid.binary);
    let decoded = DynamicMessage::decode(descriptor, &envelope.payload[..]).unwrap();
    assert_eq!(serde_json::to_value(&decoded).unwrap(), visit_json());

    // Publishing an invalid one is refused by the registered rules.
    let bad_minutes = edited(visit_json(), &json!({"/minutes": 601}));
    let payload =
        DynamicMessage::deserialize(pool.get_message_by_name(VISIT_TYPE).unwrap(), bad_minutes)
            .unwrap()
            .encode_to_vec();
    let err = publish_to(&broker, "any", VISIT_TYPE, payload)
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "invalid_payload");
    assert!(
        err.message().contains("minutes (int32.gte_lte)"),
        "{}",
        err.message()
    );
    assert!(consumer.next(Duration::from_millis(300)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_schema_survives_a_restart() {
    let broker = TestBroker::start_with(BODY, OPERATORS, &[]).await;
    let mut ops = schemas(&broker, "ops").await;
    register(&mut ops, VISIT_V1, false).await.unwrap();
    let v2 = change(
        VISIT_V1,
        "  string officer = 7;\n",
        "  string officer = 7;\n  optional string language = 8;\n",
    );
    register(&mut ops, &v2, false).await.unwrap();
    drop(ops);
    let (tmp, pki) = broker.stop().await;

    // The new configuration has a topic that lists the registered type: it
    // starts only if the type is known at start-up.
    let body = format!(
        "{BODY}\n[[topic]]\nname = \"visits\"\nmessage_types = [\"{VISIT_TYPE}\"]\npublishers = [\"police\"]\nsubscribers = [\"council\"]\n\n[[subscription]]\nname = \"council.visits\"\ntopic = \"visits\"\nowner = \"council\"\n"
    );
    let broker = TestBroker::start_in(tmp, pki, &body).await;
    let mut council = schemas(&broker, "council").await;
    let listed = package(&mut council, "council.visits.v1")
        .await
        .expect("still registered");
    assert_eq!(listed.source, "registered");
    assert_eq!(listed.revision, 2);
    assert!(listed.message_types.iter().any(|t| t == VISIT_TYPE));

    // Its v2 field and its rules apply to publishes.
    let schema = council
        .get_schema(GetSchemaRequest {
            name: VISIT_TYPE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pool = DescriptorPool::decode(schema.descriptor_set.as_slice()).unwrap();
    let encode = |doc: Value| {
        DynamicMessage::deserialize(pool.get_message_by_name(VISIT_TYPE).unwrap(), doc)
            .unwrap()
            .encode_to_vec()
    };
    let good = encode(edited(visit_json(), &json!({"/language": "Welsh"})));
    publish_to(&broker, "visits", VISIT_TYPE, good.clone())
        .await
        .unwrap();
    let err = publish_to(
        &broker,
        "visits",
        VISIT_TYPE,
        encode(edited(
            visit_json(),
            &json!({"/resident/nhsNumber": "9434765910"}),
        )),
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&err), "invalid_payload");
    assert!(
        err.message()
            .contains("resident.nhs_number (joinery.nhs_number)"),
        "{}",
        err.message()
    );
    let mut client = broker.client("council").await;
    let mut consumer = TestConsumer::open(&mut client, "council.visits", 8)
        .await
        .unwrap();
    assert_eq!(
        consumer.next(WAIT).await.unwrap().envelope.unwrap().payload,
        good
    );
    assert!(consumer.next(Duration::from_millis(300)).await.is_none());
}

// ---------------------------------------------------------------------------
// Registration of packages that depend on each other

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_of_different_packages_are_all_kept() {
    let broker = TestBroker::start_with(BODY, OPERATORS, &[]).await;
    let names: Vec<String> = (1..=6).map(|i| format!("council.parallel{i}.v1")).collect();
    let mut tasks = Vec::new();
    for name in &names {
        let mut client = schemas(&broker, "ops").await;
        let path = format!("{}/thing.proto", name.replace('.', "/"));
        let content = format!(
            "syntax = \"proto3\";\npackage {name};\nimport \"interop/common/v1/common.proto\";\nmessage Thing {{ interop.common.v1.Person person = 1; }}\n"
        );
        tasks.push(tokio::spawn(async move {
            client
                .register_schema(RegisterSchemaRequest {
                    files: vec![ProtoFile { path, content }],
                    dry_run: false,
                })
                .await
                .map(|r| r.into_inner().packages)
        }));
    }
    for (task, name) in tasks.into_iter().zip(&names) {
        assert_eq!(task.await.unwrap().unwrap(), std::slice::from_ref(name));
    }
    // Every successful registration is live: none was lost to another that
    // was prepared at the same time.
    let mut client = schemas(&broker, "council").await;
    let mut lost = Vec::new();
    for name in &names {
        let listed = package(&mut client, name).await.map(|p| p.revision);
        let validated = client
            .validate_message(ValidateMessageRequest {
                message_type: format!("{name}.Thing"),
                payload: Some(Payload::Json("{}".into())),
            })
            .await
            .is_ok_and(|r| r.into_inner().valid);
        if listed != Some(1) || !validated {
            lost.push(format!(
                "{name} (listed: {listed:?}, validates: {validated})"
            ));
        }
    }
    assert!(lost.is_empty(), "registered but not live: {lost:?}");
}

#[test]
fn a_compatible_new_version_of_a_package_others_import_is_accepted() {
    let registry = Registry::load(&[], Vec::new()).unwrap();
    let path = "interop/common/v1/common.proto";
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("proto")
            .join(path),
    )
    .unwrap();
    let source = change(
        &source,
        "  string support_needs = 14 [(buf.validate.field).string.max_len = 2000];\n",
        "  string support_needs = 14 [(buf.validate.field).string.max_len = 2000];\n  // Pronouns, as the person states them. May be empty.\n  string pronouns = 15 [(buf.validate.field).string.max_len = 50];\n",
    );
    let (registration, next) = registry
        .prepare(&[(path.into(), source)])
        .unwrap_or_else(|e| panic!("a new optional field in interop.common.v1 is compatible: {e}"));
    assert_eq!(registration.packages, ["interop.common.v1"]);
    registry.commit(next);
    // The standard messages that import it still work, with the new field.
    let doc = edited(
        example("safeguarding_referral"),
        &json!({"/subject/pronouns": "they/them"}),
    );
    registry
        .snapshot()
        .from_json(type_of("safeguarding_referral"), &doc.to_string())
        .unwrap();
}

#[test]
fn a_registered_package_may_import_another_registered_package() {
    let registry = Registry::load(&[], Vec::new()).unwrap();
    // Named so that the importer sorts before what it imports.
    let base = (
        "council/zoning/v1/zone.proto".to_string(),
        "syntax = \"proto3\";\npackage council.zoning.v1;\nmessage Zone { string code = 1; }\n"
            .to_string(),
    );
    let (_, next) = registry.prepare(std::slice::from_ref(&base)).unwrap();
    registry.commit(next);
    let user = (
        "council/area/v1/area.proto".to_string(),
        "syntax = \"proto3\";\npackage council.area.v1;\nimport \"council/zoning/v1/zone.proto\";\nmessage Area { council.zoning.v1.Zone zone = 1; }\n"
            .to_string(),
    );
    let (registration, next) = registry
        .prepare(&[user])
        .unwrap_or_else(|e| panic!("council.area.v1 imports a registered package: {e}"));
    assert_eq!(registration.message_types, ["council.area.v1.Area"]);
    registry.commit(next);
    registry
        .snapshot()
        .from_json("council.area.v1.Area", r#"{"zone": {"code": "Z1"}}"#)
        .unwrap();
}

// ---------------------------------------------------------------------------
// `joinery schema check`

fn write_tree(root: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
}

fn schema_check(dir: &Path, against: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_joinery"))
        .args(["schema", "check"])
        .arg(dir)
        .arg("--against")
        .arg(against)
        .output()
        .expect("run joinery");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn schema_check_reports_breaking_changes_compatible_changes_and_compile_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let current = root.join("current");
    write_tree(&current, &[(VISIT_PATH, VISIT_V1)]);

    let breaking = root.join("breaking");
    write_tree(
        &breaking,
        &[(VISIT_PATH, &change(VISIT_V1, "  string officer = 7;\n", ""))],
    );
    let (ok, text) = schema_check(&breaking, &current);
    assert!(!ok, "a breaking change fails the check:\n{text}");
    assert!(
        text.contains("FIELD_REMOVED_NOT_RESERVED council.visits.v1.Visit.officer"),
        "{text}"
    );

    let compatible = root.join("compatible");
    write_tree(
        &compatible,
        &[(
            VISIT_PATH,
            &change(
                VISIT_V1,
                "  string officer = 7;\n",
                "  string officer = 7;\n  optional string language = 8;\n",
            ),
        )],
    );
    let (ok, text) = schema_check(&compatible, &current);
    assert!(ok, "a compatible change passes:\n{text}");
    assert!(text.contains("council.visits.v1.Visit"), "{text}");
    assert!(!text.contains("breaking"), "{text}");

    let broken = root.join("broken");
    write_tree(
        &broken,
        &[(
            VISIT_PATH,
            &change(VISIT_V1, "string officer = 7;", "Officer officer = 7;"),
        )],
    );
    let (ok, text) = schema_check(&broken, &current);
    assert!(!ok, "a file that does not compile fails the check:\n{text}");
    assert!(text.contains("does not compile"), "{text}");
    assert!(
        text.contains("visit.proto") && text.contains("name 'Officer' is not defined"),
        "the compiler's message: {text}"
    );
}
