//! `joinery pki` as an operator uses it, through the real binary: a CA with
//! restrictive file modes, agency and server certificates with the right SANs,
//! revocation that lands in the CRL with a rising CRL number, clear errors, and
//! the whole README flow — issue, configure, connect — against a real broker.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;

/// A valid interop.referral.v1.SafeguardingReferral (protobuf JSON).
const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/broker-config/examples/safeguarding_referral.json"
);

const BIN: &str = env!("CARGO_BIN_EXE_joinery");
const DAY: i64 = 86_400;

fn joinery(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("JOINERY_LOG", "warn")
        .output()
        .expect("run joinery")
}

/// Runs `joinery pki <args> --dir <dir>` and returns stdout, failing the test
/// (with stderr) if it fails.
fn pki(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["pki"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--dir", dir.to_str().unwrap()]);
    let out = joinery(&all);
    assert!(
        out.status.success(),
        "joinery {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a `joinery pki` command expected to fail; returns stderr.
fn pki_fails(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["pki"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--dir", dir.to_str().unwrap()]);
    let out = joinery(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "joinery {all:?} succeeded");
    assert_ne!(out.status.code(), None, "killed by a signal: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// The `serial: <hex>` line `issue` and `issue-server` print.
fn printed_serial(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("serial: "))
        .unwrap_or_else(|| panic!("no serial line in {stdout:?}"))
        .trim()
        .to_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn pem_der(path: &Path) -> Vec<u8> {
    let text = std::fs::read(path).unwrap();
    let der = rustls_pemfile::certs(&mut text.as_slice())
        .next()
        .expect("a certificate")
        .unwrap();
    der.to_vec()
}

/// What the CRL at `path` says: its number, validity and revoked serials with
/// their reason codes.
struct Crl {
    number: u64,
    this_update: i64,
    next_update: i64,
    revoked: Vec<(String, Option<u8>)>,
}

fn read_crl(path: &Path) -> Crl {
    let text = std::fs::read(path).unwrap();
    assert!(text.starts_with(b"-----BEGIN X509 CRL-----"));
    let der = rustls_pemfile::crls(&mut text.as_slice())
        .next()
        .expect("a CRL")
        .unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&der).expect("a valid CRL");
    let number = crl.crl_number().expect("a CRL number");
    let number = number
        .to_bytes_be()
        .iter()
        .fold(0u64, |n, b| (n << 8) | u64::from(*b));
    Crl {
        number,
        this_update: crl.last_update().timestamp(),
        next_update: crl.next_update().expect("next update").timestamp(),
        revoked: crl
            .iter_revoked_certificates()
            .map(|r| {
                let serial = r
                    .raw_serial()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>();
                (serial, r.reason_code().map(|(_, code)| code.0))
            })
            .collect(),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn init_creates_a_ca_its_key_and_an_empty_crl_with_restrictive_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("leeds-ca");
    let out = pki(
        &dir,
        &[
            "init",
            "--name",
            "Leeds City Council CA",
            "--crl-days",
            "10",
        ],
    );
    assert!(out.contains("created CA"), "{out}");

    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.pem")), 0o644);
    assert_eq!(mode(&dir.join("ca.crl")), 0o644);
    let key = std::fs::read_to_string(dir.join("ca.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));

    let der = pem_der(&dir.join("ca.pem"));
    let (_, ca) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn = ca.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "Leeds City Council CA");
    assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
    let ku = ca.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());

    let crl = read_crl(&dir.join("ca.crl"));
    assert_eq!(crl.number, 1);
    assert!(crl.revoked.is_empty());
    assert!((crl.this_update - now()).abs() < 120);
    assert_eq!(crl.next_update - crl.this_update, 10 * DAY);
}

#[test]
fn init_refuses_to_overwrite_an_existing_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    pki(&dir, &["init"]);
    let before = std::fs::read(dir.join("ca.key")).unwrap();
    let err = pki_fails(&dir, &["init", "--name", "another"]);
    assert!(err.contains("a CA already exists"), "{err}");
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), before);
}

#[test]
fn issue_writes_a_client_certificate_naming_the_agency() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out_dir = tmp.path().join("certs");
    pki(&dir, &["init"]);
    let out = pki(
        &dir,
        &[
            "issue",
            "police-west",
            "--out",
            out_dir.to_str().unwrap(),
            "--days",
            "90",
        ],
    );
    let serial = printed_serial(&out);
    let cert = out_dir.join("police-west.pem");
    let key = out_dir.join("police-west.key");
    assert!(out.contains(cert.to_str().unwrap()), "{out}");
    assert!(out.contains(key.to_str().unwrap()), "{out}");
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&cert), 0o644);

    let der = pem_der(&cert);
    assert_eq!(
        joinery::tls::agency_from_cert(&der, &|_| true).as_deref(),
        Ok("police-west")
    );
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = &x509
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(
        sans,
        &vec![GeneralName::URI("urn:joinery:agency:police-west")]
    );
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let serial_hex: String = x509
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(serial, serial_hex);
    let not_after = x509.validity().not_after.timestamp();
    assert!((not_after - now() - 90 * DAY).abs() < 120);

    // It chains to the CA.
    let ca_der = pem_der(&dir.join("ca.pem"));
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert_eq!(x509.issuer().as_raw(), ca.subject().as_raw());

    // Recorded in the index so it can be revoked.
    let index = std::fs::read_to_string(dir.join("issued.tsv")).unwrap();
    let line = index.lines().find(|l| l.starts_with(&serial)).unwrap();
    assert!(line.contains("\tagency\tpolice-west\t"), "{line}");
    assert!(line.contains("\tvalid\t"), "{line}");

    // The same agency again does not silently replace its key.
    let err = pki_fails(
        &dir,
        &["issue", "police-west", "--out", out_dir.to_str().unwrap()],
    );
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let again = pki(
        &dir,
        &[
            "issue",
            "police-west",
            "--out",
            out_dir.to_str().unwrap(),
            "--force",
        ],
    );
    assert_ne!(printed_serial(&again), serial);
    assert!(
        again.contains(&serial),
        "names the replaced serial: {again}"
    );

    // Without --out, certificates go where `joinery publish --pki-dir` looks.
    pki(&dir, &["issue", "council"]);
    assert!(dir.join("agencies/council.pem").exists());
    assert_eq!(mode(&dir.join("agencies/council.key")), 0o600);

    let err = pki_fails(&dir, &["issue", "../escape"]);
    assert!(err.contains("invalid agency id"), "{err}");
}

