//! Broker configuration: the TOML file, its `JOINERY_*` environment overrides and
//! validation.
//!
//! # Load order
//!
//! 1. The text: the file named by `--config`, or [`DEFAULT_CONFIG`] (embedded in the
//!    binary, works on a fresh machine) when there is none. Every `[broker]` key has a
//!    default, so a file may leave out whatever it does not change.
//! 2. Environment overrides: `JOINERY_<SECTION>_<KEY>` replaces a scalar key of the
//!    `[broker]` or `[tls]` table, e.g. `JOINERY_BROKER_LISTEN=127.0.0.1:9000` or
//!    `JOINERY_TLS_DEV_PKI=false`. An unknown key in those two sections is an error;
//!    other `JOINERY_` variables (such as `JOINERY_LOG`) belong to someone else and are
//!    ignored.
//! 3. Deserialization into [`Config`], rejecting unknown keys everywhere.
//! 4. [`Config::validate`], which checks names, cross-references (topics, owners,
//!    publisher and subscriber patterns) and limits.
//!
//! # Invariants
//!
//! A [`Config`] returned by [`Config::load`] or [`Config::load_str`] has passed
//! validation: agency ids, topic names and subscription names are well formed and
//! unique, every subscription refers to a configured topic and owner that the topic
//! allows to subscribe, every publisher and subscriber entry names or matches a
//! configured agency, every broker limit is within its range, and
//! `tls.insecure_plaintext_agency` (plaintext, for measuring TLS cost) names a
//! configured agency and comes with a loopback `broker.listen`. Loading never stops
//! at the first problem: [`ConfigErrors`] carries every problem found, so an operator
//! fixes a file in one pass. Nothing here panics on bad input.

use std::collections::HashSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The configuration used when no file is given: a single-machine demo with three
/// agencies and a development PKI generated under `joinery-data/pki`.
pub const DEFAULT_CONFIG: &str = include_str!("default_config.toml");

/// Prefix of the environment variables that override configuration keys.
const ENV_PREFIX: &str = "JOINERY_";

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Smallest and largest accepted `broker.max_message_bytes`.
const MESSAGE_BYTES_RANGE: (usize, usize) = (KIB, 64 * MIB);
/// Smallest accepted `broker.cache_capacity`.
const MIN_CACHE_CAPACITY: u64 = MIB as u64;
/// Accepted range of a subscription's `ack_deadline`.
const ACK_DEADLINE_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(12 * 60 * 60));
/// Accepted range of a subscription's `max_deliveries`.
const MAX_DELIVERIES_RANGE: (u32, u32) = (1, 1000);
const ONE_SECOND: Duration = Duration::from_secs(1);

/// A problem met while reading the configuration, before validation.
///
/// [`Config::load`] and [`Config::load_str`] render these (with their sources) into
/// the lines of [`ConfigErrors`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration")]
    Toml(#[source] toml::de::Error),
    #[error("line {line}, column {column}: {message}")]
    TomlAt {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("environment variable {var}: unknown key {key}")]
    UnknownEnvKey { var: String, key: String },
    #[error("environment variable {var}: expected {expected}, got {value:?}")]
    BadEnvValue {
        var: String,
        expected: &'static str,
        value: String,
    },
    #[error("environment variable {var}: value is not valid utf-8")]
    EnvNotUtf8 { var: String },
    #[error("environment variable {var}: [{section}] is not a table")]
    SectionNotTable { var: String, section: String },
}

impl ConfigError {
    /// A toml error as one line, with line and column when the error carries a span
    /// into `text`.
    fn from_toml(err: toml::de::Error, text: Option<&str>) -> Self {
        match (text, err.span()) {
            (Some(text), Some(span)) => {
                let (line, column) = line_column(text, span.start);
                ConfigError::TomlAt {
                    line,
                    column,
                    message: err.message().trim().to_owned(),
                }
            }
            _ => ConfigError::Toml(err),
        }
    }

    /// The error and its chain of sources on one line.
    fn render(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            out.push_str(": ");
            // toml errors without a span end with "\nin `key`"; keep them on one line.
            out.push_str(&cause.to_string().trim().replace('\n', " "));
            source = cause.source();
        }
        out
    }
}

/// 1-based line and column (in characters) of byte offset `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Every problem that stopped a configuration from loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {}", problem.replace('\n', "\n    "))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(err: ConfigError) -> Self {
        ConfigErrors(vec![err.render()])
    }
}

/// The whole broker configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[broker]`: listener, storage and limits.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// `[tls]`: the broker's certificate and the CA its clients are checked against.
    #[serde(default)]
    pub tls: TlsConfig,
    /// `[[agency]]`: the organisations allowed to connect.
    #[serde(default, rename = "agency")]
    pub agencies: Vec<AgencyConfig>,
    /// `[[topic]]`: where messages are published.
    #[serde(default, rename = "topic")]
    pub topics: Vec<TopicConfig>,
    /// `[[subscription]]`: durable queues fed from topics.
    #[serde(default, rename = "subscription")]
    pub subscriptions: Vec<SubscriptionConfig>,
    /// `[[identity]]`: certificates mapped to agencies by subject or SAN.
    #[serde(default, rename = "identity")]
    pub identities: Vec<IdentityConfig>,
    /// `[audit]`: the audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// `[schemas]`: extra message schemas.
    #[serde(default)]
    pub schemas: SchemasConfig,
    /// `[metrics]`: the operations HTTP listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: Prometheus metrics, health checks and the status page, over
/// plain HTTP — keep it on loopback or a management network.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9464)),
        }
    }
}

/// `[schemas]`: where extra `.proto` files are, besides the standard library
/// built in and the packages registered through the Schemas service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchemasConfig {
    /// Directories of `.proto` files (import paths are relative to each).
    pub dirs: Vec<PathBuf>,
}

/// `[broker]`: where the broker listens, where it keeps data, and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Address of the gRPC (TLS) listener.
    pub listen: SocketAddr,
    /// Directory of the durable store (and of the development PKI).
    pub data_dir: PathBuf,
    /// Largest encoded envelope accepted, in bytes.
    pub max_message_bytes: usize,
    /// Cap on the `max_in_flight` a consumer may ask for.
    pub max_in_flight: u32,
    /// In-flight window used when a consumer asks for 0.
    pub default_in_flight: u32,
    /// How long a publisher's idempotency key is remembered.
    #[serde(with = "duration")]
    pub dedup_window: Duration,
    /// Bytes of sled's node cache. sled's own memory (its page table, one
    /// entry per tree page) comes on top; 32 MiB keeps a broker holding a
    /// million 1 KiB messages under 200 MB resident (README, Footprint).
    pub cache_capacity: u64,
    /// Most concurrent client connections.
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Most concurrent consumers on one subscription.
    pub max_consumers_per_subscription: usize,
    /// Time allowed for a TLS handshake.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Time given to open streams to finish on shutdown.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Most operations in one group commit.
    pub max_batch: usize,
    /// Most concurrent PublishStream and Subscribe streams of one agency.
    pub max_streams_per_agency: usize,
    /// Most publishes per second from one agency (0: no limit). Bursts of up
    /// to one second's worth are allowed.
    pub max_publish_rate: u32,
    /// Publishes are refused (UNAVAILABLE) while the data directory's file
    /// system has less free space than this, in bytes (0: no check), so that
    /// consumers can still drain queues before the disk is full.
    pub min_free_disk: u64,
    /// Agency ids or `*` globs allowed to use the Admin service.
    pub operators: Vec<String>,
    /// Threads of the async runtime that serves connections (TLS, HTTP/2,
    /// gRPC, the dispatchers); 0 chooses: the `TOKIO_WORKER_THREADS`
    /// environment variable if set, else one fewer than the CPUs, at least
    /// one (see [`BrokerConfig::runtime_threads`]).
    pub worker_threads: usize,
}

