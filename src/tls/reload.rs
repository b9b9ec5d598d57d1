//! Reloading the TLS material without a restart: on SIGHUP, and when any of
//! the files changes (checked every `[tls] reload_interval`).
//!
//! A change is a difference in any file's device, inode, size, modification or
//! change time, or in whether it exists — so both in-place writes and
//! rename-into-place (including Kubernetes-style symlink swaps) are seen. The
//! files are stamped before they are read, so a change made during a reload
//! triggers another one.
//!
//! Invariants: a failed reload is logged and reported and leaves the previous
//! material in force; it never stops the broker or this task. Every reload,
//! failed or not, is reported to the `on_reload` hook exactly once. File I/O
//! runs on the blocking pool.

use std::error::Error as _;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn, Instrument};

use super::TlsState;

/// Told the outcome of every reload: `Ok` or the error that kept the previous
/// material in force. For the audit log. Called on the reloader task, so it
/// must not block (hand the record to a channel or a buffer).
pub type OnReload = Arc<dyn Fn(Result<(), String>) + Send + Sync>;

/// Spawns the task that reloads `state` on SIGHUP and when its files change,
/// checking every `interval`. The SIGHUP handler is installed before this
/// returns. Must be called within a Tokio runtime; the task ends when `stop`
/// turns true or its sender is dropped.
pub fn spawn_reloader(
    state: Arc<TlsState>,
    interval: Duration,
    on_reload: OnReload,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; TLS files reload only when they change");
            None
        }
    };
    let reloader = Reloader {
        paths: state.files(),
        state,
        interval: interval.max(Duration::from_millis(100)),
        on_reload,
        hangup,
    };
    tokio::spawn(
        reloader
            .run(stop)
            .instrument(tracing::info_span!("tls_reload")),
    )
}

struct Reloader {
    state: Arc<TlsState>,
    paths: Vec<PathBuf>,
    interval: Duration,
    on_reload: OnReload,
    hangup: Option<Signal>,
}

/// What made a reload happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Sighup,
    FilesChanged,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Sighup => "SIGHUP",
            Trigger::FilesChanged => "files changed",
        }
    }
}

impl Reloader {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut seen = self.stamp().await;
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                _ = stop.wait_for(|stop| *stop) => break,
                Some(()) = hangup(&mut self.hangup) => Trigger::Sighup,
                _ = tick.tick() => Trigger::FilesChanged,
            };
            let stamp = self.stamp().await;
            if trigger == Trigger::FilesChanged && stamp == seen {
                continue;
            }
            seen = stamp;
            self.reload(trigger).await;
        }
    }

    async fn reload(&self, trigger: Trigger) {
        let state = self.state.clone();
        let outcome = match tokio::task::spawn_blocking(move || state.reload()).await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(e)) => Err(error_chain(&e)),
            Err(e) => Err(format!("the reload task failed: {e}")),
        };
        match outcome {
            Ok(report) => {
                info!(
                    trigger = trigger.as_str(),
                    crls = report.crls,
                    revoked = report.revoked,
                    closed_connections = report.closed,
                    "TLS certificate, CA bundle and CRLs reloaded"
                );
                (self.on_reload)(Ok(()));
            }
            Err(cause) => {
                error!(
                    trigger = trigger.as_str(),
                    cause = %cause,
                    "TLS reload failed; the previous certificate, CA bundle and CRLs stay in force"
                );
                (self.on_reload)(Err(cause));
            }
        }
    }

    async fn stamp(&self) -> Vec<Option<FileStamp>> {
        let paths = self.paths.clone();
        tokio::task::spawn_blocking(move || paths.iter().map(FileStamp::of).collect())
            .await
            .unwrap_or_default()
    }
}

/// Resolves on the next SIGHUP; never if there is no handler.
async fn hangup(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    /// `None` if the file cannot be read (a reload will say why).
    fn of(path: &PathBuf) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// An error and its sources, `: `-separated.
fn error_chain(error: &super::TlsError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsConfig;
    use crate::pki::{write_pem, CertificateAuthority};
    use std::sync::Mutex;

    fn tls_files(dir: &std::path::Path) -> (CertificateAuthority, TlsConfig) {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let server = ca.issue_server(&["localhost".to_string()]).unwrap();
        let tls = TlsConfig {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            ..TlsConfig::default()
        };
        write_pem(&tls.ca, &ca.cert_pem(), false).unwrap();
        write_pem(&tls.cert, &server.cert_pem, false).unwrap();
        write_pem(&tls.key, &server.key_pem, true).unwrap();
        (ca, tls)
    }

    #[test]
    fn stamps_change_when_a_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pem");
        assert_eq!(FileStamp::of(&path), None);
        std::fs::write(&path, "one").unwrap();
        let first = FileStamp::of(&path);
        assert!(first.is_some());
        assert_eq!(FileStamp::of(&path), first);
        std::fs::write(dir.path().join("b.pem"), "two").unwrap();
        std::fs::rename(dir.path().join("b.pem"), &path).unwrap();
        assert_ne!(FileStamp::of(&path), first);
    }

    #[test]
    fn failed_reload_keeps_the_previous_config() {
        let dir = tempfile::tempdir().unwrap();
        let (_ca, tls) = tls_files(dir.path());
        let state = TlsState::load(&tls).unwrap();
        let before = state.server_config();
        std::fs::write(&tls.key, "not a key").unwrap();
        let err = state.reload().unwrap_err();
        assert!(error_chain(&err).contains("server.key"), "{err}");
        assert!(Arc::ptr_eq(&before, &state.server_config()));
    }

    #[tokio::test]
    async fn reloads_when_files_change_and_reports_each_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, tls) = tls_files(dir.path());
        let state = TlsState::load(&tls).unwrap();
        let first = state.server_config();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let seen = outcomes.clone();
        let (stop, stop_rx) = watch::channel(false);
        let task = spawn_reloader(
            state.clone(),
            Duration::from_millis(100),
            Arc::new(move |r| seen.lock().unwrap().push(r)),
            stop_rx,
        );

        // Unchanged files: no reload.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(outcomes.lock().unwrap().is_empty());
        assert!(Arc::ptr_eq(&first, &state.server_config()));

        // A broken key: reported, previous config kept.
        std::fs::write(&tls.key, "garbage").unwrap();
        let wait = |n: usize| {
            let outcomes = outcomes.clone();
            async move {
                for _ in 0..50 {
                    if outcomes.lock().unwrap().len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("no reload reported");
            }
        };
        wait(1).await;
        assert!(outcomes.lock().unwrap()[0].is_err());
        assert!(Arc::ptr_eq(&first, &state.server_config()));

        // A new certificate and key: swapped in.
        let server = ca.issue_server(&["localhost".to_string()]).unwrap();
        write_pem(&tls.cert, &server.cert_pem, false).unwrap();
        write_pem(&tls.key, &server.key_pem, true).unwrap();
        wait(2).await;
        // The poll may have seen the cert before the key: wait for success.
        for _ in 0..50 {
            if outcomes.lock().unwrap().last().is_some_and(Result::is_ok) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(outcomes.lock().unwrap().last().unwrap().is_ok());
        assert!(!Arc::ptr_eq(&first, &state.server_config()));

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
