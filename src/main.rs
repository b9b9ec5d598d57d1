//! The `joinery` command: parses the command line, loads configuration, sets
//! up logging and the TLS crypto provider, and calls the library.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use tokio_stream::StreamExt;

use joinery::admin::cli as admin_cli;
use joinery::client::ClientOptions;
use joinery::config::Config;
use joinery::proto::{subscribe_request, Envelope, PublishRequest, SubscribeRequest};

/// sled rewrites tree nodes copy-on-write, so the writer thread allocates and
/// frees heavily; under glibc's malloc a third of its time went to the
/// allocator (perf, `joinery bench pub 100000 1024 window=256`). Built with
/// `no_thp`: with transparent huge pages mimalloc kept whole 2 MiB pages
/// resident (idle RSS 89 MB instead of 32 MB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for invalid configuration (EX_USAGE-adjacent: sysexits EX_USAGE is 64).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "joinery",
    version,
    about = "A durable, secure message broker for UK public-service agencies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the embedded default config when --config is not given).
    Serve {
        /// TOML configuration file (see broker-config/joinery.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and print every problem found.
    CheckConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Publish a message (optionally many, to measure throughput).
    Publish(PublishArgs),
    /// Consume a subscription, printing each delivery and acking it.
    Subscribe(SubscribeArgs),
    /// Load generator: publish, consume or latency runs printing peerbench's JSON line.
    Bench(BenchArgs),
    /// Certificates: create a CA, issue agency and server certificates, revoke them.
    Pki {
        #[command(subcommand)]
        command: joinery::pki::cli::PkiCommand,
    },
    /// Message schemas: list the broker's, check a directory, register it.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
    /// The audit log: verify its hash chain, export records.
    Audit {
        #[command(subcommand)]
        command: joinery::audit::cli::AuditCommand,
    },
    /// What the store holds by kind of key, against its size on disk (reads a stopped broker's data directory).
    Usage {
        #[command(flatten)]
        store: joinery::audit::cli::StoreArgs,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Subscriptions at a glance: depth, in flight, oldest unacked, dead letters (operators).
    Stats {
        #[command(flatten)]
        args: admin_cli::StatsArgs,
        #[command(flatten)]
        conn: Connection,
    },
    /// Dead letters: list them, or redrive them back to their subscription (operators).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Remove every pending message of a subscription (operators; cannot be undone).
    Purge {
        #[command(flatten)]
        args: admin_cli::PurgeArgs,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show the next pending messages of a subscription: headers, payloads only on request (operators).
    Peek {
        #[command(flatten)]
        args: admin_cli::PeekArgs,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// A subscription's dead letters with reason and attempts (no payloads).
    List {
        #[command(flatten)]
        args: admin_cli::DlqListArgs,
        #[command(flatten)]
        conn: Connection,
    },
    /// Put dead letters back on their subscription: delivered again from attempt 1.
    Redrive {
        #[command(flatten)]
        args: admin_cli::DlqRedriveArgs,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// The schema packages the broker knows.
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Compile and lint a directory of .proto files, and report breaking
    /// changes against another directory (--against) or the broker (--broker).
    Check {
        dir: PathBuf,
        /// A directory with the current versions of the same packages.
        #[arg(long)]
        against: Option<PathBuf>,
        /// Also compare with the schemas registered on the broker.
        #[arg(long)]
        broker: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Register (or update, compatibly) the packages in a directory (operators).
    Register {
        dir: PathBuf,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Args, Clone)]
struct Connection {
    /// Broker address.
    #[arg(long, default_value = "https://127.0.0.1:7443", env = "JOINERY_ADDR")]
    addr: String,
    /// Agency whose development certificate to use (from --pki-dir), unless --cert/--key are given.
    #[arg(long)]
    agency: Option<String>,
    /// Development PKI folder made by `joinery serve` with the default config.
    #[arg(long, default_value = "joinery-data/pki")]
    pki_dir: PathBuf,
    /// CA certificate that signed the broker's certificate (default: <pki-dir>/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) with the URI SAN urn:joinery:agency:<id>.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Name to verify the broker's certificate against (default: host of --addr).
    #[arg(long)]
    server_name: Option<String>,
}

impl Connection {
    /// Options for an operator command (the demo operator by default).
    fn operator(&self) -> ClientOptions {
        self.options("council-demo")
    }

    fn options(&self, default_agency: &str) -> ClientOptions {
        let agency = self.agency.as_deref().unwrap_or(default_agency);
        let agencies = self.pki_dir.join("agencies");
        ClientOptions {
            addr: self.addr.clone(),
            ca: self
                .ca
                .clone()
                .unwrap_or_else(|| self.pki_dir.join("ca.pem")),
            cert: self
                .cert
                .clone()
                .unwrap_or_else(|| agencies.join(format!("{agency}.pem"))),
            key: self
                .key
                .clone()
                .unwrap_or_else(|| agencies.join(format!("{agency}.key"))),
            server_name: self.server_name.clone(),
        }
    }
}

#[derive(Args)]
struct PublishArgs {
    #[command(flatten)]
    conn: Connection,
    /// Topic to publish to.
    #[arg(long)]
    topic: String,
    /// Fully-qualified message type of the payload.
    #[arg(long = "type")]
    message_type: String,
    /// Payload given inline (UTF-8).
    #[arg(long, conflicts_with = "file")]
    data: Option<String>,
    /// Payload read from a file (raw bytes, already protobuf-encoded).
    #[arg(long, conflicts_with = "json")]
    file: Option<PathBuf>,
    /// Payload as protobuf JSON (a file), converted with the broker's schema
    /// of --type, e.g. broker-config/examples/safeguarding_referral.json.
    #[arg(long, conflicts_with = "data")]
    json: Option<PathBuf>,
    /// Idempotency key (default: the broker chooses one).
    #[arg(long)]
    message_id: Option<String>,
    /// Deliver only to subscriptions owned by these agencies (repeatable).
    #[arg(long = "recipient")]
    recipients: Vec<String>,
    /// Header as key=value (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Expire the message after this long, e.g. 10m, 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,
    #[arg(long)]
    correlation_id: Option<String>,
    /// Publish this many messages (each with its own broker-chosen id).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Concurrent publishers (each waits for its durable ack before the next publish).
    #[arg(long, default_value_t = 1)]
    concurrency: u64,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    conn: Connection,
    /// pub (window=W publishes awaiting acks), consume (prefill, then timed
    /// consume with prefetch=P) or lat (rate=R msg/s publisher + consumer).
    mode: joinery::bench::Mode,
    /// Messages to publish (and consume).
    count: usize,
    /// Payload bytes per message (at least 16).
    size: usize,
    /// window=W (default 1), prefetch=P (256), rate=R (1000), max_secs=S (120).
    options: Vec<String>,
    /// Topic to publish to (the embedded default config's load topic).
    #[arg(long, default_value = "bench.load")]
    topic: String,
    /// Subscription to consume; purged at the start of every run.
    #[arg(long, default_value = "council-demo.bench")]
    subscription: String,
}

#[derive(Args)]
struct SubscribeArgs {
    #[command(flatten)]
    conn: Connection,
    /// Subscription to consume (must belong to your agency).
    #[arg(long)]
    subscription: String,
    /// Most unacked deliveries at once.
    #[arg(long, default_value_t = 100)]
    max_in_flight: u32,
    /// Exit after this many deliveries.
    #[arg(long)]
    count: Option<u64>,
    /// Do not ack (deliveries come back after the ack deadline).
    #[arg(long)]
    no_ack: bool,
    /// Exit when nothing arrives for this long, e.g. 5s.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Print payloads as protobuf JSON (using the broker's schemas).
    #[arg(long)]
    json: bool,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("header {s:?} is not key=value"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    joinery::tls::install_crypto_provider();
    // The broker's configuration says how many runtime threads it wants;
    // every other command takes tokio's default.
    let (serve_config, worker_threads) = match &cli.command {
        Command::Serve { config } => {
            let config = match load_config(config.as_deref()) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let env_set = std::env::var_os("TOKIO_WORKER_THREADS").is_some();
            let threads = config.broker.runtime_threads(cpus, env_set);
            (Some(config), threads)
        }
        _ => (None, None),
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder
        // Blocking-pool threads (store reads, stat calls) end after 1 s
        // unused instead of tokio's 10 s, so the burst of them at start-up
        // is gone once the broker sits idle (0.2-1.2 MB less anonymous
        // memory idle, three runs); one costs tens of microseconds to start.
        .thread_keep_alive(Duration::from_secs(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        // Its configuration was loaded above, before the runtime.
        Command::Serve { .. } => {
            return match serve_config {
                Some(config) => runtime.block_on(serve(config)),
                None => ExitCode::FAILURE,
            }
        }
        Command::CheckConfig { config } => {
            return match load_config(config.as_deref()) {
                Ok(_) => {
                    println!("configuration is valid");
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::Publish(args) => runtime.block_on(publish(args)),
        Command::Subscribe(args) => runtime.block_on(subscribe(args)),
        Command::Bench(args) => return runtime.block_on(bench(args)),
        Command::Pki { command } => joinery::pki::cli::run(command).map_err(anyhow::Error::from),
        Command::Schema { command } => match runtime.block_on(schema(command)) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Audit { command } => {
            joinery::audit::cli::run(command).map_err(anyhow::Error::from)
        }
        Command::Usage { store, json } => usage(&store, json),
        Command::Stats { args, conn } => {
            operator_command(runtime.block_on(admin_cli::stats(&conn.operator(), &args)))
        }
        Command::Dlq {
            command: DlqCommand::List { args, conn },
        } => operator_command(runtime.block_on(admin_cli::dlq_list(&conn.operator(), &args))),
        Command::Dlq {
            command: DlqCommand::Redrive { args, conn },
        } => operator_command(runtime.block_on(admin_cli::dlq_redrive(&conn.operator(), &args))),
        Command::Purge { args, conn } => {
            operator_command(runtime.block_on(admin_cli::purge(&conn.operator(), &args)))
        }
        Command::Peek { args, conn } => {
            operator_command(runtime.block_on(admin_cli::peek(&conn.operator(), &args)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!(
                    "error: {:?}: {}{}",
                    status.code(),
                    status.message(),
                    status_causes(status)
                ),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// What lies under a status, as `: cause: cause...` (empty if nothing): a
/// transport failure's own message says only "transport error", its causes
/// say why (a refused certificate, a closed connection).
fn status_causes(status: &tonic::Status) -> String {
    let mut causes = String::new();
    let mut next = std::error::Error::source(status);
    let mut last = status.message().to_string();
    while let Some(cause) = next {
        let text = cause.to_string();
        // tonic wraps a transport error in one that says the same.
        if text != last {
            causes.push_str(": ");
            causes.push_str(&text);
        }
        last = text;
        next = cause.source();
    }
    causes
}

/// An operator command's outcome, a refusal kept as the gRPC status it is.
fn operator_command(result: Result<(), admin_cli::AdminCliError>) -> anyhow::Result<()> {
    result.map_err(|e| match e {
        admin_cli::AdminCliError::Rpc(status) => anyhow::Error::from(status),
        other => anyhow::Error::from(other),
    })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JOINERY_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    match Config::load(path) {
        Ok(config) => Ok(config),
        Err(errors) => {
            let source = path
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the embedded default configuration".into());
            eprintln!("error: {source} is not valid:\n{errors}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    tracing::info!(
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "async runtime started"
    );
    if config.tls.dev_pki {
        if let Err(e) = dev_pki(&config) {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let listener = match tokio::net::TcpListener::bind(config.broker.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", config.broker.listen);
            return ExitCode::FAILURE;
        }
    };
    let ops = if config.metrics.enabled {
        match tokio::net::TcpListener::bind(config.metrics.listen).await {
            Ok(listener) => Some(joinery::OpsListener {
                listener,
                prometheus: joinery::metrics::install(),
            }),
            Err(e) => {
                eprintln!(
                    "error: cannot listen on {} for metrics ([metrics] listen): {e}",
                    config.metrics.listen
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    match joinery::run_with(Arc::new(config), listener, ops, joinery::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(e));
            ExitCode::FAILURE
        }
    }
}

/// An error and each of its causes, on one line.
fn error_chain(e: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

/// Creates the development PKI the default config points at, and says so.
fn dev_pki(config: &Config) -> anyhow::Result<()> {
    let dir = config
        .tls
        .ca
        .parent()
        .context("tls.ca has no parent folder for the development PKI")?;
    let agencies: Vec<String> = config.agencies.iter().map(|a| a.id.clone()).collect();
    let pki = joinery::pki::ensure_dev_pki(dir, &agencies)
        .with_context(|| format!("could not create the development PKI in {}", dir.display()))?;
    for (want, have) in [
        (&config.tls.ca, &pki.ca),
        (&config.tls.cert, &pki.server_cert),
        (&config.tls.key, &pki.server_key),
    ] {
        if want != have {
            bail!(
                "with tls.dev_pki = true, tls.ca/cert/key must be {}, {} and {}",
                pki.ca.display(),
                pki.server_cert.display(),
                pki.server_key.display()
            );
        }
    }
    let verb = if pki.created { "created" } else { "using" };
    eprintln!(
        "WARNING: {verb} a DEVELOPMENT PKI in {} — for trying joinery out only, never for real data.",
        pki.dir.display()
    );
    eprintln!("  CA certificate:     {}", pki.ca.display());
    eprintln!(
        "  server certificate: {} (localhost, 127.0.0.1, ::1)",
        pki.server_cert.display()
    );
    for (id, cert, key) in &pki.agencies {
        eprintln!("  agency {id:<14} {} + {}", cert.display(), key.display());
    }
    Ok(())
}

async fn schema(command: SchemaCommand) -> anyhow::Result<bool> {
    use joinery::schema::cli;
    match command {
        SchemaCommand::List { conn } => cli::list(&conn.options("council-demo"))
            .await
            .map(|()| true),
        SchemaCommand::Check {
            dir,
            against,
            broker,
            conn,
        } => {
            let options = conn.options("council-demo");
            cli::check(&dir, against.as_deref(), broker.then_some(&options)).await
        }
        SchemaCommand::Register { dir, conn } => cli::register(&dir, &conn.options("council-demo"))
            .await
            .map(|()| true),
    }
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let options = args.conn.options("police-demo");
    let channel = joinery::client::connect_channel(&options).await?;
    let payload = match (&args.data, &args.file, &args.json) {
        (Some(data), _, _) => data.clone().into_bytes(),
        (None, Some(file), _) => {
            std::fs::read(file).with_context(|| format!("could not read {}", file.display()))?
        }
        (None, None, Some(json)) => {
            let text = std::fs::read_to_string(json)
                .with_context(|| format!("could not read {}", json.display()))?;
            joinery::schema::cli::JsonCodec::default()
                .encode(&channel, &args.message_type, &text)
                .await
                .with_context(|| {
                    format!("{} is not a valid {}", json.display(), args.message_type)
                })?
        }
        (None, None, None) => Vec::new(),
    };
    let client = joinery::proto::broker_client::BrokerClient::new(channel);
    let envelope = Envelope {
        message_id: args.message_id.clone().unwrap_or_default(),
        message_type: args.message_type.clone(),
        payload: payload.into(),
        correlation_id: args.correlation_id.clone().unwrap_or_default(),
        expires_at: args.expires_in.map(|d| {
            let at = std::time::SystemTime::now() + d;
            prost_types::Timestamp::from(at)
        }),
        headers: args.headers.iter().cloned().collect::<HashMap<_, _>>(),
        recipients: args.recipients.clone(),
        ..Default::default()
    };
    let request = PublishRequest {
        topic: args.topic.clone(),
        envelope: Some(envelope),
    };
    if args.count <= 1 {
        let response = client.clone().publish(request).await?.into_inner();
        println!(
            "published {} to {} as sequence {}{}",
            response.message_id,
            args.topic,
            response.sequence,
            if response.duplicate {
                " (duplicate: already published)"
            } else {
                ""
            }
        );
        return Ok(());
    }
    // Throughput run: `concurrency` publishers share `count` publishes.
    let started = Instant::now();
    let concurrency = args.concurrency.clamp(1, 1024);
    let remaining = Arc::new(std::sync::atomic::AtomicU64::new(args.count));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = client.clone();
        let mut request = request.clone();
        if let Some(envelope) = request.envelope.as_mut() {
            envelope.message_id.clear(); // each message its own id
        }
        let remaining = remaining.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while remaining
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                )
                .is_ok()
            {
                let t = Instant::now();
                client.publish(request.clone()).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, tonic::Status>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "published {} messages to {} in {:.2}s: {:.0} msg/s with {} concurrent publishers; ack latency p50 {:?}, p99 {:?}",
        latencies.len(),
        args.topic,
        secs,
        latencies.len() as f64 / secs,
        concurrency,
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}

/// One load run: its JSON line on stdout (also on failure, with `error`),
/// bounded by a watchdog at max_secs + 30 s as the peers' client is.
async fn bench(args: BenchArgs) -> ExitCode {
    use joinery::bench::BenchSpec;
    let spec = match BenchSpec::new(
        args.mode,
        args.count,
        args.size,
        &args.options,
        args.topic.clone(),
        args.subscription.clone(),
    ) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let hard_limit = Duration::from_secs(spec.max_secs.saturating_add(30));
    let watchdog_line = spec.error_line("watchdog: hard time limit");
    std::thread::spawn(move || {
        std::thread::sleep(hard_limit);
        println!("{watchdog_line}");
        std::process::exit(3);
    });
    match joinery::bench::run(&spec, &args.conn.options("council-demo")).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let text = error_chain(e);
            eprintln!("error: {text}");
            println!("{}", spec.error_line(&text));
            ExitCode::FAILURE
        }
    }
}

async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let options = args.conn.options("council-demo");
    let channel = joinery::client::connect_channel(&options).await?;
    let mut client = joinery::proto::broker_client::BrokerClient::new(channel.clone());
    let mut codec = joinery::schema::cli::JsonCodec::default();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(SubscribeRequest {
        request: Some(subscribe_request::Request::Open(subscribe_request::Open {
            subscription: args.subscription.clone(),
            max_in_flight: args.max_in_flight,
            initial_credit: None,
        })),
    })
    .await?;
    let mut deliveries = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    eprintln!(
        "subscribed to {}; waiting for messages (Ctrl-C to stop)",
        args.subscription
    );
    let mut received = 0u64;
    loop {
        let next = match args.idle_timeout {
            Some(idle) => match tokio::time::timeout(idle, deliveries.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => deliveries.next().await,
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        let envelope = delivery.envelope.clone().unwrap_or_default();
        let payload = if args.json {
            match codec
                .decode(&channel, &envelope.message_type, &envelope.payload)
                .await
            {
                Ok(json) => json,
                Err(e) => format!("<payload not decodable as {}: {e}>", envelope.message_type),
            }
        } else {
            match std::str::from_utf8(&envelope.payload) {
                Ok(text) if !text.chars().any(|c| c.is_control() && c != '\n') => text.to_string(),
                _ => format!(
                    "<{} bytes of protobuf; --json to decode>",
                    envelope.payload.len()
                ),
            }
        };
        println!(
            "#{} attempt {} from {} type {} id {}: {}",
            delivery.sequence,
            delivery.attempt,
            envelope.sender,
            envelope.message_type,
            envelope.message_id,
            payload
        );
        if !args.no_ack {
            tx.send(SubscribeRequest {
                request: Some(subscribe_request::Request::Ack(subscribe_request::Ack {
                    delivery_ids: vec![delivery.delivery_id],
                })),
            })
            .await?;
        }
        received += 1;
        if args.count.is_some_and(|n| received >= n) {
            break;
        }
    }
    // Let the last ack reach the broker before the stream closes.
    drop(tx);
    tokio::time::sleep(Duration::from_millis(100)).await;
    eprintln!("received {received} message(s)");
    Ok(())
}

/// `joinery usage`: the store's keys and bytes by kind, and its size on disk.
fn usage(store: &joinery::audit::cli::StoreArgs, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let (db, dir) = store.open()?;
    // A full scan: say how far it has got every few seconds.
    let mut said = started;
    let usage = joinery::storage::usage(&db, &dir, |read| {
        if said.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "usage: {read} keys read in {:.0} s ...",
                started.elapsed().as_secs_f64()
            );
            said = Instant::now();
        }
    })?;
    if json {
        println!("{}", serde_json::to_string(&usage)?);
        return Ok(());
    }
    let mb = |bytes: u64| bytes as f64 / 1_048_576.0;
    println!("{:<40} {:>12} {:>12}", "kind", "keys", "MiB");
    for kind in &usage.kinds {
        println!(
            "{:<40} {:>12} {:>12.1}",
            kind.kind,
            kind.keys,
            mb(kind.bytes)
        );
    }
    let times = |bytes: u64| match usage.live_bytes {
        0 => String::new(),
        live => format!(" ({:.2}x the live bytes)", bytes as f64 / live as f64),
    };
    println!(
        "live: {:.1} MiB ({:.1} MiB queue state, {:.1} MiB audit log)",
        mb(usage.live_bytes),
        mb(usage.queue_bytes),
        mb(usage.audit_bytes)
    );
    println!(
        "on disk: sled {:.1} MiB{}; the data directory {:.1} MiB{}",
        mb(usage.sled_bytes_on_disk),
        times(usage.sled_bytes_on_disk),
        mb(usage.dir_bytes_on_disk),
        times(usage.dir_bytes_on_disk)
    );
    Ok(())
}