/// Most `[broker] worker_threads` accepted.
pub const MAX_WORKER_THREADS: usize = 256;

impl BrokerConfig {
    /// How many runtime threads `serve` starts, given the CPUs it may use
    /// and whether `TOKIO_WORKER_THREADS` is set; None leaves the choice
    /// to tokio, which reads that variable.
    ///
    /// The choice leaves a CPU to the store's writer and flusher threads,
    /// which are busy whenever the runtime is: on the 2-CPU reference
    /// machine one runtime thread published about 11% more at window 256
    /// than tokio's default of one per CPU, with less CPU; it consumed
    /// about 4% slower and answered single publishes as fast (README,
    /// Performance).
    pub fn runtime_threads(&self, cpus: usize, env_set: bool) -> Option<usize> {
        if self.worker_threads > 0 {
            Some(self.worker_threads)
        } else if env_set {
            None
        } else {
            Some(cpus.saturating_sub(1).max(1))
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 7443)),
            data_dir: PathBuf::from("joinery-data"),
            max_message_bytes: MIB,
            max_in_flight: 1000,
            default_in_flight: 100,
            dedup_window: Duration::from_secs(24 * 60 * 60),
            cache_capacity: 32 * MIB as u64,
            max_connections: 1024,
            max_streams_per_connection: 128,
            max_consumers_per_subscription: 64,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            max_batch: 4096,
            max_streams_per_agency: 256,
            max_publish_rate: 0,
            min_free_disk: 256 * MIB as u64,
            operators: Vec::new(),
            worker_threads: 0,
        }
    }
}

/// `[tls]`: PEM files of the broker's identity and of the CA that signs client
/// certificates.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// CA bundle client certificates must chain to.
    pub ca: PathBuf,
    /// The broker's certificate chain.
    pub cert: PathBuf,
    /// The broker's private key.
    pub key: PathBuf,
    /// Generate a development CA, server and agency certificates at these paths when
    /// they do not exist. Never for production.
    pub dev_pki: bool,
    /// Certificate revocation lists (PEM), checked on every handshake. A CRL
    /// past its next-update time fails closed.
    pub crl: Vec<PathBuf>,
    /// Connections older than this are closed (clients reconnect and are
    /// checked again), so no connection outlives a revocation by more.
    #[serde(with = "duration")]
    pub max_connection_age: Duration,
    /// How often the certificate, key, CA and CRL files are checked for
    /// changes (they also reload on SIGHUP).
    #[serde(with = "duration")]
    pub reload_interval: Duration,
    /// Serve plaintext HTTP/2 without TLS, every connection acting as this
    /// agency, to measure what TLS costs. Refused unless `broker.listen` is a
    /// loopback address; never for anything but that measurement.
    pub insecure_plaintext_agency: Option<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            dev_pki: false,
            crl: Vec::new(),
            max_connection_age: Duration::from_secs(3600),
            reload_interval: Duration::from_secs(5),
            insecure_plaintext_agency: None,
        }
    }
}

/// A UK Government Security Classifications marking, lowest first, so that
/// `a <= b` means "b covers a".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Marking {
    #[default]
    #[serde(rename = "OFFICIAL")]
    Official,
    #[serde(rename = "OFFICIAL_SENSITIVE", alias = "OFFICIAL-SENSITIVE")]
    OfficialSensitive,
}

impl Marking {
    /// The name used in config and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Marking::Official => "OFFICIAL",
            Marking::OfficialSensitive => "OFFICIAL_SENSITIVE",
        }
    }
}

impl std::fmt::Display for Marking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[identity]]`: maps a certificate that cannot carry the
/// `urn:joinery:agency:<id>` SAN to an agency, by its exact subject or by one
/// of its SAN values. Exactly one of `subject` and `san` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The certificate's subject as RFC 4514 text, e.g. `CN=cad-gateway,O=Demo Fire and Rescue,C=GB`.
    #[serde(default)]
    pub subject: Option<String>,
    /// A SAN value: a DNS name, an email address or a URI, e.g. `cad.fire.example.gov.uk`.
    #[serde(default)]
    pub san: Option<String>,
    /// The agency the certificate speaks for.
    pub agency: String,
}

/// `[audit]`: the tamper-evident audit log.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Record every publish, delivery, settlement, denial and reload.
    pub enabled: bool,
    /// How long records are kept; older ones are pruned behind an anchor
    /// record that keeps the rest of the chain verifiable.
    #[serde(with = "duration")]
    pub retention: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            // Seven years, a common retention period for safeguarding records.
            retention: Duration::from_secs(7 * 366 * 24 * 3600),
        }
    }
}

/// `[[agency]]`: an organisation, identified by the id in its client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgencyConfig {
    /// Stable identifier, e.g. `police-west-yorkshire`.
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// Kind of organisation, e.g. `police`, `council`, `nhs`.
    #[serde(default)]
    pub kind: String,
    /// Highest marking the agency may receive. Default OFFICIAL.
    #[serde(default)]
    pub clearance: Marking,
}

/// `[[topic]]`: a named stream of messages with its access rules.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Topic name, e.g. `referral.safeguarding`.
    pub name: String,
    /// Fully qualified protobuf message types accepted; empty accepts any type.
    #[serde(default)]
    pub message_types: Vec<String>,
    /// Agency ids or `*` globs allowed to publish.
    #[serde(default)]
    pub publishers: Vec<String>,
    /// Agency ids or `*` globs allowed to own subscriptions to this topic.
    #[serde(default)]
    pub subscribers: Vec<String>,
    /// How long messages are kept; `None` keeps them until every subscription has
    /// acknowledged them.
    #[serde(default, with = "optional_duration")]
    pub retention: Option<Duration>,
    /// Highest marking that may be published to the topic. Default OFFICIAL.
    #[serde(default)]
    pub max_marking: Marking,
    /// Deliver each message to its subscribers as soon as it is stored,
    /// while its group is still being synced, instead of once it is on disk.
    /// Its publisher is still answered only after the sync. Off by default:
    /// after a crash in that window a consumer may have been given a message
    /// the restarted broker no longer holds (its publisher got no answer and
    /// should publish it again). Its sequence number is never reused.
    #[serde(default)]
    pub deliver_before_sync: bool,
}

impl TopicConfig {
    /// Whether `agency` matches one of the topic's `publishers` entries.
    pub fn may_publish(&self, agency: &str) -> bool {
        self.publishers.iter().any(|p| glob_match(p, agency))
    }

    /// Whether `agency` matches one of the topic's `subscribers` entries.
    pub fn may_subscribe(&self, agency: &str) -> bool {
        self.subscribers.iter().any(|p| glob_match(p, agency))
    }

    /// Whether the topic accepts messages of `message_type` (any, when
    /// `message_types` is empty).
    pub fn accepts_message_type(&self, message_type: &str) -> bool {
        self.message_types.is_empty() || self.message_types.iter().any(|t| t == message_type)
    }
}

/// `[[subscription]]`: a durable queue fed from one topic, consumed by its owner.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Subscription name, e.g. `council-demo.safeguarding-inbox`.
    pub name: String,
    /// Name of the topic it is fed from.
    pub topic: String,
    /// Id of the agency that may consume it.
    pub owner: String,
    /// Time a consumer has to acknowledge a delivery before it is redelivered.
    #[serde(default = "default_ack_deadline", with = "duration")]
    pub ack_deadline: Duration,
    /// Deliveries of one message before it is dead-lettered.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// Most messages pending at once; publishes that would go beyond it are
    /// refused (RESOURCE_EXHAUSTED) until the consumer catches up.
    #[serde(default = "default_max_depth")]
    pub max_depth: u64,
}

fn default_max_depth() -> u64 {
    1_000_000
}

fn default_ack_deadline() -> Duration {
    Duration::from_secs(30)
}

fn default_max_deliveries() -> u32 {
    5
}

/// Serde helper for durations written as humantime strings ("30s", "24h", "7d").
mod duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Deserializer, Visitor};

    pub(super) struct HumanDuration(pub(super) Duration);

    impl<'de> de::Deserialize<'de> for HumanDuration {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_str(HumanDurationVisitor)
        }
    }

    struct HumanDurationVisitor;

    impl Visitor<'_> for HumanDurationVisitor {
        type Value = HumanDuration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string such as \"30s\", \"24h\" or \"7d\"")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<HumanDuration, E> {
            humantime::parse_duration(s)
                .map(HumanDuration)
                .map_err(|err| E::custom(format_args!("invalid duration {s:?}: {err}")))
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        de::Deserialize::deserialize(deserializer).map(|HumanDuration(d)| d)
    }
}

/// Serde helper for an optional humantime duration (absent key = `None`; use with
/// `#[serde(default)]`).
mod optional_duration {
    use std::time::Duration;

