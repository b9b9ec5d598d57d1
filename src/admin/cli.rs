//! The operator's command line over the Admin API (mutual TLS, an operator's
//! certificate): `joinery stats`, `joinery dlq list|redrive`, `joinery purge`
//! and `joinery peek`. Human tables on stdout by default, `--json` for
//! scripts; progress of long operations goes to stderr.

use std::io::{IsTerminal, Write};
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Value};
use tonic::transport::Channel;

use super::MAX_REDRIVE;
use crate::client::{connect_channel, ClientError, ClientOptions};
use crate::proto::admin_client::AdminClient;
use crate::proto::{
    GetStatsRequest, GetStatsResponse, ListDeadLettersRequest, Marking, PeekMessagesRequest,
    PurgeSubscriptionRequest, RedriveDeadLettersRequest,
};

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminCliError {
    #[error(transparent)]
    Connect(#[from] ClientError),
    /// The broker refused or failed the call (its status says why).
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("could not write the output")]
    Output(#[from] std::io::Error),
    #[error("could not encode the output as JSON")]
    Json(#[from] serde_json::Error),
}

type Result<T> = std::result::Result<T, AdminCliError>;

/// `joinery stats`
#[derive(Debug, Clone, clap::Args)]
pub struct StatsArgs {
    /// Refresh every this many seconds until interrupted.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<u64>,
    /// JSON (one object per refresh with --watch).
    #[arg(long)]
    pub json: bool,
}

/// `joinery dlq list`
#[derive(Debug, Clone, clap::Args)]
pub struct DlqListArgs {
    pub subscription: String,
    /// Most dead letters to show (at most 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Start after this sequence (paging).
    #[arg(long, default_value_t = 0, value_name = "SEQ")]
    pub after: u64,
    #[arg(long)]
    pub json: bool,
}

/// `joinery dlq redrive`
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["all", "seq"])))]
pub struct DlqRedriveArgs {
    pub subscription: String,
    /// Redrive every dead letter of the subscription.
    #[arg(long)]
    pub all: bool,
    /// Redrive the dead letters with these sequences (repeatable).
    #[arg(long, value_name = "N", num_args = 1..)]
    pub seq: Vec<u64>,
    #[arg(long)]
    pub json: bool,
}

/// `joinery purge`
#[derive(Debug, Clone, clap::Args)]
pub struct PurgeArgs {
    pub subscription: String,
    /// The subscription's name again: a purge cannot be undone.
    #[arg(long, value_name = "SUBSCRIPTION")]
    pub confirm: String,
    #[arg(long)]
    pub json: bool,
}

/// `joinery peek`
#[derive(Debug, Clone, clap::Args)]
pub struct PeekArgs {
    pub subscription: String,
    /// How many of the next pending messages (at most 100).
    #[arg(long, default_value_t = 10)]
    pub limit: u32,
    /// Show payloads too (as protobuf JSON when the broker knows the type);
    /// needs clearance for the topic's marking. Audited.
    #[arg(long)]
    pub payload: bool,
    #[arg(long)]
    pub json: bool,
}

async fn connect(options: &ClientOptions) -> Result<(Channel, AdminClient<Channel>)> {
    let channel = connect_channel(options).await?;
    Ok((channel.clone(), AdminClient::new(channel)))
}

