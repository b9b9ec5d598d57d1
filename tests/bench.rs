//! `joinery bench` against the real binary serving the embedded default
//! configuration: each mode prints peerbench's JSON line with figures that
//! match what happened (counts, depths, latencies), runs start from an empty
//! subscription, and bad use fails clearly.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_joinery");

struct Broker {
    child: std::process::Child,
    addr: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Broker {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(BIN)
        .current_dir(dir)
        .arg("serve")
        .env("JOINERY_BROKER_LISTEN", format!("127.0.0.1:{port}"))
        .env("JOINERY_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let broker = Broker {
        child,
        addr: format!("https://127.0.0.1:{port}"),
    };
    let started = Instant::now();
    while !std::fs::read_to_string(dir.join("serve.log"))
        .unwrap_or_default()
        .contains("joinery is serving")
    {
        assert!(started.elapsed() < Duration::from_secs(30), "not serving");
        std::thread::sleep(Duration::from_millis(100));
    }
    broker
}

/// Runs `joinery bench <args> --addr ...`: (exit code, the JSON line, stderr).
fn bench(dir: &Path, broker: &Broker, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(BIN)
        .current_dir(dir)
        .arg("bench")
        .args(args)
        .args(["--addr", &broker.addr])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    let line = match lines.as_slice() {
        [line] => serde_json::from_str(line).unwrap(),
        [] => Value::Null,
        more => panic!("one JSON line expected, got {more:?}; stderr: {stderr}"),
    };
    (out.status.code().unwrap_or(-1), line, stderr)
}

#[test]
fn every_mode_prints_the_peerbench_line_with_what_happened() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let broker = serve(dir);

    let (code, pub_line, stderr) = bench(dir, &broker, &["pub", "300", "256", "window=16"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(pub_line["target"], "joinery");
    assert_eq!(pub_line["mode"], "pub");
    assert_eq!(pub_line["count"], 300);
    assert_eq!(pub_line["size"], 256);
    assert_eq!(pub_line["window"], 16);
    assert_eq!(pub_line["timed_out"], false);
    assert_eq!(pub_line["rate"]["done"], 300);
    assert!(pub_line["rate"]["msgs_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(pub_line["ack_lat_us"]["n"], 300);
    let ack = &pub_line["ack_lat_us"];
    assert!(ack["p50"].as_f64().unwrap() > 0.0);
    assert!(ack["p50"].as_f64() <= ack["p99"].as_f64());
    assert!(ack["p99"].as_f64() <= ack["max"].as_f64());
    assert_eq!(
        pub_line["depth_after"], 300,
        "every acked publish is pending"
    );
    assert!(stderr.contains("bench pub: 300 msgs"), "{stderr}");

    // The 300 left by the publish run are purged first: 200 prefilled, 200
    // consumed and acked, nothing left.
    let (code, consume, stderr) = bench(dir, &broker, &["consume", "200", "256", "prefetch=32"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(consume["mode"], "consume");
    assert_eq!(consume["prefetch"], 32);
    assert_eq!(consume["prefill"]["n"], 200);
    assert_eq!(consume["depth_before"], 200);
    assert_eq!(consume["rate"]["done"], 200);
    assert_eq!(consume["depth_after"], 0, "every ack reached the broker");
    assert_eq!(consume["timed_out"], false);

    let (code, lat, stderr) = bench(dir, &broker, &["lat", "200", "256", "rate=400"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(lat["mode"], "lat");
    assert_eq!(lat["rate_target"], 400);
    assert_eq!(lat["received"], 200);
    assert_eq!(lat["e2e_lat_us"]["n"], 200);
    assert_eq!(lat["ack_lat_us"]["n"], 200);
    let e2e = lat["e2e_lat_us"]["p50"].as_f64().unwrap();
    assert!(e2e > 0.0 && e2e < 10_000_000.0, "publish→deliver {e2e} µs");
    // 200 at 400/s take about half a second: the rate was held.
    let secs = lat["rate"]["secs"].as_f64().unwrap();
    assert!(
        secs >= 0.45,
        "a fixed-rate run of 200 at 400/s took {secs}s"
    );
    assert!(stderr.contains("200 received"), "{stderr}");
}

#[test]
fn bad_use_fails_clearly_and_a_refused_run_still_prints_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let broker = serve(dir);

    let (code, line, stderr) = bench(dir, &broker, &["pub", "10", "1024", "windw=4"]);
    assert_eq!(code, 2);
    assert_eq!(line, Value::Null);
    assert!(stderr.contains("unknown option \"windw\""), "{stderr}");
    let (code, _, stderr) = bench(dir, &broker, &["pub", "10", "8"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("at least 16 bytes"), "{stderr}");

    // The police are not operators: the purge that starts a run is refused,
    // and the line says so.
    let (code, line, stderr) = bench(
        dir,
        &broker,
        &["pub", "10", "1024", "--agency", "police-demo"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(line["target"], "joinery");
    assert_eq!(line["mode"], "pub");
    let error = line["error"].as_str().unwrap();
    assert!(error.contains("PurgeSubscription"), "{error}");
    assert!(
        error.contains("PermissionDenied") || error.contains("permission"),
        "{error}"
    );
}
