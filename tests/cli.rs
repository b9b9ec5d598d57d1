//! The `joinery` binary as a newcomer uses it: the embedded default config on a
//! fresh directory (development PKI, publish and subscribe verbs, graceful
//! stop), and invalid configuration reported whole with exit status 64.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_joinery");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn joinery(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run joinery")
}

/// Kills the child if the test fails before stopping it.
struct Guard(Option<std::process::Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn quick_start_runs_on_a_fresh_directory_with_the_embedded_default() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = free_port();
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    let child = Command::new(BIN)
        .current_dir(dir)
        .arg("serve")
        .env("JOINERY_BROKER_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut guard = Guard(Some(child));
    let addr = format!("https://127.0.0.1:{port}");
    let read_log = || std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();

    // Publish as the police with the development certificates, retrying
    // until the broker is up.
    let started = Instant::now();
    let published = loop {
        let out = joinery(
            dir,
            &[
                "publish",
                "--addr",
                &addr,
                "--agency",
                "police-demo",
                "--topic",
                "referral.safeguarding",
                "--type",
                "interop.referral.v1.SafeguardingReferral",
                "--message-id",
                "ref-0001",
                "--data",
                "concern about child A",
            ],
        );
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "broker not publishing after 20s: {}\n--- log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            read_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(published.contains("as sequence 1"), "{published}");
    let log_text = read_log();
    assert!(
        log_text.contains("DEVELOPMENT PKI"),
        "loud dev-PKI warning: {log_text}"
    );
    for file in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "agencies/council-demo.pem",
    ] {
        assert!(dir.join("joinery-data/pki").join(file).exists(), "{file}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("joinery-data/pki/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
    }

    // The same id again is a duplicate.
    let again = joinery(
        dir,
        &[
            "publish",
            "--addr",
            &addr,
            "--agency",
            "police-demo",
            "--topic",
            "referral.safeguarding",
            "--type",
            "interop.referral.v1.SafeguardingReferral",
            "--message-id",
            "ref-0001",
            "--data",
            "concern about child A",
        ],
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("duplicate"));

    // The council receives it, with the sender from the police certificate.
    let sub = joinery(
        dir,
        &[
            "subscribe",
            "--addr",
            &addr,
            "--agency",
            "council-demo",
            "--subscription",
            "council-demo.safeguarding-inbox",
            "--count",
            "1",
            "--idle-timeout",
            "10s",
        ],
    );
    let out = String::from_utf8_lossy(&sub.stdout);
    assert!(
        sub.status.success(),
        "{}",
        String::from_utf8_lossy(&sub.stderr)
    );
    assert!(
        out.contains("#1 attempt 1 from police-demo") && out.contains("concern about child A"),
        "{out}"
    );

    // The police may not read the council's inbox.
    let denied = joinery(
        dir,
        &[
            "subscribe",
            "--addr",
            &addr,
            "--agency",
            "police-demo",
            "--subscription",
            "council-demo.safeguarding-inbox",
            "--count",
            "1",
        ],
    );
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("not_subscription_owner"));

    // SIGTERM: graceful stop, exit status 0.
    let mut child = guard.0.take().unwrap();
    let term = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "no exit 15s after SIGTERM:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", read_log());
    assert!(read_log().contains("storage flushed and closed"));
}

#[test]
fn invalid_config_reports_every_problem_and_exits_64() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bad.toml");
    std::fs::write(
        &config,
        r#"
[broker]
listen = "127.0.0.1:0"
data_dir = "data"
[tls]
ca = "ca.pem"
cert = "server.pem"
key = "server.key"
[[agency]]
id = "council"
[[topic]]
name = "referral.safeguarding"
publishers = ["police"]
subscribers = ["council"]
[[subscription]]
name = "council.inbox"
topic = "no.such.topic"
owner = "council"
max_deliveries = 0
"#,
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for verb in ["check-config", "serve"] {
        let out = joinery(tmp.path(), &[verb, "--config", config]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{verb}: {err}");
        // Three separate mistakes, all reported at once.
        assert!(err.contains("police"), "{verb}: unknown publisher: {err}");
        assert!(
            err.contains("no.such.topic"),
            "{verb}: unknown topic: {err}"
        );
        assert!(
            err.contains("max_deliveries"),
            "{verb}: bad max_deliveries: {err}"
        );
    }
    // Nothing was created for a config that never loaded.
    assert!(!tmp.path().join("data").exists());

    let out = joinery(tmp.path(), &["check-config"]);
    assert!(out.status.success(), "the embedded default is valid");
}
