//! `joinery pki`: make a CA for an agency or a test network, issue agency
//! (client) and broker (server) certificates, revoke them and keep the CRL
//! fresh. Thin: parses arguments, calls [`CaDir`], prints what was written.
//!
//! Output is for people, but stable enough for scripts: `issue` and
//! `issue-server` print `serial: <hex>` on a line of its own.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::{CaDir, CertKind, CrlSummary, IssuedFiles, PkiError, RevocationReason};

const DAY: Duration = Duration::from_secs(86_400);

/// The `joinery pki` verbs.
#[derive(Debug, clap::Subcommand)]
pub enum PkiCommand {
    /// Create a CA (ca.pem, ca.key), an empty CRL (ca.crl) and the index of
    /// issued certificates (issued.tsv) in --dir. Refuses to overwrite a CA.
    Init {
        /// CA directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// The CA's common name, e.g. "Leeds City Council CA".
        #[arg(long, default_value = "joinery CA")]
        name: String,
        /// Days until the CRL's next update (refresh it before then with `joinery pki crl`).
        #[arg(long, default_value_t = 30)]
        crl_days: u32,
    },
    /// Issue an agency's client certificate (URI SAN urn:joinery:agency:<id>,
    /// clientAuth), written to <out>/<id>.pem and <out>/<id>.key.
    Issue {
        /// Agency id, as in the broker's [[agency]] id.
        agency_id: String,
        /// CA directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Output directory (default: <dir>/agencies).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the certificate is valid for.
        #[arg(long, default_value_t = 730)]
        days: u32,
        /// Replace existing output files (the old certificate stays valid until revoked).
        #[arg(long)]
        force: bool,
    },
    /// Issue a broker's server certificate (serverAuth) for DNS names and IP
    /// addresses, written to <out>/server.pem and <out>/server.key.
    IssueServer {
        /// DNS names and IP addresses clients connect to (the first is also the CN).
        #[arg(required = true)]
        names: Vec<String>,
        /// CA directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Output directory (default: <dir>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the certificate is valid for.
        #[arg(long, default_value_t = 730)]
        days: u32,
        /// Replace existing output files (the old certificate stays valid until revoked).
        #[arg(long)]
        force: bool,
    },
    /// Revoke a certificate by serial and rewrite the CRL (ca.crl). Brokers
    /// with ca.crl in [tls] crl pick it up without a restart.
    Revoke {
        /// Serial in hex, as `issue` printed it (colons and 0x are fine).
        serial: String,
        /// CA directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Why (RFC 5280 reason code).
        #[arg(long, value_enum, default_value_t = RevocationReason::Unspecified, ignore_case = true)]
        reason: RevocationReason,
        /// Days until the new CRL's next update (default: as long as the current CRL).
        #[arg(long)]
        crl_days: Option<u32>,
    },
    /// Re-sign the CRL with the same revoked certificates and a new next
    /// update. Run it from cron well before the current CRL's next update.
    Crl {
        /// CA directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Days until the CRL's next update (default: as long as the current CRL).
        #[arg(long)]
        days: Option<u32>,
    },
}

/// Runs one `joinery pki` verb, printing what it wrote to stdout.
pub fn run(command: PkiCommand) -> Result<(), PkiError> {
    match command {
        PkiCommand::Init {
            dir,
            name,
            crl_days,
        } => {
            let ca = CaDir::new(dir);
            let crl = ca.init(&name, days(crl_days))?;
            println!("created CA {name:?} in {}", ca.dir().display());
            println!("  certificate: {}", ca.ca_cert().display());
            println!("  private key: {} (keep it secret)", ca.ca_key().display());
            println!("  index:       {}", ca.index().display());
            print_crl(&crl);
        }
        PkiCommand::Issue {
            agency_id,
            dir,
            out,
            days: d,
            force,
        } => {
            let ca = CaDir::new(&dir);
            let out = out.unwrap_or_else(|| dir.join("agencies"));
            let issued = ca.issue_agency(&agency_id, days(d), &out, force)?;
            println!("issued a client certificate for agency {agency_id}");
            print_issued(&issued);
        }
        PkiCommand::IssueServer {
            names,
            dir,
            out,
            days: d,
            force,
        } => {
            let ca = CaDir::new(&dir);
            let out = out.unwrap_or_else(|| dir.clone());
            let issued = ca.issue_server(&names, days(d), &out, force)?;
            println!("issued a server certificate for {}", names.join(", "));
            print_issued(&issued);
        }
        PkiCommand::Revoke {
            serial,
            dir,
            reason,
            crl_days,
        } => {
            let r = CaDir::new(dir).revoke(&serial, reason, crl_days.map(days))?;
            let what = match r.kind {
                CertKind::Agency => format!("agency {}", r.subject),
                CertKind::Server => format!("server {}", r.subject),
            };
            if r.already_revoked {
                println!(
                    "serial {} ({what}) was already revoked at {} ({}); CRL re-signed",
                    r.serial,
                    time(r.revoked_at),
                    r.reason
                );
            } else {
                println!("revoked serial {} ({what}), reason {}", r.serial, r.reason);
            }
            print_crl(&r.crl);
        }
        PkiCommand::Crl { dir, days: d } => {
            let crl = CaDir::new(dir).refresh_crl(d.map(days))?;
            print_crl(&crl);
        }
    }
    Ok(())
}

fn days(n: u32) -> Duration {
    DAY * n
}

fn time(t: SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(t)
}

fn print_issued(issued: &IssuedFiles) {
    println!("serial: {}", issued.serial);
    println!("  certificate: {}", issued.cert.display());
    println!("  private key: {}", issued.key.display());
    println!("  expires:     {}", time(issued.not_after));
    if let Some(old) = &issued.replaced_serial {
        println!("  replaced the certificate with serial {old}, which stays valid until it expires or you revoke it");
    }
}

fn print_crl(crl: &CrlSummary) {
    println!(
        "CRL {} (number {}, {} revoked), next update {}",
        crl.path.display(),
        crl.number,
        crl.revoked,
        time(crl.next_update)
    );
    let dir = crl.path.parent().unwrap_or(std::path::Path::new("."));
    println!(
        "  refresh it before then (e.g. daily from cron): joinery pki crl --dir {}",
        dir.display()
    );
}
