//! The `joinery` binary as a newcomer uses it: the embedded default config on a
//! fresh directory (development PKI, publish and subscribe verbs, graceful
//! stop), and invalid configuration reported whole with exit status 64.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A valid interop.referral.v1.SafeguardingReferral (protobuf JSON).
const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/broker-config/examples/safeguarding_referral.json"
);

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
        .env("JOINERY_METRICS_LISTEN", "127.0.0.1:0")
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
                "--json",
                EXAMPLE,
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
            "--json",
            EXAMPLE,
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
            "--json",
        ],
    );
    let out = String::from_utf8_lossy(&sub.stdout);
    assert!(
        sub.status.success(),
        "{}",
        String::from_utf8_lossy(&sub.stderr)
    );
    assert!(
        out.contains("#1 attempt 1 from police-demo")
            && out.contains("\"referralReference\":\"RR8-SG-2025-00412\""),
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

/// Starts `joinery serve` with the embedded default in `dir` on `port`.
fn serve(dir: &Path, port: u16, log: &str) -> std::process::Child {
    Command::new(BIN)
        .current_dir(dir)
        .arg("serve")
        .env("JOINERY_BROKER_LISTEN", format!("127.0.0.1:{port}"))
        .env("JOINERY_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap())
        .spawn()
        .unwrap()
}

fn wait_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_second_broker_on_the_same_data_dir_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _first = Guard(Some(serve(dir, free_port(), "first.log")));
    // Wait until the first owns the data dir.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(dir.join("first.log"))
        .unwrap_or_default()
        .contains("serving")
    {
        assert!(Instant::now() < deadline, "first broker did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut second = Guard(Some(serve(dir, free_port(), "second.log")));
    let status = wait_exit(second.0.as_mut().unwrap(), Duration::from_secs(20))
        .expect("the second broker must exit, not wait");
    second.0 = None;
    let log = std::fs::read_to_string(dir.join("second.log")).unwrap();
    assert!(!status.success());
    assert!(log.contains("in use by another process"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn corrupt_storage_fails_with_a_clear_error_instead_of_starting_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = free_port();
    let addr = format!("https://127.0.0.1:{port}");
    // A store in use: one message waiting.
    let mut first = Guard(Some(serve(dir, port, "first.log")));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = joinery(
            dir,
            &[
                "publish",
                "--addr",
                &addr,
                "--topic",
                "referral.safeguarding",
                "--type",
                "interop.referral.v1.SafeguardingReferral",
                "--json",
                EXAMPLE,
            ],
        );
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = first.0.as_ref().unwrap().id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = wait_exit(first.0.as_mut().unwrap(), Duration::from_secs(15)).unwrap();
    first.0 = None;
    assert!(status.success());

    // Its data file is damaged: sled alone would open it as an empty store.
    let data = dir.join("joinery-data");
    std::fs::write(data.join("db"), vec![0xA5u8; 256 * 1024]).unwrap();
    let mut again = Guard(Some(serve(dir, free_port(), "again.log")));
    let status = wait_exit(again.0.as_mut().unwrap(), Duration::from_secs(20))
        .expect("the broker must exit on unrecoverable storage");
    again.0 = None;
    let log = std::fs::read_to_string(dir.join("again.log")).unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("recovered no data"), "{log}");
    assert!(!log.contains("is serving"), "{log}");

    // A damaged sled config file is refused too, without a panic.
    std::fs::write(data.join("conf"), b"not a sled config at all").unwrap();
    let mut third = Guard(Some(serve(dir, free_port(), "third.log")));
    let status = wait_exit(third.0.as_mut().unwrap(), Duration::from_secs(20))
        .expect("the broker must exit on a corrupt sled config");
    third.0 = None;
    let log = std::fs::read_to_string(dir.join("third.log")).unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("data directory"), "{log}");
}