/// `joinery stats [--watch SECS] [--json]`
pub async fn stats(options: &ClientOptions, args: &StatsArgs) -> Result<()> {
    let (_, mut client) = connect(options).await?;
    let Some(every) = args.watch else {
        let stats = client.get_stats(GetStatsRequest {}).await?.into_inner();
        return print_stats(&stats, args.json);
    };
    let every = Duration::from_secs(every.max(1));
    let clear = !args.json && std::io::stdout().is_terminal();
    loop {
        let stats = client.get_stats(GetStatsRequest {}).await?.into_inner();
        if clear {
            print!("\x1b[2J\x1b[H");
        }
        if !args.json {
            println!(
                "{} (every {}s; Ctrl-C to stop)\n",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                every.as_secs()
            );
        }
        print_stats(&stats, args.json)?;
        std::io::stdout().flush()?;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn print_stats(stats: &GetStatsResponse, as_json: bool) -> Result<()> {
    if as_json {
        let value = json!({
            "subscriptions": stats.subscriptions.iter().map(|s| json!({
                "name": s.name,
                "topic": s.topic,
                "owner": s.owner,
                "depth": s.depth,
                "in_flight": s.in_flight,
                "oldest_unacked_seconds": s.oldest_unacked_age_ms as f64 / 1000.0,
                "dead_letters": s.dead_letters,
            })).collect::<Vec<_>>(),
            "refusals": stats.refusals.iter().map(|r| (r.reason.clone(), json!(r.count))).collect::<serde_json::Map<_, _>>(),
            "flushes": stats.flushes,
            "publishes": stats.publishes,
            "max_publishes_per_flush": stats.max_publishes_per_flush,
        });
        println!("{}", serde_json::to_string(&value)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = stats
        .subscriptions
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.topic.clone(),
                s.owner.clone(),
                s.depth.to_string(),
                s.in_flight.to_string(),
                age(s.oldest_unacked_age_ms),
                s.dead_letters.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                ("SUBSCRIPTION", false),
                ("TOPIC", false),
                ("OWNER", false),
                ("DEPTH", true),
                ("IN FLIGHT", true),
                ("OLDEST UNACKED", true),
                ("DEAD LETTERS", true),
            ],
            &rows
        )
    );
    println!(
        "\n{} publishes in {} flushes (at most {} in one flush)",
        stats.publishes, stats.flushes, stats.max_publishes_per_flush
    );
    if !stats.refusals.is_empty() {
        let refusals: Vec<String> = stats
            .refusals
            .iter()
            .map(|r| format!("{} {}", r.reason, r.count))
            .collect();
        println!("refused requests: {}", refusals.join(", "));
    }
    Ok(())
}

/// `joinery dlq list <subscription>`
pub async fn dlq_list(options: &ClientOptions, args: &DlqListArgs) -> Result<()> {
    let (_, mut client) = connect(options).await?;
    let page = client
        .list_dead_letters(ListDeadLettersRequest {
            subscription: args.subscription.clone(),
            limit: args.limit,
            after_sequence: args.after,
        })
        .await?
        .into_inner();
    if args.json {
        let value = json!({
            "subscription": args.subscription,
            "total": page.total,
            "next_after_sequence": page.next_after_sequence,
            "dead_letters": page.dead_letters.iter().map(|d| json!({
                "sequence": d.sequence,
                "message_id": d.message_id,
                "message_type": d.message_type,
                "sender": d.sender,
                "reason": d.reason,
                "attempts": d.attempts,
                "dead_lettered_at": time(d.dead_lettered_at.as_ref()),
                "published_at": time(d.published_at.as_ref()),
                "correlation_id": d.correlation_id,
                "marking": marking(d.marking),
                "payload_bytes": d.payload_bytes,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string(&value)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = page
        .dead_letters
        .iter()
        .map(|d| {
            vec![
                d.sequence.to_string(),
                d.message_id.clone(),
                d.message_type.clone(),
                d.sender.clone(),
                d.reason.clone(),
                d.attempts.to_string(),
                time(d.dead_lettered_at.as_ref()),
                time(d.published_at.as_ref()),
            ]
        })
        .collect();
    if !rows.is_empty() {
        print!(
            "{}",
            table(
                &[
                    ("SEQ", true),
                    ("MESSAGE ID", false),
                    ("TYPE", false),
                    ("SENDER", false),
                    ("REASON", false),
                    ("ATTEMPTS", true),
                    ("DEAD-LETTERED", false),
                    ("PUBLISHED", false),
                ],
                &rows
            )
        );
    }
    println!(
        "{} of {} dead letter(s) of {} shown",
        rows.len(),
        page.total,
        args.subscription
    );
    if page.next_after_sequence != 0 {
        println!("more: --after {}", page.next_after_sequence);
    }
    Ok(())
}

/// `joinery dlq redrive <subscription> (--all | --seq N...)`
pub async fn dlq_redrive(options: &ClientOptions, args: &DlqRedriveArgs) -> Result<()> {
    let (_, mut client) = connect(options).await?;
    let name = &args.subscription;
    let mut redriven = 0u64;
    let mut missing = Vec::new();
    let mut remaining = 0u64;
    if args.all {
        // Each call redrives at most MAX_REDRIVE; messages that die again
        // while this runs are not redriven twice.
        let mut budget: Option<u64> = None;
        loop {
            let answer = client
                .redrive_dead_letters(RedriveDeadLettersRequest {
                    subscription: name.clone(),
                    sequences: Vec::new(),
                })
                .await?
                .into_inner();
            let budget = *budget.get_or_insert(answer.redriven + answer.remaining);
            redriven += answer.redriven;
            remaining = answer.remaining;
            if !args.json {
                eprintln!("redriven {redriven} of {budget} dead letter(s) of {name}");
            }
            if answer.redriven == 0 || remaining == 0 || redriven >= budget {
                break;
            }
        }
    } else {
        let total = args.seq.len();
        for chunk in args.seq.chunks(MAX_REDRIVE) {
            let answer = client
                .redrive_dead_letters(RedriveDeadLettersRequest {
                    subscription: name.clone(),
                    sequences: chunk.to_vec(),
                })
                .await?
                .into_inner();
            redriven += answer.redriven;
            remaining = answer.remaining;
            missing.extend(answer.missing);
            if !args.json && total > MAX_REDRIVE {
                eprintln!("redriven {redriven} of {total} requested dead letter(s) of {name}");
            }
        }
    }
    if args.json {
        let value = json!({
            "subscription": name,
            "redriven": redriven,
            "missing": missing,
            "remaining": remaining,
        });
        println!("{}", serde_json::to_string(&value)?);
        return Ok(());
    }
    if redriven == 0 {
        println!("no dead letters of {name} were redriven; {remaining} dead letter(s) left");
    } else {
        println!(
            "redriven {redriven} dead letter(s) of {name}: they are delivered again (attempt 1); {remaining} dead letter(s) left"
        );
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(u64::to_string).collect();
        println!("not dead letters of {name}: {}", list.join(", "));
    }
    Ok(())
}

/// `joinery purge <subscription> --confirm <subscription>`
pub async fn purge(options: &ClientOptions, args: &PurgeArgs) -> Result<()> {
    let (_, mut client) = connect(options).await?;
    let name = &args.subscription;
    if !args.json {
        eprintln!("purging every pending message of {name} ...");
    }
    let answer = client
        .purge_subscription(PurgeSubscriptionRequest {
            subscription: name.clone(),
            confirm: args.confirm.clone(),
        })
        .await?
        .into_inner();
    if args.json {
        let value = json!({ "subscription": name, "purged": answer.purged });
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!("purged {} pending message(s) from {name}", answer.purged);
    }
    Ok(())
}

/// `joinery peek <subscription> [--limit N] [--payload]`
pub async fn peek(options: &ClientOptions, args: &PeekArgs) -> Result<()> {
    let (channel, mut client) = connect(options).await?;
    let answer = client
        .peek_messages(PeekMessagesRequest {
            subscription: args.subscription.clone(),
            limit: args.limit,
            include_payload: args.payload,
        })
        .await?
        .into_inner();
    let mut codec = crate::schema::cli::JsonCodec::default();
    let mut out = Vec::new();
    for m in &answer.messages {
        let envelope = m.envelope.clone().unwrap_or_default();
        let payload = if args.payload {
            match codec
                .decode(&channel, &envelope.message_type, &envelope.payload)
                .await
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            {
                Some(value) => Some(value),
                None => Some(json!({ "hex": hex(&envelope.payload) })),
            }
        } else {
            None
        };
        let mut headers: Vec<(String, String)> = envelope.headers.clone().into_iter().collect();
        headers.sort();
        out.push(json!({
            "sequence": m.sequence,
            "attempts": m.attempts,
            "published_at": time(m.published_at.as_ref()),
            "not_before": m.not_before.as_ref().map(|t| time(Some(t))),
            "message_id": envelope.message_id,
            "message_type": envelope.message_type,
            "sender": envelope.sender,
            "marking": marking(envelope.marking),
            "created_at": envelope.created_at.as_ref().map(|t| time(Some(t))),
            "expires_at": envelope.expires_at.as_ref().map(|t| time(Some(t))),
            "correlation_id": envelope.correlation_id,
            "causation_id": envelope.causation_id,
            "headers": headers.into_iter().map(|(k, v)| (k, Value::String(v))).collect::<serde_json::Map<_, _>>(),
            "recipients": envelope.recipients,
            "payload_bytes": m.payload_bytes,
            "payload": payload,
        }));
    }
    if args.json {
        let value = json!({ "subscription": args.subscription, "messages": out });
        println!("{}", serde_json::to_string(&value)?);
        return Ok(());
    }
    for m in &out {
        let text = |key: &str| m[key].as_str().unwrap_or_default().to_string();
        println!(
            "#{} attempts {} published {} id {} type {} from {} {}",
            m["sequence"],
            m["attempts"],
            text("published_at"),
            text("message_id"),
            text("message_type"),
            text("sender"),
            text("marking"),
        );
        let mut details = Vec::new();
        for (key, label) in [
            ("created_at", "created"),
            ("expires_at", "expires"),
            ("not_before", "not before"),
            ("correlation_id", "correlation"),
            ("causation_id", "causation"),
        ] {
            let value = text(key);
            if !value.is_empty() {
                details.push(format!("{label} {value}"));
            }
        }
        if let Some(recipients) = m["recipients"].as_array().filter(|r| !r.is_empty()) {
            let list: Vec<&str> = recipients.iter().filter_map(Value::as_str).collect();
            details.push(format!("recipients {}", list.join(",")));
        }
        if let Some(headers) = m["headers"].as_object().filter(|h| !h.is_empty()) {
            let list: Vec<String> = headers
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            details.push(format!("headers {}", list.join(" ")));
        }
        if !details.is_empty() {
            println!("    {}", details.join("  "));
        }
        match &m["payload"] {
            Value::Null => println!(
                "    payload: {} bytes (not shown; --payload to show)",
                m["payload_bytes"]
            ),
            payload => println!("    payload: {payload}"),
        }
    }
    println!(
        "{} pending message(s) of {} shown",
        out.len(),
        args.subscription
    );
    Ok(())
}

/// Columns padded to their widest cell; numeric ones right-aligned.
fn table(columns: &[(&str, bool)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            let numeric = columns.get(i).is_some_and(|(_, n)| *n);
            if i > 0 {
                out.push_str("  ");
            }
            let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
            if numeric {
                out.push_str(&pad);
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if i + 1 < cells.len() {
                    out.push_str(&pad);
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(columns.iter().map(|(h, _)| *h).collect());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A short age: 0s, 45s, 3m12s, 2h05m, 3d04h.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return String::new();
    };
    match u64::try_from(ts.seconds) {
        Ok(secs) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
        }
        Err(_) => String::new(),
    }
}

fn marking(value: i32) -> &'static str {
    match Marking::try_from(value) {
        Ok(Marking::OfficialSensitive) => "OFFICIAL_SENSITIVE",
        Ok(_) => "OFFICIAL",
        Err(_) => "UNKNOWN",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short_and_readable() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(45_900), "45s");
        assert_eq!(age(192_000), "3m12s");
        assert_eq!(age(7_500_000), "2h05m");
        assert_eq!(age(273_600_000), "3d04h");
    }

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let out = table(
            &[("NAME", false), ("DEPTH", true)],
            &[
                vec!["a".into(), "7".into()],
                vec!["longer".into(), "1234".into()],
            ],
        );
        assert_eq!(out, "NAME    DEPTH\na           7\nlonger   1234\n");
    }
}
