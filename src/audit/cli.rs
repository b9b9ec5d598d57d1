//! `joinery audit`: verify the hash chain and export records as JSON lines.
//!
//! Both read the data directory directly (sled's database for the anchor
//! and the log's recorded end, the segment files in `audit/` for the
//! records), so they run against a stopped broker or a copy of its data
//! directory (sled allows one process at a time; a running broker makes
//! them fail with "in use by another process").

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::storage;

/// The `joinery audit` verbs.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the whole hash chain; names the first broken record.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write records as JSON lines (to stdout, or --out).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// Only records at or after this time: RFC 3339 (2026-11-01T00:00:00Z)
        /// or an age such as 24h or 7d.
        #[arg(long)]
        since: Option<String>,
        /// Only records of this agency.
        #[arg(long)]
        agency: Option<String>,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Where the store is: the data directory given, or the one in the config.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// Broker configuration (its `broker.data_dir` is read); the embedded
    /// default when neither this nor --data-dir is given.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The data directory itself.
    #[arg(long, conflicts_with = "config")]
    pub data_dir: Option<PathBuf>,
}

/// Why an audit command failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditCliError {
    #[error("invalid configuration:\n{0}")]
    Config(crate::config::ConfigErrors),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error(transparent)]
    Audit(#[from] super::AuditError),
    #[error(transparent)]
    Export(#[from] super::ExportError),
    #[error("--since {0:?} is neither an RFC 3339 time nor an age such as 24h")]
    Since(String),
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreArgs {
    /// The data directory: --data-dir, or the configuration's.
    pub fn dir(&self) -> Result<PathBuf, AuditCliError> {
        Ok(match &self.data_dir {
            Some(dir) => dir.clone(),
            None => {
                Config::load(self.config.as_deref())
                    .map_err(AuditCliError::Config)?
                    .broker
                    .data_dir
            }
        })
    }

    /// Opens the store in [`StoreArgs::dir`] (a stopped broker's): its sled
    /// database, and the data directory it was found in.
    pub fn open(&self) -> Result<(sled::Db, PathBuf), AuditCliError> {
        let dir = self.dir()?;
        Ok((storage::open_existing(&dir)?, dir))
    }
}

/// Runs one `joinery audit` verb, printing its result.
pub fn run(command: AuditCommand) -> Result<(), AuditCliError> {
    match command {
        AuditCommand::Verify { store } => {
            let (db, dir) = store.open()?;
            let v = super::verify(&db, &dir)?;
            match (v.first_seq, v.last_seq) {
                (Some(first), Some(last)) => println!(
                    "audit log verified: {} records, {first} to {last}, {} bytes{}",
                    v.records,
                    v.bytes,
                    v.anchored_at
                        .map(|a| format!(" (records before {a} pruned by retention)"))
                        .unwrap_or_default()
                ),
                _ => println!("audit log verified: no records"),
            }
            Ok(())
        }
        AuditCommand::Export {
            store,
            since,
            agency,
            out,
        } => {
            let since_ms = match since {
                Some(text) => parse_since(&text)?,
                None => 0,
            };
            let (db, dir) = store.open()?;
            let (mut writer, path): (Box<dyn Write>, PathBuf) = match &out {
                Some(path) => (
                    Box::new(std::io::BufWriter::new(
                        std::fs::File::create(path).map_err(|source| AuditCliError::Write {
                            path: path.clone(),
                            source,
                        })?,
                    )),
                    path.clone(),
                ),
                None => (Box::new(std::io::stdout().lock()), PathBuf::from("stdout")),
            };
            let n = super::export(&db, &dir, since_ms, agency.as_deref(), |record| {
                serde_json::to_writer(&mut writer, &record).map_err(std::io::Error::other)?;
                writer.write_all(b"\n")
            })?;
            writer
                .flush()
                .map_err(|source| AuditCliError::Write { path, source })?;
            eprintln!("exported {n} audit records");
            Ok(())
        }
    }
}

fn parse_since(text: &str) -> Result<u64, AuditCliError> {
    let at = if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        t
    } else if let Ok(age) = humantime::parse_duration(text) {
        SystemTime::now()
            .checked_sub(age)
            .ok_or_else(|| AuditCliError::Since(text.into()))?
    } else {
        return Err(AuditCliError::Since(text.into()));
    };
    Ok(at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64)
}
