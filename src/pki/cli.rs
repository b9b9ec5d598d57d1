//! `joinery pki`: make a CA for an agency or a test network, issue client and
//! server certificates, revoke them (CRL). Being written.

use std::path::PathBuf;

/// The `joinery pki` verbs.
#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Create a CA (ca.pem, ca.key) in --dir.
    Init {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
}

/// Runs one `joinery pki` verb.
pub fn run(command: PkiCommand) -> Result<(), super::PkiError> {
    let _ = command;
    Err(super::PkiError::Unsupported(
        "joinery pki is not built yet".into(),
    ))
}