    use serde::de::{Deserialize, Deserializer};

    use super::duration::HumanDuration;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<HumanDuration>::deserialize(deserializer).map(|d| d.map(|HumanDuration(d)| d))
    }
}

/// Type of an overridable scalar key, so an environment value (always a string)
/// becomes the TOML value the key expects.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Strings: addresses, paths, humantime durations and agency ids.
    Text,
    Integer,
    Bool,
}

/// Keys of `[broker]` and `[tls]` that `JOINERY_<SECTION>_<KEY>` may override.
const OVERRIDABLE: &[(&str, &str, Kind)] = &[
    ("broker", "listen", Kind::Text),
    ("broker", "data_dir", Kind::Text),
    ("broker", "max_message_bytes", Kind::Integer),
    ("broker", "max_in_flight", Kind::Integer),
    ("broker", "default_in_flight", Kind::Integer),
    ("broker", "dedup_window", Kind::Text),
    ("broker", "cache_capacity", Kind::Integer),
    ("broker", "max_connections", Kind::Integer),
    ("broker", "max_streams_per_connection", Kind::Integer),
    ("broker", "max_consumers_per_subscription", Kind::Integer),
    ("broker", "handshake_timeout", Kind::Text),
    ("broker", "shutdown_grace", Kind::Text),
    ("broker", "max_batch", Kind::Integer),
    ("broker", "max_streams_per_agency", Kind::Integer),
    ("broker", "max_publish_rate", Kind::Integer),
    ("broker", "min_free_disk", Kind::Integer),
    ("broker", "worker_threads", Kind::Integer),
    ("tls", "ca", Kind::Text),
    ("tls", "cert", Kind::Text),
    ("tls", "key", Kind::Text),
    ("tls", "dev_pki", Kind::Bool),
    ("tls", "max_connection_age", Kind::Text),
    ("tls", "reload_interval", Kind::Text),
    ("tls", "insecure_plaintext_agency", Kind::Text),
    ("metrics", "enabled", Kind::Bool),
    ("metrics", "listen", Kind::Text),
];

/// Apply the `JOINERY_BROKER_*` and `JOINERY_TLS_*` variables of `env` to `table`.
/// Returns how many keys were overridden; problems are pushed to `errors`.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<String>,
) -> usize {
    let mut applied = 0;
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let Some((section, key)) = rest.split_once('_') else {
            continue;
        };
        if section != "broker" && section != "tls" && section != "metrics" {
            continue;
        }
        let Some(&(_, _, kind)) = OVERRIDABLE
            .iter()
            .find(|(s, k, _)| *s == section && *k == key)
        else {
            let key = format!("{section}.{key}");
            errors.push(ConfigError::UnknownEnvKey { var, key }.render());
            continue;
        };
        let value = match env_value(kind, &raw) {
            Ok(value) => value,
            Err(expected) => {
                let err = ConfigError::BadEnvValue {
                    var,
                    expected,
                    value: raw,
                };
                errors.push(err.render());
                continue;
            }
        };
        let entry = table
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry.as_table_mut() {
            Some(section_table) => {
                section_table.insert(key.to_owned(), value);
                applied += 1;
            }
            None => {
                let section = section.to_owned();
                errors.push(ConfigError::SectionNotTable { var, section }.render());
            }
        }
    }
    applied
}

/// The TOML value of an environment string for a key of type `kind`, or what was
/// expected instead.
fn env_value(kind: Kind, raw: &str) -> Result<toml::Value, &'static str> {
    match kind {
        Kind::Text => Ok(toml::Value::String(raw.to_owned())),
        Kind::Integer => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| "an integer"),
        Kind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(toml::Value::Boolean(true)),
            "false" => Ok(toml::Value::Boolean(false)),
            _ => Err("true or false"),
        },
    }
}

