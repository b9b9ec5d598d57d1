//! `joinery audit`: verify the hash chain, export records. Being written.

use std::path::PathBuf;

/// The `joinery audit` verbs.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check the whole hash chain; names the first broken record.
    Verify {
        /// Broker configuration (for the data directory).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}