#[test]
fn issue_server_puts_ip_addresses_in_ip_sans() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out_dir = tmp.path().join("server");
    pki(&dir, &["init"]);
    let out = pki(
        &dir,
        &[
            "issue-server",
            "broker.leeds.gov.uk",
            "localhost",
            "127.0.0.1",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    let serial = printed_serial(&out);
    assert_eq!(mode(&out_dir.join("server.key")), 0o600);
    let der = pem_der(&out_dir.join("server.pem"));
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = &x509
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(sans.contains(&GeneralName::DNSName("broker.leeds.gov.uk")));
    assert!(sans.contains(&GeneralName::DNSName("localhost")));
    assert!(sans.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
    assert!(!sans.contains(&GeneralName::DNSName("127.0.0.1")));
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    let index = std::fs::read_to_string(dir.join("issued.tsv")).unwrap();
    assert!(index.contains(&format!(
        "{serial}\tserver\tbroker.leeds.gov.uk localhost 127.0.0.1\t"
    )));

    let err = pki_fails(&dir, &["issue-server", "not a name"]);
    assert!(err.contains("not a valid DNS name"), "{err}");
}

#[test]
fn revoke_lists_the_serial_in_the_crl_and_raises_the_crl_number() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    pki(&dir, &["init", "--crl-days", "7"]);
    let police = printed_serial(&pki(&dir, &["issue", "police"]));
    let council = printed_serial(&pki(&dir, &["issue", "council"]));
    let crl_path = dir.join("ca.crl");
    assert_eq!(read_crl(&crl_path).number, 1);

    let out = pki(&dir, &["revoke", &police, "--reason", "keyCompromise"]);
    assert!(
        out.contains("revoked serial") && out.contains("agency police"),
        "{out}"
    );
    let crl = read_crl(&crl_path);
    assert_eq!(crl.number, 2);
    assert_eq!(crl.revoked, vec![(police.clone(), Some(1))]);
    assert!((crl.this_update - now()).abs() < 120);
    assert_eq!(crl.next_update - crl.this_update, 7 * DAY);
    let index = std::fs::read_to_string(dir.join("issued.tsv")).unwrap();
    let line = index.lines().find(|l| l.starts_with(&police)).unwrap();
    assert!(line.contains("\trevoked\t") && line.ends_with("\tkeyCompromise"));

    // Twice is harmless: still listed once, with the first reason; the CRL is
    // re-signed. Serials may be typed as openssl prints them.
    let colons = police
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    let out = pki(&dir, &["revoke", &colons, "--reason", "superseded"]);
    assert!(out.contains("already revoked"), "{out}");
    let crl = read_crl(&crl_path);
    assert_eq!(crl.number, 3);
    assert_eq!(crl.revoked, vec![(police.clone(), Some(1))]);

    let out = pki(&dir, &["revoke", &council, "--reason", "superseded"]);
    assert!(out.contains("2 revoked"), "{out}");
    let crl = read_crl(&crl_path);
    assert_eq!(crl.number, 4);
    assert_eq!(
        crl.revoked,
        vec![(police.clone(), Some(1)), (council.clone(), Some(4))]
    );

    // `pki crl` re-signs with the same list, a higher number and a fresh date.
    let out = pki(&dir, &["crl", "--days", "3"]);
    assert!(out.contains("number 5"), "{out}");
    let crl = read_crl(&crl_path);
    assert_eq!(crl.number, 5);
    assert_eq!(crl.revoked.len(), 2);
    assert_eq!(crl.next_update - crl.this_update, 3 * DAY);
    // And later ones keep that period.
    pki(&dir, &["crl"]);
    let crl = read_crl(&crl_path);
    assert_eq!(
        (crl.number, crl.next_update - crl.this_update),
        (6, 3 * DAY)
    );
}

#[test]
fn revoke_of_an_unknown_serial_fails_clearly_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    pki(&dir, &["init"]);
    pki(&dir, &["issue", "police"]);
    let crl_before = std::fs::read(dir.join("ca.crl")).unwrap();
    let index_before = std::fs::read(dir.join("issued.tsv")).unwrap();

    let err = pki_fails(&dir, &["revoke", "0badc0ffee"]);
    assert!(
        err.contains("serial 0badc0ffee is not in") && err.contains("issued.tsv"),
        "{err}"
    );
    let err = pki_fails(&dir, &["revoke", "not-hex!"]);
    assert!(err.contains("invalid serial"), "{err}");
    let err = pki_fails(&dir, &["revoke", "0badc0ffee", "--reason", "bored"]);
    assert!(err.contains("keyCompromise"), "lists the reasons: {err}");

    assert_eq!(std::fs::read(dir.join("ca.crl")).unwrap(), crl_before);
    assert_eq!(std::fs::read(dir.join("issued.tsv")).unwrap(), index_before);

    let missing = tmp.path().join("no-ca-here");
    let err = pki_fails(&missing, &["revoke", "0badc0ffee"]);
    assert!(err.contains("joinery pki init"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the broker when the test ends, passed or failed.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `joinery publish` or `subscribe` as `agency`, with the files `pki issue` wrote.
fn client(verb: &str, addr: &str, ca: &Path, agency: &Path, args: &[&str]) -> Output {
    let cert = agency.with_extension("pem");
    let key = agency.with_extension("key");
    let mut all = vec![
        verb,
        "--addr",
        addr,
        "--ca",
        ca.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    joinery(&all)
}

#[test]
fn an_agency_joins_a_network_issue_configure_connect() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ca_dir = root.join("pki");
    let tls_dir: PathBuf = root.join("tls");
    let agencies = root.join("agencies");

    // Issue: a CA, the broker's certificate, one certificate per agency.
    pki(&ca_dir, &["init", "--name", "Test Network CA"]);
    pki(
        &ca_dir,
        &[
            "issue-server",
            "localhost",
            "127.0.0.1",
            "--out",
            tls_dir.to_str().unwrap(),
        ],
    );
    let mut serials = std::collections::HashMap::new();
    for agency in ["police", "council"] {
        let out = pki(
            &ca_dir,
            &["issue", agency, "--out", agencies.to_str().unwrap()],
        );
        serials.insert(agency, printed_serial(&out));
    }

    // Configure: the agencies, who may publish and subscribe, an inbox.
    let port = free_port();
    let config = root.join("joinery.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[broker]
listen = "127.0.0.1:{port}"
data_dir = "{data}"
shutdown_grace = "5s"

[tls]
ca = "{ca}/ca.pem"
cert = "{tls}/server.pem"
key = "{tls}/server.key"
crl = ["{ca}/ca.crl"]
reload_interval = "1s"

[metrics]
listen = "127.0.0.1:0"

[[agency]]
id = "police"
name = "Test Police"
[[agency]]
id = "council"
name = "Test Council"

[[topic]]
name = "referral.safeguarding"
message_types = ["interop.referral.v1.SafeguardingReferral"]
publishers = ["police"]
subscribers = ["council"]

[[subscription]]
name = "council.safeguarding-inbox"
topic = "referral.safeguarding"
owner = "council"
"#,
            data = root.join("data").display(),
            ca = ca_dir.display(),
            tls = tls_dir.display(),
        ),
    )
    .unwrap();
    let check = joinery(&["check-config", "--config", config.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let log_path = root.join("serve.log");
    let broker = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut broker = KillOnDrop(broker);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Connect: the police publish (retrying while the broker starts)...
    let addr = format!("https://127.0.0.1:{port}");
    let ca = ca_dir.join("ca.pem");
    let started = Instant::now();
    let published = loop {
        let out = client(
            "publish",
            &addr,
            &ca,
            &agencies.join("police"),
            &[
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
        if let Some(status) = broker.0.try_wait().unwrap() {
            panic!("broker exited ({status}):\n{}", log());
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cannot publish: {}\n--- broker log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(published.contains("as sequence 1"), "{published}");

    // ...and the council receives it, the sender taken from the certificate.
    let sub = client(
        "subscribe",
        &addr,
        &ca,
        &agencies.join("council"),
        &[
            "--subscription",
            "council.safeguarding-inbox",
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
        "{}\n--- broker log ---\n{}",
        String::from_utf8_lossy(&sub.stderr),
        log()
    );
    assert!(
        out.contains("from police") && out.contains("\"referralReference\":\"RR8-SG-2025-00412\""),
        "{out}"
    );

    // Revoke: the police certificate is refused once the broker has reloaded
    // the CRL — no restart — while the council's still works.
    pki(
        &ca_dir,
        &["revoke", &serials["police"], "--reason", "keyCompromise"],
    );
    // Publishes until the broker has reloaded the CRL (every second) and
    // refuses the police. Every attempt carries the same payload, so what
    // was accepted is checked by count below.
    let publish_as_police = || {
        client(
            "publish",
            &addr,
            &ca,
            &agencies.join("police"),
            &[
                "--topic",
                "referral.safeguarding",
                "--type",
                "interop.referral.v1.SafeguardingReferral",
                "--json",
                EXAMPLE,
            ],
        )
    };
    let revoked_at = Instant::now();
    let mut accepted_before_reload = 0;
    loop {
        let out = publish_as_police();
        if !out.status.success() {
            break;
        }
        accepted_before_reload += 1;
        assert!(
            revoked_at.elapsed() < Duration::from_secs(20),
            "the revoked certificate still works 20s after revocation\n--- broker log ---\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!publish_as_police().status.success());
    assert!(broker.0.try_wait().unwrap().is_none(), "broker restarted?");

    // The council still connects, and gets only what was accepted.
    let sub = client(
        "subscribe",
        &addr,
        &ca,
        &agencies.join("council"),
        &[
            "--subscription",
            "council.safeguarding-inbox",
            "--idle-timeout",
            "2s",
        ],
    );
    let out = String::from_utf8_lossy(&sub.stdout);
    assert!(
        sub.status.success(),
        "the council still connects: {}",
        String::from_utf8_lossy(&sub.stderr)
    );
    // Why the police were refused, from the broker's log: the client's
    // error depends on a race (the alert, or the connection closing first).
    // A new connection is refused in its handshake. A connection live when
    // the CRL was reloaded is closed instead, and a publish in flight on it
    // may have been stored before the close although its client saw a
    // failure (at least once): that publish is in doubt. Only one police
    // connection is open at a time, so at most one is closed so.
    let log = log();
    assert!(
        log.lines()
            .any(|l| l.contains("tls handshake failed") && l.contains("certificate revoked")),
        "no handshake was refused for revocation\n--- broker log ---\n{log}"
    );
    let in_doubt = log
        .lines()
        .filter(|l| {
            l.contains("closing connection")
                && l.contains("agency=\"police\"")
                && l.contains("its client certificate has been revoked")
        })
        .count();
    assert!(in_doubt <= 1, "{in_doubt} police connections closed\n{log}");
    // One line per delivery: a refused publish would make one more.
    let delivered = out.lines().count();
    println!("{accepted_before_reload} accepted, {in_doubt} in doubt, {delivered} delivered");
    assert!(
        delivered >= accepted_before_reload,
        "an accepted message was lost: {delivered} delivered, \
         {accepted_before_reload} accepted: {out}"
    );
    assert!(
        delivered <= accepted_before_reload + in_doubt,
        "a message from a revoked certificate was accepted: {delivered} delivered, \
         {accepted_before_reload} accepted, {in_doubt} in doubt: {out}\n--- broker log ---\n{log}"
    );

    let _ = broker.0.kill();
    let _ = broker.0.wait();
}