impl Config {
    /// Parse `text` (TOML), apply `JOINERY_*` overrides from `env` (an iterator of
    /// (key, value) so tests need not touch the process env), then validate.
    ///
    /// Every problem found is reported: bad environment overrides, then either the
    /// TOML error or every validation problem.
    pub fn load_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|err| ConfigErrors::from(ConfigError::from_toml(err, Some(text))))?;
        let mut errors = Vec::new();
        let overridden = apply_env_overrides(&mut table, env, &mut errors);

        // Without overrides, deserialize from the text itself so errors carry a line
        // and column; with them, the table is the truth.
        let parsed = if overridden == 0 {
            toml::from_str::<Config>(text).map_err(|err| ConfigError::from_toml(err, Some(text)))
        } else {
            table
                .try_into::<Config>()
                .map_err(|err| ConfigError::from_toml(err, None))
        };
        match parsed {
            Ok(mut config) => {
                errors.extend(config.validate());
                if errors.is_empty() {
                    config.add_report_topics();
                    Ok(config)
                } else {
                    Err(ConfigErrors(errors))
                }
            }
            Err(err) => {
                errors.push(err.render());
                Err(ConfigErrors(errors))
            }
        }
    }

    /// Read the file (or [`DEFAULT_CONFIG`] when `None`), then as
    /// [`Config::load_str`] with the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => DEFAULT_CONFIG.to_owned(),
        };
        // `std::env::vars` panics on a non-UTF-8 variable; read them all and refuse
        // only those that could be ours.
        let mut env_errors = Vec::new();
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(var, value)| {
                let var = var.into_string().ok()?;
                match value.into_string() {
                    Ok(value) => Some((var, value)),
                    Err(_) if var.starts_with(ENV_PREFIX) => {
                        env_errors.push(ConfigError::EnvNotUtf8 { var }.render());
                        None
                    }
                    Err(_) => None,
                }
            })
            .collect();
        match Config::load_str(&text, env) {
            Ok(config) if env_errors.is_empty() => Ok(config),
            Ok(_) => Err(ConfigErrors(env_errors)),
            Err(ConfigErrors(problems)) => {
                env_errors.extend(problems);
                Err(ConfigErrors(env_errors))
            }
        }
    }

    /// Every problem with this configuration, each a lowercase message naming the
    /// item it concerns. Empty when the configuration is valid.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        self.validate_broker(&mut problems);
        self.validate_tls(&mut problems);
        self.validate_agencies(&mut problems);
        self.validate_topics(&mut problems);
        self.validate_subscriptions(&mut problems);
        self.validate_access(&mut problems);
        problems
    }

    /// Name of an agency's delivery-report topic.
    pub fn report_topic(agency: &str) -> String {
        format!("reports.{agency}")
    }

    /// Name of an agency's delivery-report subscription.
    pub fn report_subscription(agency: &str) -> String {
        format!("{agency}.reports")
    }

    /// Gives every agency a delivery-report topic (`reports.<id>`, written
    /// only by the broker itself) and a subscription to it
    /// (`<id>.reports`), unless the config already defines them.
    fn add_report_topics(&mut self) {
        for agency in self.agencies.clone() {
            let topic = Self::report_topic(&agency.id);
            if self.topic(&topic).is_none() {
                self.topics.push(TopicConfig {
                    name: topic.clone(),
                    message_types: vec!["joinery.v1.DeliveryReport".into()],
                    publishers: Vec::new(),
                    subscribers: vec![agency.id.clone()],
                    retention: Some(Duration::from_secs(30 * 24 * 3600)),
                    max_marking: Marking::Official,
                    deliver_before_sync: false,
                });
            }
            let subscription = Self::report_subscription(&agency.id);
            if self.subscription(&subscription).is_none() {
                self.subscriptions.push(SubscriptionConfig {
                    name: subscription,
                    topic,
                    owner: agency.id.clone(),
                    ack_deadline: default_ack_deadline(),
                    max_deliveries: default_max_deliveries(),
                    max_depth: default_max_depth(),
                });
            }
        }
    }

    /// The agency with id `id`.
    pub fn agency(&self, id: &str) -> Option<&AgencyConfig> {
        self.agencies.iter().find(|a| a.id == id)
    }

    /// The topic named `name`.
    pub fn topic(&self, name: &str) -> Option<&TopicConfig> {
        self.topics.iter().find(|t| t.name == name)
    }

    /// The subscription named `name`.
    pub fn subscription(&self, name: &str) -> Option<&SubscriptionConfig> {
        self.subscriptions.iter().find(|s| s.name == name)
    }

    fn validate_broker(&self, problems: &mut Vec<String>) {
        let b = &self.broker;
        let (min, max) = MESSAGE_BYTES_RANGE;
        if !(min..=max).contains(&b.max_message_bytes) {
            problems.push(format!(
                "broker.max_message_bytes must be between {min} and {max} (got {})",
                b.max_message_bytes
            ));
        }
        let at_least_one = [
            ("max_in_flight", b.max_in_flight == 0),
            ("default_in_flight", b.default_in_flight == 0),
            ("max_connections", b.max_connections == 0),
            (
                "max_streams_per_connection",
                b.max_streams_per_connection == 0,
            ),
            (
                "max_consumers_per_subscription",
                b.max_consumers_per_subscription == 0,
            ),
            ("max_batch", b.max_batch == 0),
            ("max_streams_per_agency", b.max_streams_per_agency == 0),
        ];
        for (key, is_zero) in at_least_one {
            if is_zero {
                problems.push(format!("broker.{key} must be at least 1"));
            }
        }
        if b.worker_threads > MAX_WORKER_THREADS {
            problems.push(format!(
                "broker.worker_threads must be at most {MAX_WORKER_THREADS} (got {}; 0 chooses)",
                b.worker_threads
            ));
        }
        if b.default_in_flight > b.max_in_flight {
            problems.push(format!(
                "broker.default_in_flight ({}) must not exceed broker.max_in_flight ({})",
                b.default_in_flight, b.max_in_flight
            ));
        }
        if b.dedup_window < ONE_SECOND {
            problems.push(format!(
                "broker.dedup_window must be at least 1s (got {})",
                humantime::format_duration(b.dedup_window)
            ));
        }
        if b.cache_capacity < MIN_CACHE_CAPACITY {
            problems.push(format!(
                "broker.cache_capacity must be at least {MIN_CACHE_CAPACITY} bytes (got {})",
                b.cache_capacity
            ));
        }
        if b.handshake_timeout.is_zero() {
            problems.push("broker.handshake_timeout must be greater than zero".to_owned());
        }
    }

    fn validate_tls(&self, problems: &mut Vec<String>) {
        let tls = &self.tls;
        for (key, path) in [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)] {
            if path.as_os_str().is_empty() {
                problems.push(format!("tls.{key} must be set to a file path"));
            }
        }
        if tls.max_connection_age < ONE_SECOND {
            problems.push("tls.max_connection_age must be at least 1s".to_owned());
        }
        if tls.reload_interval < ONE_SECOND {
            problems.push("tls.reload_interval must be at least 1s".to_owned());
        }
        if let Some(agency) = &tls.insecure_plaintext_agency {
            let listen = self.broker.listen;
            if !crate::tls::is_loopback(listen.ip()) {
                problems.push(format!(
                    "tls.insecure_plaintext_agency serves plaintext without TLS, for measuring \
                     TLS cost only, and only on loopback: broker.listen must be a loopback \
                     address (127.0.0.0/8 or ::1), got {listen}"
                ));
            }
            if self.agency(agency).is_none() {
                problems.push(format!(
                    "tls.insecure_plaintext_agency: {agency:?} is not a configured agency"
                ));
            }
        }
    }

    /// Operators, identity mappings, markings and the audit log.
    fn validate_access(&self, problems: &mut Vec<String>) {
        for pattern in &self.broker.operators {
            let known = if pattern.contains('*') {
                self.agencies.iter().any(|a| glob_match(pattern, &a.id))
            } else {
                self.agency(pattern).is_some()
            };
            if !known {
                problems.push(format!(
                    "broker.operators: {pattern:?} is not a configured agency (or matches none)"
                ));
            }
        }
        for (i, identity) in self.identities.iter().enumerate() {
            let n = i + 1;
            match (&identity.subject, &identity.san) {
                (Some(_), Some(_)) | (None, None) => {
                    problems.push(format!("identity #{n}: set exactly one of subject and san"))
                }
                (Some(v), None) | (None, Some(v)) if v.trim().is_empty() => {
                    problems.push(format!("identity #{n}: the value to match is empty"))
                }
                (Some(subject), None) => {
                    if let Err(e) = crate::tls::SubjectName::parse(subject) {
                        problems.push(format!("identity #{n}: subject {subject:?}: {e}"));
                    }
                }
                _ => {}
            }
            if self.agency(&identity.agency).is_none() {
                problems.push(format!(
                    "identity #{n}: agency {:?} is not a configured agency",
                    identity.agency
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for identity in &self.identities {
            let key = (identity.subject.clone(), identity.san.clone());
            if !seen.insert(key) {
                problems.push(format!(
                    "identity for agency {:?}: the same subject or san is mapped twice",
                    identity.agency
                ));
            }
        }
        for sub in &self.subscriptions {
            let (Some(topic), Some(owner)) = (self.topic(&sub.topic), self.agency(&sub.owner))
            else {
                continue;
            };
            if owner.clearance < topic.max_marking {
                problems.push(format!(
                    "subscription {:?}: owner {:?} has clearance {} but topic {:?} carries up to {}",
                    sub.name, owner.id, owner.clearance, topic.name, topic.max_marking
                ));
            }
        }
        if self.audit.retention < Duration::from_secs(24 * 3600) {
            problems.push("audit.retention must be at least 1d".to_owned());
        }
    }

    fn validate_agencies(&self, problems: &mut Vec<String>) {
        for agency in &self.agencies {
            if !is_valid_name(&agency.id, 64, &['-']) {
                problems.push(format!(
                    "agency {:?}: id must be 1 to 64 characters of a-z, 0-9 and '-', \
                     starting with a letter or digit",
                    agency.id
                ));
            }
        }
        report_duplicates(
            "agency",
            self.agencies.iter().map(|a| a.id.as_str()),
            problems,
        );
    }

    fn validate_topics(&self, problems: &mut Vec<String>) {
        for topic in &self.topics {
            let name = &topic.name;
            if !is_valid_name(name, 128, &['.', '_', '-']) {
                problems.push(format!(
                    "topic {name:?}: name must be 1 to 128 characters of a-z, 0-9, '.', '_' \
                     and '-', starting with a letter or digit"
                ));
            }
            for message_type in &topic.message_types {
                if !is_qualified_type_name(message_type) {
                    problems.push(format!(
                        "topic {name:?}: message type {message_type:?} must be a fully \
                         qualified protobuf message name such as \
                         \"interop.referral.v1.SafeguardingReferral\""
                    ));
                }
            }
            for (role, patterns) in [
                ("publisher", &topic.publishers),
                ("subscriber", &topic.subscribers),
            ] {
                for pattern in patterns {
                    self.check_agency_pattern(name, role, pattern, problems);
                }
            }
            if let Some(retention) = topic.retention {
                if retention < ONE_SECOND {
                    problems.push(format!(
                        "topic {name:?}: retention must be at least 1s (got {})",
                        humantime::format_duration(retention)
                    ));
                }
            }
        }
        report_duplicates(
            "topic",
            self.topics.iter().map(|t| t.name.as_str()),
            problems,
        );
    }

    /// A publisher or subscriber entry must be a configured agency id, or a glob
    /// matching at least one.
    fn check_agency_pattern(
        &self,
        topic: &str,
        role: &str,
        pattern: &str,
        problems: &mut Vec<String>,
    ) {
        if pattern.contains('*') {
            if !self.agencies.iter().any(|a| glob_match(pattern, &a.id)) {
                problems.push(format!(
                    "topic {topic:?}: {role} pattern {pattern:?} matches no configured agency"
                ));
            }
        } else if self.agency(pattern).is_none() {
            problems.push(format!(
                "topic {topic:?}: {role} {pattern:?} is not a configured agency"
            ));
        }
    }

    fn validate_subscriptions(&self, problems: &mut Vec<String>) {
        for sub in &self.subscriptions {
            let name = &sub.name;
            if !is_valid_name(name, 128, &['.', '_', '-']) {
                problems.push(format!(
                    "subscription {name:?}: name must be 1 to 128 characters of a-z, 0-9, \
                     '.', '_' and '-', starting with a letter or digit"
                ));
            }
            let topic = self.topic(&sub.topic);
            if topic.is_none() {
                problems.push(format!(
                    "subscription {name:?}: topic {:?} is not configured",
                    sub.topic
                ));
            }
            if self.agency(&sub.owner).is_none() {
                problems.push(format!(
                    "subscription {name:?}: owner {:?} is not a configured agency",
                    sub.owner
                ));
            } else if let Some(topic) = topic {
                if !topic.may_subscribe(&sub.owner) {
                    problems.push(format!(
                        "subscription {name:?}: owner {:?} may not subscribe to topic {:?} \
                         (not in its subscribers)",
                        sub.owner, topic.name
                    ));
                }
            }
            let (min, max) = ACK_DEADLINE_RANGE;
            if !(min..=max).contains(&sub.ack_deadline) {
                problems.push(format!(
                    "subscription {name:?}: ack_deadline must be between {} and {} (got {})",
                    humantime::format_duration(min),
                    humantime::format_duration(max),
                    humantime::format_duration(sub.ack_deadline)
                ));
            }
            let (min, max) = MAX_DELIVERIES_RANGE;
            if !(min..=max).contains(&sub.max_deliveries) {
                problems.push(format!(
                    "subscription {name:?}: max_deliveries must be between {min} and {max} \
                     (got {})",
                    sub.max_deliveries
                ));
            }
            if sub.max_depth == 0 {
                problems.push(format!(
                    "subscription {name:?}: max_depth must be at least 1"
                ));
            }
        }
        report_duplicates(
            "subscription",
            self.subscriptions.iter().map(|s| s.name.as_str()),
            problems,
        );
    }
}

/// `name` is 1..=`max_len` characters of a-z, 0-9 and `punctuation`, starting with a
/// letter or digit.
fn is_valid_name(name: &str, max_len: usize, punctuation: &[char]) -> bool {
    let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut chars = name.chars();
    chars.next().is_some_and(alphanumeric)
        && name.len() <= max_len
        && chars.all(|c| alphanumeric(c) || punctuation.contains(&c))
}

/// A fully qualified protobuf message name: dot-separated, non-empty parts of
/// [A-Za-z0-9_], at least two of them.
fn is_qualified_type_name(name: &str) -> bool {
    name.contains('.')
        && name.split('.').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// Push one "defined more than once" problem for each name that appears twice or
/// more.
fn report_duplicates<'a>(
    item: &str,
    names: impl IntoIterator<Item = &'a str>,
    problems: &mut Vec<String>,
) {
    let mut seen = HashSet::new();
    let mut reported = HashSet::new();
    for name in names {
        if !seen.insert(name) && reported.insert(name) {
            problems.push(format!("{item} {name:?} is defined more than once"));
        }
    }
}

/// Whether `id` matches `pattern`, where `*` matches any run of characters (including
/// none), anywhere and any number of times, and everything else is literal.
///
/// `"police-*"` matches `"police-west-yorkshire"`; `"*"` matches every id.
pub fn glob_match(pattern: &str, id: &str) -> bool {
    let Some((prefix, rest)) = pattern.split_once('*') else {
        return pattern == id;
    };
    let (middle, suffix) = rest.rsplit_once('*').unwrap_or(("", rest));
    let Some(remaining) = id.strip_prefix(prefix) else {
        return false;
    };
    let Some(mut remaining) = remaining.strip_suffix(suffix) else {
        return false;
    };
    for part in middle.split('*').filter(|part| !part.is_empty()) {
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_CONFIG: &str = include_str!("../broker-config/joinery.toml");

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A small valid configuration to which tests append mistakes.
    const BASE: &str = r#"
        [tls]
        ca = "ca.pem"
        cert = "server.pem"
        key = "server.key"

        [[agency]]
        id = "police-west-yorkshire"

        [[agency]]
        id = "police-kent"

        [[agency]]
        id = "leeds-council"

        [[topic]]
        name = "referral.safeguarding"
        publishers = ["police-*"]
        subscribers = ["leeds-council"]
    "#;

    fn load_errors(text: &str) -> Vec<String> {
        match Config::load_str(text, no_env()) {
            Ok(config) => panic!("expected errors, loaded {config:#?}"),
            Err(ConfigErrors(problems)) => problems,
        }
    }

    #[test]
    fn embedded_default_loads_and_validates() {
        let config = Config::load_str(DEFAULT_CONFIG, no_env()).expect("default config");
        assert_eq!(
            config.broker,
            BrokerConfig {
                operators: vec!["council-demo".into()],
                ..BrokerConfig::default()
            }
        );
        assert!(config.tls.dev_pki);
        assert_eq!(config.agencies.len(), 3);
        let topic = config.topic("referral.safeguarding").expect("topic");
        assert!(topic.may_publish("police-demo"));
        assert!(topic.may_publish("nhs-demo"));
        assert!(!topic.may_publish("council-demo"));
        assert_eq!(
            topic.retention,
            Some(Duration::from_secs(30 * 24 * 60 * 60))
        );
        let inbox = config
            .subscription("council-demo.discharge-inbox")
            .expect("subscription");
        assert_eq!(inbox.topic, "notice.discharge");
        assert_eq!(inbox.ack_deadline, Duration::from_secs(30));
        assert_eq!(inbox.max_deliveries, 5);
        assert_eq!(
            config.agency("nhs-demo").map(|a| a.kind.as_str()),
            Some("nhs")
        );
    }

    #[test]
    fn example_config_loads_and_validates() {
        let config = Config::load_str(EXAMPLE_CONFIG, no_env()).expect("example config");
        assert!(!config.tls.dev_pki);
        assert_eq!(config.tls.ca, Path::new("/etc/joinery/tls/ca.pem"));
    }

    #[test]
    fn example_config_sets_exactly_the_overridable_keys() {
        // Every scalar key of [broker] and [tls] (lists are not overridable).
        let table: toml::Table = toml::from_str(EXAMPLE_CONFIG).expect("example parses");
        let mut in_example: Vec<(String, String)> = ["broker", "tls", "metrics"]
            .iter()
            .flat_map(|section| {
                table[*section]
                    .as_table()
                    .expect("section is a table")
                    .iter()
                    .filter(|(_, value)| !value.is_array())
                    .map(|(key, _)| ((*section).to_owned(), key.clone()))
            })
            .collect();
        let mut overridable: Vec<(String, String)> = OVERRIDABLE
            .iter()
            .filter(|(s, k, _)| !COMMENTED_OUT_IN_EXAMPLE.contains(&(*s, *k)))
            .map(|(s, k, _)| ((*s).to_owned(), (*k).to_owned()))
            .collect();
        in_example.sort();
        overridable.sort();
        assert_eq!(in_example, overridable);
        for (section, key) in COMMENTED_OUT_IN_EXAMPLE {
            assert!(
                EXAMPLE_CONFIG.contains(&format!("\n# {key} = ")),
                "{section}.{key} is documented, commented out, in the example"
            );
        }
    }

    /// Overridable keys the example documents only in a comment, because
    /// setting them changes what the broker is (plaintext measurement mode).
    const COMMENTED_OUT_IN_EXAMPLE: &[(&str, &str)] = &[("tls", "insecure_plaintext_agency")];

    #[test]
    fn empty_file_uses_broker_defaults_but_requires_tls_paths() {
        let problems = load_errors("");
        assert_eq!(
            problems,
            [
                "tls.ca must be set to a file path",
                "tls.cert must be set to a file path",
                "tls.key must be set to a file path",
            ]
        );
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let text = format!(
            r#"{BASE}
            [[agency]]
            id = "Bad_Id"

            [[subscription]]
            name = "inbox"
            topic = "nope"
            owner = "leeds-council"
            max_deliveries = 0
            "#
        );
        let problems = load_errors(&text);
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].starts_with("agency \"Bad_Id\": id must be"));
        assert_eq!(
            problems[1],
            "subscription \"inbox\": topic \"nope\" is not configured"
        );
        assert_eq!(
            problems[2],
            "subscription \"inbox\": max_deliveries must be between 1 and 1000 (got 0)"
        );
    }

    #[test]
    fn env_errors_and_validation_errors_are_reported_together() {
        let text = format!("{BASE}\n[broker]\nmax_batch = 0\n");
        let err =
            Config::load_str(&text, env(&[("JOINERY_BROKER_NOPE", "1")])).expect_err("invalid");
        assert_eq!(
            err.0,
            [
                "environment variable JOINERY_BROKER_NOPE: unknown key broker.nope",
                "broker.max_batch must be at least 1",
            ]
        );
    }

    #[test]
    fn worker_threads_chosen_from_the_config_the_environment_or_the_cpus() {
        let config = Config::load_str(BASE, env(&[])).expect("valid");
        assert_eq!(config.broker.worker_threads, 0);
        // Chosen: one fewer than the CPUs, at least one; the environment
        // variable wins over that choice.
        assert_eq!(config.broker.runtime_threads(2, false), Some(1));
        assert_eq!(config.broker.runtime_threads(1, false), Some(1));
        assert_eq!(config.broker.runtime_threads(8, false), Some(7));
        assert_eq!(config.broker.runtime_threads(8, true), None);
        // Set: it wins over both.
        let text = format!("{BASE}\n[broker]\nworker_threads = 3\n");
        let config = Config::load_str(&text, env(&[])).expect("valid");
        assert_eq!(config.broker.runtime_threads(2, true), Some(3));
        let config =
            Config::load_str(BASE, env(&[("JOINERY_BROKER_WORKER_THREADS", "2")])).expect("valid");
        assert_eq!(config.broker.runtime_threads(8, false), Some(2));
        let text = format!("{BASE}\n[broker]\nworker_threads = 257\n");
        assert_eq!(
            load_errors(&text),
            ["broker.worker_threads must be at most 256 (got 257; 0 chooses)"]
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let text = format!("[broker]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n{BASE}");
        let problems = load_errors(&text);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].starts_with("line 3, column 1: unknown field `lisen`"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn unknown_top_level_table_is_rejected() {
        let problems = load_errors(&format!("{BASE}\n[metricz]\nlisten = \"x\"\n"));
        assert!(
            problems[0].contains("unknown field `metricz`"),
            "{problems:?}"
        );
    }

    #[test]
    fn toml_syntax_error_is_reported_with_its_line() {
        let problems = load_errors("[broker]\nlisten = \n");
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("line 2, column "),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn env_override_changes_listen_data_dir_and_max_message_bytes() {
        let config = Config::load_str(
            BASE,
            env(&[
                ("JOINERY_BROKER_LISTEN", "127.0.0.1:9000"),
                ("JOINERY_BROKER_DATA_DIR", "/var/lib/joinery"),
                ("JOINERY_BROKER_MAX_MESSAGE_BYTES", "2048"),
                ("JOINERY_BROKER_DEDUP_WINDOW", "1h"),
                ("JOINERY_TLS_DEV_PKI", "true"),
                ("JOINERY_LOG", "debug"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .expect("config");
        assert_eq!(
            config.broker.listen,
            "127.0.0.1:9000".parse().expect("addr")
        );
        assert_eq!(config.broker.data_dir, Path::new("/var/lib/joinery"));
        assert_eq!(config.broker.max_message_bytes, 2048);
        assert_eq!(config.broker.dedup_window, Duration::from_secs(3600));
        assert!(config.tls.dev_pki);
    }

    #[test]
    fn env_override_replaces_a_value_set_in_the_file() {
        let text = format!("[broker]\nmax_batch = 10\n{BASE}");
        let config =
            Config::load_str(&text, env(&[("JOINERY_BROKER_MAX_BATCH", "20")])).expect("config");
        assert_eq!(config.broker.max_batch, 20);
    }

    #[test]
    fn every_overridable_key_is_accepted_from_the_env() {
        let overrides: Vec<(String, String)> = OVERRIDABLE
            .iter()
            .map(|(section, key, kind)| {
                let value = match (key, kind) {
                    (&"listen", _) => "127.0.0.1:1",
                    (&"insecure_plaintext_agency", _) => "leeds-council",
                    (_, Kind::Text) if key.ends_with("_window") => "2h",
                    (
                        &"handshake_timeout"
                        | &"shutdown_grace"
                        | &"max_connection_age"
                        | &"reload_interval",
                        _,
                    ) => "5s",
                    (_, Kind::Text) => "some/path",
                    (&"max_message_bytes", _) => "4096",
                    (&"cache_capacity", _) => "2097152",
                    (_, Kind::Integer) => "50",
                    (_, Kind::Bool) => "false",
                };
                let var = format!("JOINERY_{section}_{key}").to_ascii_uppercase();
                (var, value.to_owned())
            })
            .collect();
        let config = Config::load_str(BASE, overrides).expect("config");
        assert_eq!(config.broker.max_batch, 50);
        assert_eq!(config.broker.shutdown_grace, Duration::from_secs(5));
        assert_eq!(config.tls.key, Path::new("some/path"));
        assert_eq!(
            config.tls.insecure_plaintext_agency.as_deref(),
            Some("leeds-council")
        );
    }

    #[test]
    fn plaintext_agency_is_none_by_default() {
        let config = Config::load_str(BASE, no_env()).expect("config");
        assert_eq!(config.tls.insecure_plaintext_agency, None);
        let config = Config::load_str(DEFAULT_CONFIG, no_env()).expect("default config");
        assert_eq!(config.tls.insecure_plaintext_agency, None);
    }

    #[test]
    fn plaintext_agency_is_accepted_on_loopback_addresses() {
        for listen in [
            "127.0.0.1:7443",
            "127.0.0.2:0",
            "[::1]:7443",
            "[::ffff:127.0.0.1]:7443",
        ] {
            let config = Config::load_str(
                BASE,
                env(&[
                    ("JOINERY_BROKER_LISTEN", listen),
                    ("JOINERY_TLS_INSECURE_PLAINTEXT_AGENCY", "leeds-council"),
                ]),
            )
            .unwrap_or_else(|e| panic!("{listen}: {e}"));
            assert_eq!(
                config.tls.insecure_plaintext_agency.as_deref(),
                Some("leeds-council")
            );
        }
    }

    #[test]
    fn plaintext_agency_is_refused_unless_listen_is_loopback() {
        for listen in [
            "0.0.0.0:7443",
            "[::]:7443",
            "192.0.2.10:7443",
            "[2001:db8::1]:7443",
        ] {
            let text = BASE.replace(
                "[tls]\n",
                &format!(
                    "[broker]\n        listen = \"{listen}\"\n        [tls]\n        \
                     insecure_plaintext_agency = \"leeds-council\"\n"
                ),
            );
            assert_eq!(
                load_errors(&text),
                [format!(
                    "tls.insecure_plaintext_agency serves plaintext without TLS, for measuring \
                     TLS cost only, and only on loopback: broker.listen must be a loopback \
                     address (127.0.0.0/8 or ::1), got {listen}"
                )],
                "{listen}"
            );
        }
    }

    #[test]
    fn plaintext_agency_must_be_a_configured_agency() {
        let text = BASE.replace(
            "[tls]\n",
            "[tls]\n        insecure_plaintext_agency = \"nobody\"\n",
        );
        assert_eq!(
            load_errors(&text),
            ["tls.insecure_plaintext_agency: \"nobody\" is not a configured agency"]
        );
    }

    #[test]
    fn env_override_to_a_public_address_refuses_plaintext_mode() {
        let text = BASE.replace(
            "[tls]\n",
            "[tls]\n        insecure_plaintext_agency = \"leeds-council\"\n",
        );
        Config::load_str(&text, no_env()).expect("loopback default listen is accepted");
        let err = Config::load_str(&text, env(&[("JOINERY_BROKER_LISTEN", "0.0.0.0:7443")]))
            .expect_err("refused");
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].contains("for measuring TLS cost only, and only on loopback"),
            "{err}"
        );
    }

    #[test]
    fn unknown_joinery_broker_env_key_is_rejected() {
        let err = Config::load_str(BASE, env(&[("JOINERY_BROKER_FOO", "1")])).expect_err("bad");
        assert_eq!(
            err.0,
            ["environment variable JOINERY_BROKER_FOO: unknown key broker.foo"]
        );
    }

    #[test]
    fn malformed_env_values_are_rejected() {
        let err = Config::load_str(
            BASE,
            env(&[
                ("JOINERY_BROKER_MAX_BATCH", "lots"),
                ("JOINERY_TLS_DEV_PKI", "yes"),
            ]),
        )
        .expect_err("bad");
        assert_eq!(
            err.0,
            [
                "environment variable JOINERY_BROKER_MAX_BATCH: expected an integer, got \"lots\"",
                "environment variable JOINERY_TLS_DEV_PKI: expected true or false, got \"yes\"",
            ]
        );
    }

    #[test]
    fn env_override_with_an_invalid_address_is_reported() {
        let err =
            Config::load_str(BASE, env(&[("JOINERY_BROKER_LISTEN", "nowhere")])).expect_err("bad");
        assert_eq!(err.0.len(), 1);
        assert!(
            err.0[0].starts_with("invalid configuration: "),
            "{}",
            err.0[0]
        );
        assert!(err.0[0].contains("broker.listen"), "{}", err.0[0]);
    }

    #[test]
    fn bad_duration_string_is_reported() {
        let text = format!(
            r#"{BASE}
            [[subscription]]
            name = "inbox"
            topic = "referral.safeguarding"
            owner = "leeds-council"
            ack_deadline = "30 parsecs"
            "#
        );
        let line = 1 + text
            .lines()
            .position(|l| l.contains("parsecs"))
            .expect("line");
        let problems = load_errors(&text);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].starts_with(&format!("line {line}, column 28: ")),
            "{}",
            problems[0]
        );
        assert!(
            problems[0].contains("invalid duration \"30 parsecs\""),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn duration_given_as_a_number_is_reported() {
        let problems = load_errors(&format!("[broker]\ndedup_window = 60\n{BASE}"));
        assert!(
            problems[0].contains("a duration string such as \"30s\""),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn owner_not_in_subscribers_is_rejected() {
        let text = format!(
            r#"{BASE}
            [[subscription]]
            name = "kent-inbox"
            topic = "referral.safeguarding"
            owner = "police-kent"
            "#
        );
        assert_eq!(
            load_errors(&text),
            [
                "subscription \"kent-inbox\": owner \"police-kent\" may not subscribe to topic \
              \"referral.safeguarding\" (not in its subscribers)"
            ]
        );
    }

    #[test]
    fn unknown_owner_is_rejected_without_a_second_subscribers_error() {
        let text = format!(
            r#"{BASE}
            [[subscription]]
            name = "inbox"
            topic = "referral.safeguarding"
            owner = "nobody"
            "#
        );
        assert_eq!(
            load_errors(&text),
            ["subscription \"inbox\": owner \"nobody\" is not a configured agency"]
        );
    }

    #[test]
    fn topic_patterns_must_name_or_match_configured_agencies() {
        let text = format!(
            r#"{BASE}
            [[topic]]
            name = "notice.discharge"
            message_types = ["DischargeNotice", "interop.care.v1.DischargeNotice"]
            publishers = ["nhs-*"]
            subscribers = ["leeds-counci", "*"]
            retention = "0s"
            "#
        );
        assert_eq!(
            load_errors(&text),
            [
                "topic \"notice.discharge\": message type \"DischargeNotice\" must be a fully \
                 qualified protobuf message name such as \
                 \"interop.referral.v1.SafeguardingReferral\"",
                "topic \"notice.discharge\": publisher pattern \"nhs-*\" matches no configured \
                 agency",
                "topic \"notice.discharge\": subscriber \"leeds-counci\" is not a configured \
                 agency",
                "topic \"notice.discharge\": retention must be at least 1s (got 0s)",
            ]
        );
    }

    #[test]
    fn duplicate_names_are_reported_once_each() {
        let text = format!(
            r#"{BASE}
            [[agency]]
            id = "police-kent"
            [[agency]]
            id = "police-kent"
            [[topic]]
            name = "referral.safeguarding"
            "#
        );
        assert_eq!(
            load_errors(&text),
            [
                "agency \"police-kent\" is defined more than once",
                "topic \"referral.safeguarding\" is defined more than once",
            ]
        );
    }

    #[test]
    fn broker_limits_are_checked() {
        let text = format!(
            r#"
            [broker]
            max_message_bytes = 100
            max_in_flight = 10
            default_in_flight = 20
            dedup_window = "0s"
            cache_capacity = 1000
            max_connections = 0
            handshake_timeout = "0s"
            {BASE}"#
        );
        assert_eq!(
            load_errors(&text),
            [
                "broker.max_message_bytes must be between 1024 and 67108864 (got 100)",
                "broker.max_connections must be at least 1",
                "broker.default_in_flight (20) must not exceed broker.max_in_flight (10)",
                "broker.dedup_window must be at least 1s (got 0s)",
                "broker.cache_capacity must be at least 1048576 bytes (got 1000)",
                "broker.handshake_timeout must be greater than zero",
            ]
        );
    }

    #[test]
    fn ack_deadline_out_of_range_is_rejected() {
        let text = format!(
            r#"{BASE}
            [[subscription]]
            name = "inbox"
            topic = "referral.safeguarding"
            owner = "leeds-council"
            ack_deadline = "13h"
            "#
        );
        assert_eq!(
            load_errors(&text),
            ["subscription \"inbox\": ack_deadline must be between 1s and 12h (got 13h)"]
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(is_valid_name("police-west-yorkshire", 64, &['-']));
        assert!(is_valid_name("7", 64, &['-']));
        assert!(!is_valid_name("", 64, &['-']));
        assert!(!is_valid_name("-police", 64, &['-']));
        assert!(!is_valid_name("Police", 64, &['-']));
        assert!(!is_valid_name("police.kent", 64, &['-']));
        assert!(!is_valid_name(&"a".repeat(65), 64, &['-']));
        assert!(is_valid_name(&"a".repeat(64), 64, &['-']));
        assert!(is_valid_name(
            "referral.safe_guarding-2",
            128,
            &['.', '_', '-']
        ));
        assert!(is_qualified_type_name("interop.care.v1.DischargeNotice"));
        assert!(!is_qualified_type_name("interop..DischargeNotice"));
        assert!(!is_qualified_type_name(".interop.X"));
        assert!(!is_qualified_type_name("interop.care-v1.X"));
        assert!(!is_qualified_type_name(""));
    }

    #[test]
    fn config_errors_display_one_problem_per_line() {
        let errors = ConfigErrors(vec!["first".into(), "second".into()]);
        assert_eq!(errors.to_string(), "  - first\n  - second");
    }

    #[test]
    fn missing_file_is_reported() {
        let err = Config::load(Some(Path::new("/nonexistent/joinery.toml"))).expect_err("none");
        assert_eq!(err.0.len(), 1);
        assert!(
            err.0[0].starts_with("cannot read config file /nonexistent/joinery.toml: "),
            "{}",
            err.0[0]
        );
    }

    #[test]
    fn glob_star_matches_any_run_of_characters() {
        // prefix, suffix, middle
        assert!(glob_match("police-*", "police-west-yorkshire"));
        assert!(glob_match("police-*", "police-"));
        assert!(!glob_match("police-*", "council-leeds"));
        assert!(glob_match("*-council", "leeds-council"));
        assert!(!glob_match("*-council", "leeds-council-x"));
        assert!(glob_match("nhs-*-trust", "nhs-leeds-trust"));
        assert!(!glob_match("nhs-*-trust", "nhs-trust"));
        // multiple stars
        assert!(glob_match("*a*b*", "xaybz"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(glob_match("**", ""));
        assert!(!glob_match("a*a", "a"));
        // no star: exact
        assert!(glob_match("police-kent", "police-kent"));
        assert!(!glob_match("police-kent", "police-kent2"));
        // everything and nothing
        assert!(glob_match("*", "anything"));
        assert!(glob_match("*", ""));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "x"));
    }
}
