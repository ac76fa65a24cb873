//! The `switchyard` command: run the control plane (`serve`, `dev`), talk to it (`call`), read
//! its log (`audit`), and generate its schemas.

use std::io::{IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use switchyard::app::{App, connect};
use switchyard::audit::{self, Filter};
use switchyard::config::Config;
use switchyard::domain::Timestamp;
use switchyard::nats_server::{self, NatsServer};
use switchyard::store::EventStore;
use switchyard::telemetry::{self, LogConfig};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Event-sourced control plane for lab and test infrastructure, over NATS JetStream"
)]
struct Cli {
    /// Configuration file (TOML); SWITCHYARD_* variables override it.
    #[arg(long, short, global = true, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane against the configured NATS servers.
    Serve,
    /// Run a local NATS (installed if missing) and the control plane together; data persists in
    /// --data-dir, so a second start rebuilds the same state from the log.
    Dev(DevArgs),
    /// Send one request (or fire-and-forget command) and print the reply.
    Call(CallArgs),
    /// Replay events from the log, or show an entity as of a point in it.
    Audit(AuditArgs),
    /// Write the JSON Schemas and AsyncAPI document, or check they are current.
    Schemas(SchemaArgs),
    /// Measure throughput, latency, replay, activation and memory next to raw JetStream
    /// (build with --release for figures that mean something).
    Bench(BenchArgs),
    /// Switch pods: add, keep-alive, remove, get, is-valid, count-meeting-points, list.
    Pod {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: switchyard::cli::PodCommand,
    },
    /// Run a switch pod: register it, keep it alive, and serve the SSH tunnels of its machines.
    /// SIGTERM drains (exits once its meeting points reach zero); SIGINT exits at once.
    PodAgent(PodAgentArgs),
    /// Make a test machine reachable: reserve a meeting point, tunnel its port to the local
    /// sshd through the pod, keep it alive, move off pods that drain; SIGINT/SIGTERM clear it.
    MachineAgent(MachineAgentArgs),
    /// Acknowledge messages in an entity's history that the store did not write (every reader
    /// skips them; this records that an operator looked, and stops reporting them).
    Repair {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: switchyard::cli::RepairArgs,
    },
    /// Test sessions: schedule (from a YAML or JSON file), get, list, cancel, logs, watch.
    Session {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: switchyard::sessions::cli::SessionCommand,
    },
    /// The pools sessions run on.
    Pool {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: switchyard::sessions::cli::PoolCommand,
    },
    /// Cloud pools' workers: list, hold, drain, run, kill.
    Instances {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: switchyard::cloud::cli::InstancesCommand,
    },
    /// Cloud pools' instance sets, with the throttles in force.
    #[command(name = "instance-set")]
    InstanceSet {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: switchyard::cloud::cli::InstanceSetCommand,
    },
    /// Live lessons: the catalog (list, show, validate a curriculum offline, reload), request
    /// a lesson and follow it to READY, status, kill.
    Lesson {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: switchyard::lessons::cli::LessonCommand,
    },
    /// Live sessions: create, get, list, kill.
    #[command(name = "livesession")]
    LiveSession {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: switchyard::lessons::cli::LiveSessionCommand,
    },
    /// Meeting points: reserve, clear, get, keep-alive, list.
    #[command(name = "mp", alias = "meeting-point")]
    MeetingPoint {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: switchyard::cli::MeetingPointCommand,
    },
}

/// How a client command reaches the control plane and prints its answer.
#[derive(clap::Args)]
struct ClientArgs {
    /// NATS server URL; defaults to the configured servers.
    #[arg(long, short, global = true)]
    server: Option<String>,
    #[arg(long, value_enum, default_value_t = switchyard::cli::Output::Table, global = true)]
    format: switchyard::cli::Output,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
}

/// How an agent reaches the control plane.
#[derive(clap::Args)]
struct AgentClientArgs {
    /// NATS server URL; defaults to the configured servers.
    #[arg(long, short)]
    server: Option<String>,
    /// How long one call to the control plane may take.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(clap::Args)]
struct PodAgentArgs {
    /// The pod's name (usually the Kubernetes pod name).
    #[arg(long, env = "SWITCHYARD_POD_NAME")]
    name: switchyard::domain::switchboard::PodName,
    /// Where the SSH server for machines listens.
    #[arg(long, default_value = "0.0.0.0:2222")]
    listen: SocketAddr,
    /// The HOST:PORT machines dial, published in the registration (default: --listen, with
    /// the bound port).
    #[arg(long)]
    advertise: Option<String>,
    /// The address meeting-point ports listen on for clients.
    #[arg(long, default_value = "0.0.0.0")]
    forward_bind: std::net::IpAddr,
    /// The SSH host key (OpenSSH format), created if missing; without it, a new key per run.
    #[arg(long)]
    host_key: Option<PathBuf>,
    /// How often the pod keeps itself alive; it expires after two missed periods.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// Ports it leases to meeting points, FIRST-LAST (default 10000-19999).
    #[arg(long)]
    ports: Option<switchyard::domain::switchboard::PortRange>,
    /// Keep-alives that may fail in a row before the agent removes the pod and exits.
    #[arg(long, default_value_t = 3)]
    max_keepalive_failures: u32,
    /// How often a draining pod counts its meeting points.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    drain_poll: Duration,
    /// How often an open forward checks that its meeting point still stands; a cleared,
    /// expired or moved meeting point's forward closes within this.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    recheck: Duration,
    /// Machine connections at once; beyond it the pod stops accepting until one ends.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    #[command(flatten)]
    client: AgentClientArgs,
}

#[derive(clap::Args)]
struct MachineAgentArgs {
    /// The machine's id, e.g. skia-rpi-001.example.com.
    #[arg(long)]
    machine: switchyard::domain::switchboard::MachineId,
    /// The account clients log in as on the machine.
    #[arg(long)]
    user: switchyard::domain::switchboard::Username,
    /// The machine's sshd, which clients reach through the meeting point.
    #[arg(long, default_value = "127.0.0.1:22")]
    target: String,
    /// The machine's SSH key for logging in to pods (OpenSSH format), created if missing;
    /// without it, a new key per run (the meeting point names whichever key is used).
    #[arg(long)]
    key: Option<PathBuf>,
    /// How often the meeting point is kept alive; it expires after two missed periods.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// The first wait before starting over after a failure; doubles up to --max-retry-delay.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    retry_delay: Duration,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_retry_delay: Duration,
    #[command(flatten)]
    client: AgentClientArgs,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Use this NATS server instead of starting one (the durable scenario is then skipped).
    #[arg(long)]
    nats_url: Option<String>,
    /// Run only these scenarios (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<switchyard::bench::Scenario>,
    /// Every scenario at a tiny size: checks that the benchmark works, measures nothing.
    #[arg(long)]
    smoke: bool,
    /// The Kubernetes API the kubernetes scenario uses; without it, the tests' emulator
    /// (kmock, from scripts/setup), or the scenario is skipped.
    #[arg(long)]
    kubernetes_api: Option<String>,
    /// How long each throughput run lasts.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Entities the load is spread over.
    #[arg(long)]
    entities: Option<usize>,
    /// Requests outstanding at once in throughput runs.
    #[arg(long)]
    in_flight: Option<usize>,
    /// Events to rebuild the projection from.
    #[arg(long)]
    replay_events: Option<usize>,
    /// Entities created for the memory scenario.
    #[arg(long)]
    memory_entities: Option<usize>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DevArgs {
    #[arg(long, default_value = ".switchyard/dev")]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Control-plane replicas. Above 1: a 3-node NATS cluster (client ports from --nats-port,
    /// routes from --nats-port + 2000) with R3 streams, and each replica a `switchyard serve`
    /// process (HTTP on consecutive ports from --http) that you may kill to watch fail-over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
    replicas: u16,
}

#[derive(clap::Args)]
struct CallArgs {
    /// The route, `<kind>.<verb>`, e.g. counter.add.
    route: String,
    /// The JSON body; `-` reads it from standard input. Defaults to `{}`.
    body: Option<String>,
    /// NATS server URL; defaults to the configured servers.
    #[arg(long, short)]
    server: Option<String>,
    #[arg(long)]
    command_id: Option<String>,
    #[arg(long)]
    principal: Option<String>,
    /// Publish to the work queue instead of waiting for a reply.
    #[arg(long)]
    fire_and_forget: bool,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(clap::Args)]
struct AuditArgs {
    /// One entity, as KIND/ID (the id may contain slashes).
    #[arg(long, conflicts_with = "kind")]
    entity: Option<String>,
    /// Every entity of one kind.
    #[arg(long)]
    kind: Option<String>,
    /// Events stored at or after this time (RFC 3339) or this long ago (e.g. 1h).
    #[arg(long)]
    since: Option<String>,
    /// Events stored at or before this time (RFC 3339) or this long ago.
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    from_seq: Option<u64>,
    #[arg(long)]
    to_seq: Option<u64>,
    #[arg(long)]
    limit: Option<u64>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Print the entity (--entity) as it was after --to-seq (default: now) instead of events.
    #[arg(long, requires = "entity")]
    state: bool,
    /// NATS server URL; defaults to the configured servers.
    #[arg(long, short)]
    server: Option<String>,
}

#[derive(clap::Args)]
struct SchemaArgs {
    #[arg(long, default_value = "schemas")]
    out: PathBuf,
    /// Fail if the files differ from what would be written.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!(
                "error: loading the configuration: {:#}",
                anyhow::Error::from(err)
            );
            return ExitCode::FAILURE;
        }
    };
    let workers = config.runtime.worker_threads();
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .thread_name("tokio-worker")
            .build()
            .unwrap_or_else(|err| {
                eprintln!("error: cannot start the async runtime: {err}");
                std::process::exit(1)
            })
    });
    match system.block_on(run(cli, config)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, config: Config) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve => {
            let telemetry = telemetry::init(&config.log)?;
            let app = App::start(&config, switchyard::runtime::system_clock()).await?;
            shutdown_signal().await;
            app.shutdown().await;
            telemetry.shutdown();
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(args) => {
            let telemetry = telemetry::init(&config.log)?;
            Box::pin(dev(config, args)).await?;
            telemetry.shutdown();
            Ok(ExitCode::SUCCESS)
        }
        Command::Call(args) => {
            quiet_logs()?;
            call(config, args).await
        }
        Command::Pod { client, command } => {
            quiet_logs()?;
            let (api, format) = api_client(config, &client).await?;
            let status = switchyard::cli::pod(&api, command, format, &mut std::io::stdout()).await;
            client_status(status)
        }
        Command::MeetingPoint { client, command } => {
            quiet_logs()?;
            let (api, format) = api_client(config, &client).await?;
            let status =
                switchyard::cli::meeting_point(&api, command, format, &mut std::io::stdout()).await;
            client_status(status)
        }
        Command::Lesson {
            client,
            command: switchyard::lessons::cli::LessonCommand::Validate { dir },
        } => {
            quiet_logs()?;
            let status =
                switchyard::lessons::cli::validate(&dir, client.format, &mut std::io::stdout());
            Ok(ExitCode::from(status))
        }
        Command::Lesson { client, command } => {
            let (api, format) = api_client(config, &client).await?;
            let status =
                switchyard::lessons::cli::lesson(&api, command, format, &mut std::io::stdout())
                    .await;
            client_status(status)
        }
        Command::LiveSession { client, command } => {
            let (api, format) = api_client(config, &client).await?;
            let status = switchyard::lessons::cli::live_session(
                &api,
                command,
                format,
                &mut std::io::stdout(),
            )
            .await;
            client_status(status)
        }
        Command::Session { client, command } => {
            let (api, format) = api_client(config, &client).await?;
            let status =
                switchyard::sessions::cli::session(&api, command, format, &mut std::io::stdout())
                    .await;
            client_status(status)
        }
        Command::Pool { client, command } => {
            let (api, format) = api_client(config, &client).await?;
            let status =
                switchyard::sessions::cli::pool(&api, command, format, &mut std::io::stdout())
                    .await;
            client_status(status)
        }
        Command::Instances { client, command } => {
            let (api, format) = api_client(config, &client).await?;
            let status =
                switchyard::cloud::cli::instances(&api, command, format, &mut std::io::stdout())
                    .await;
            client_status(status)
        }
        Command::InstanceSet { client, command } => {
            let (api, format) = api_client(config, &client).await?;
            let status =
                switchyard::cloud::cli::instance_set(&api, command, format, &mut std::io::stdout())
                    .await;
            client_status(status)
        }
        Command::Repair { client, args } => {
            quiet_logs()?;
            let (api, format) = api_client(config, &client).await?;
            let status = switchyard::cli::repair(&api, args, format, &mut std::io::stdout()).await;
            client_status(status)
        }
        Command::PodAgent(args) => {
            let telemetry = telemetry::init(&config.log)?;
            let api = agent_client(config, &args.client, "pod-agent").await?;
            let agent = switchyard::tunnel::pod_agent::PodAgentConfig {
                name: args.name,
                listen: args.listen,
                advertise: args.advertise,
                forward_bind: args.forward_bind,
                host_key: args.host_key,
                keepalive: args.keepalive,
                ports: args.ports,
                max_keepalive_failures: args.max_keepalive_failures.max(1),
                drain_poll: args.drain_poll,
                recheck: args.recheck,
                max_connections: args.max_connections,
            };
            let result = switchyard::tunnel::pod_agent::run(api, agent).await;
            telemetry.shutdown();
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::MachineAgent(args) => {
            let telemetry = telemetry::init(&config.log)?;
            let api = agent_client(config, &args.client, "machine-agent").await?;
            let agent = switchyard::tunnel::machine_agent::MachineAgentConfig {
                machine: args.machine,
                username: args.user,
                target: args.target,
                key: args.key,
                keepalive: args.keepalive,
                retry_delay: args.retry_delay,
                max_retry_delay: args.max_retry_delay.max(args.retry_delay),
            };
            let result = switchyard::tunnel::machine_agent::run(api, agent).await;
            telemetry.shutdown();
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(args) => {
            quiet_logs()?;
            audit(config, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schemas(args) => schemas(&args),
        Command::Bench(args) => {
            quiet_logs()?;
            Box::pin(bench(args)).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn quiet_logs() -> anyhow::Result<()> {
    telemetry::install(
        &LogConfig {
            filter: "warn".to_owned(),
            ..LogConfig::default()
        },
        None,
    )?;
    Ok(())
}

async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    tracing::info!("shutting down");
}

async fn dev(mut config: Config, args: DevArgs) -> anyhow::Result<()> {
    if args.replicas > 1 {
        return dev_cluster(args).await;
    }
    if std::net::TcpListener::bind(("127.0.0.1", args.nats_port)).is_err() {
        bail!(
            "port {} is taken (another NATS or `switchyard dev`?); pass --nats-port",
            args.nats_port
        );
    }
    let tools = nats_server::tools_dir();
    let data_dir = args.data_dir.clone();
    let port = args.nats_port;
    let server = tokio::task::spawn_blocking(move || -> anyhow::Result<NatsServer> {
        let binary = nats_server::locate_or_install(&tools)?;
        let mut options = nats_server::Options::new(binary);
        options.port = Some(port);
        options.store_dir = Some(data_dir.join("nats"));
        options.log_file = Some(data_dir.join("nats-server.log"));
        Ok(NatsServer::start(options)?)
    })
    .await??;
    let mut server = server;
    config.nats.servers = vec![server.url()];
    config.http.listen = args.http;
    dev_pool(&mut config, &args.data_dir);
    dev_lessons(&mut config, &args.data_dir);
    let app = App::start(&config, switchyard::runtime::system_clock()).await?;
    let http = app.http_addr();
    println!(
        "\nSwitchyard is running.\n\
         \n  NATS         {url}   (JetStream data in {data}, log {log})\
         \n  API          sy.api.<kind>.<verb>, request/reply; sy.cmd.<kind>.<verb>, fire-and-forget\
         \n  Probes       http://{http}/healthz  http://{http}/readyz  http://{http}/metrics\
         \n\nTry:\
         \n  switchyard call counter.create '{{\"id\": \"demo\", \"limit\": 10}}' -s {url}\
         \n  switchyard call counter.add '{{\"id\": \"demo\", \"amount\": 3}}' -s {url}\
         \n  switchyard call counter.list -s {url}\
         \n  switchyard audit -s {url}\
         \n  switchyard session schedule deploy/dev/session.yaml --watch -s {url}\
         \n  switchyard pool list -s {url}\
         \n  switchyard livesession create --id demo -s {url}\
         \n  switchyard lesson request ssh-basics --session demo --wait -s {url}\
         \n\nCtrl-C stops both; the next start rebuilds the same state from the log.{lessons}\n",
        lessons = dev_lessons_note(&config),
        url = server.url(),
        data = args.data_dir.join("nats").display(),
        log = server.log_file().display(),
    );
    shutdown_signal().await;
    app.shutdown().await;
    server.stop();
    Ok(())
}

/// The embedded default's pool: this machine, four components at a time, two sessions at once,
/// its processes under the data directory (unless the configuration names pools of its own).
fn dev_pool(config: &mut Config, data_dir: &std::path::Path) {
    if config.sessions.pools.is_empty() {
        config.sessions.pools = vec![switchyard::config::PoolConfig {
            name: DEV_POOL.to_owned(),
            capacity: 4,
            ..Default::default()
        }];
        config.sessions.executor_count = config.sessions.executor_count.max(2);
        config.sessions.process_dir = data_dir.join("processes");
    }
}

const DEV_POOL: &str = "local";

/// The sample curriculum (when run from a clone, and unless the configuration names one),
/// with the lessons' processes under the data directory.
fn dev_lessons(config: &mut Config, data_dir: &std::path::Path) {
    if config.lessons.curriculum.is_none() && std::path::Path::new(DEV_CURRICULUM).is_dir() {
        config.lessons.curriculum = Some(DEV_CURRICULUM.into());
    }
    if config.lessons.dir == switchyard::config::LessonsConfig::default().dir {
        config.lessons.dir = data_dir.join("lessons");
    }
}

const DEV_CURRICULUM: &str = "deploy/dev/curriculum";

/// What keeps the sample lesson from running here, if anything.
fn dev_lessons_note(config: &Config) -> String {
    if config.lessons.curriculum.is_none() {
        return format!(
            "\n\nNo curriculum is loaded: run from a clone (for {DEV_CURRICULUM}) or set lessons.curriculum."
        );
    }
    if switchyard::lessons::backend::sshd_binary().is_some() {
        String::new()
    } else {
        "\n\nLive lessons need OpenSSH's sshd, which is not installed: scripts/setup installs it \
         (or apt-get install openssh-server)."
            .to_owned()
    }
}

/// `dev --replicas N`: a 3-node NATS cluster and N `switchyard serve` processes over it.
async fn dev_cluster(args: DevArgs) -> anyhow::Result<()> {
    const NODES: u16 = 3;
    let first = args.nats_port;
    for port in (first..first + NODES).chain(first + 2000..first + 2000 + NODES) {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!("port {port} is taken (another NATS or `switchyard dev`?); pass --nats-port");
        }
    }
    let tools = nats_server::tools_dir();
    let root = args.data_dir.join("cluster");
    let layout = nats_server::ClusterLayout {
        ports: Some((first, first + 2000)),
        root: Some(root.clone()),
        extra: None,
    };
    let mut cluster = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let binary = nats_server::locate_or_install(&tools)?;
        Ok(nats_server::NatsCluster::start_with(
            &binary,
            usize::from(NODES),
            &layout,
        )?)
    })
    .await??;
    let urls = cluster.urls();
    let client = async_nats::connect(urls.clone()).await?;
    if !nats_server::wait_for_jetstream(&client, std::time::Duration::from_secs(30)).await {
        bail!(
            "the NATS cluster elected no JetStream leader within 30s; see {}",
            root.display()
        );
    }
    let servers = serde_json::to_string(&urls)?;
    let exe = std::env::current_exe()?;
    let mut replicas = Vec::new();
    for i in 0..args.replicas {
        let http = SocketAddr::new(args.http.ip(), args.http.port() + i);
        let name = format!("replica-{i}");
        let log = std::fs::File::create(root.join(format!("{name}.log")))?;
        let mut command = std::process::Command::new(&exe);
        if std::path::Path::new(DEV_CURRICULUM).is_dir() {
            command.env("SWITCHYARD_LESSONS__CURRICULUM", DEV_CURRICULUM);
        }
        let child = command
            .arg("serve")
            .env("SWITCHYARD_NATS__SERVERS", &servers)
            .env("SWITCHYARD_STORE__REPLICAS", "3")
            .env("SWITCHYARD_CLUSTER__REPLICA", &name)
            // The embedded default's pool, its processes shared by the replicas on this host.
            .env(
                "SWITCHYARD_SESSIONS__POOLS",
                format!("[{{name=\"{DEV_POOL}\", capacity=4}}]"),
            )
            .env("SWITCHYARD_SESSIONS__EXECUTOR_COUNT", "2")
            .env("SWITCHYARD_SESSIONS__PROCESS_DIR", root.join("processes"))
            .env("SWITCHYARD_LESSONS__DIR", root.join("lessons"))
            .env("SWITCHYARD_HTTP__LISTEN", http.to_string())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        println!("  {name}  pid {:>7}  http://{http}/metrics", child.id());
        replicas.push((name, child));
        // The first creates the streams; the others join once it serves.
        if i == 0 {
            let ping = async {
                loop {
                    if client
                        .request("$SRV.PING.switchyard", "".into())
                        .await
                        .is_ok()
                    {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(90), ping)
                .await
                .context("the first replica did not start; see its log")?;
        }
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        println!(
            "  nats n{i}     pid {:>7}  {}  (log {})",
            node.pid().unwrap_or_default(),
            node.url(),
            node.log_file().display()
        );
    }
    println!(
        "\nSwitchyard is running: {n} replicas over a 3-node NATS cluster (R3 streams), logs in {root}.\
         \n\nWatch fail-over: `kill -9` a replica's pid (its shards move within cluster.lease_ttl), or a\
         \nNATS node's; `switchyard call counter.add '{{\"id\": \"demo\", \"amount\": 1}}' -s {url}` keeps\
         \nanswering. Which replica owns which shard: `nats req '$SRV.INFO.switchyard' ''` or /metrics\
         \n(switchyard_shard_owned). Ctrl-C stops everything; the data stays in {root}.\n",
        n = args.replicas,
        root = root.display(),
        url = urls[0],
    );
    shutdown_signal().await;
    for (name, child) in &mut replicas {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = child.wait();
        tracing::info!(replica = %name, "stopped");
    }
    for node in &mut cluster.nodes {
        node.stop();
    }
    Ok(())
}

async fn call(mut config: Config, args: CallArgs) -> anyhow::Result<ExitCode> {
    if let Some(server) = args.server {
        config.nats.servers = vec![server];
    }
    let body = match args.body.as_deref() {
        None => "{}".to_owned(),
        Some("-") => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            text
        }
        Some(text) => text.to_owned(),
    };
    let client = connect(&config.nats).await?;
    let mut headers = async_nats::HeaderMap::new();
    if let Some(id) = &args.command_id {
        headers.insert(switchyard::api::COMMAND_ID_HEADER, id.as_str());
    }
    if let Some(principal) = &args.principal {
        headers.insert(switchyard::api::PRINCIPAL_HEADER, principal.as_str());
    }
    let prefix = &config.store.subject_prefix;
    if args.fire_and_forget {
        let subject = format!("{prefix}.cmd.{}", args.route);
        let js = async_nats::jetstream::new(client);
        #[allow(clippy::disallowed_methods)] // a publisher's command, not an event
        let ack = js
            .publish_with_headers(subject.clone(), headers, body.into())
            .await?;
        let ack = tokio::time::timeout(args.timeout, ack)
            .await
            .context("waiting for the work queue")??;
        println!("queued as {} #{} on {subject}", ack.stream, ack.sequence);
        return Ok(ExitCode::SUCCESS);
    }
    let subject = format!("{prefix}.api.{}", args.route);
    let request = client.request_with_headers(subject.clone(), headers, body.into());
    let reply = tokio::time::timeout(args.timeout, request)
        .await
        .with_context(|| format!("no reply from {subject} within {:?}", args.timeout))?
        .with_context(|| format!("requesting {subject} (is the control plane running?)"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&reply.payload).context("the reply is not JSON")?;
    let text = if std::io::stdout().is_terminal() {
        serde_json::to_string_pretty(&value)?
    } else {
        value.to_string()
    };
    println!("{text}");
    let failed = reply.headers.as_ref().is_some_and(|h| {
        h.get(async_nats::service::NATS_SERVICE_ERROR_CODE)
            .is_some()
    });
    Ok(if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

async fn api_client(
    mut config: Config,
    args: &ClientArgs,
) -> anyhow::Result<(switchyard::client::ApiClient, switchyard::cli::Output)> {
    if let Some(server) = &args.server {
        config.nats.servers = vec![server.clone()];
    }
    let client = connect(&config.nats).await?;
    let api =
        switchyard::client::ApiClient::new(client, &config.store.subject_prefix, args.timeout);
    Ok((api, args.format))
}

/// A client for an agent, which waits for NATS rather than failing when it starts first.
async fn agent_client(
    mut config: Config,
    args: &AgentClientArgs,
    principal: &str,
) -> anyhow::Result<switchyard::client::ApiClient> {
    if let Some(server) = &args.server {
        config.nats.servers = vec![server.clone()];
    }
    config.nats.retry_on_initial_connect = true;
    let client = connect(&config.nats).await?;
    Ok(
        switchyard::client::ApiClient::new(client, &config.store.subject_prefix, args.timeout)
            .with_principal(principal),
    )
}

/// 0 on success (or the status the command chose), 2 for an error answered by the control
/// plane, 1 when it could not be reached.
fn client_status(
    status: Result<switchyard::cli::Status, switchyard::client::ClientError>,
) -> anyhow::Result<ExitCode> {
    match status {
        Ok(status) => Ok(ExitCode::from(status)),
        Err(err @ switchyard::client::ClientError::Api { .. }) => {
            eprintln!("error: {err}");
            Ok(ExitCode::from(2))
        }
        Err(err) => Err(err.into()),
    }
}

/// An RFC 3339 time, or a duration meaning "this long ago".
fn parse_time(text: &str) -> anyhow::Result<Timestamp> {
    if let Ok(time) = Timestamp::parse_rfc3339(text) {
        return Ok(time);
    }
    let ago = humantime::parse_duration(text)
        .with_context(|| format!("{text:?} is neither an RFC 3339 time nor a duration like 1h"))?;
    let now = (switchyard::runtime::system_clock())();
    Ok(Timestamp::from_unix_nanos(now.unix_nanos().saturating_sub(
        i64::try_from(ago.as_nanos()).unwrap_or(i64::MAX),
    )))
}

async fn audit(mut config: Config, args: AuditArgs) -> anyhow::Result<()> {
    if let Some(server) = args.server {
        config.nats.servers = vec![server];
    }
    let client = connect(&config.nats).await?;
    // Reads only: an auditor's NATS permissions need not allow changing the streams.
    let store = EventStore::attach(client, &config.store, config.nats.request_timeout).await?;
    let (kind, entity) = match &args.entity {
        Some(entity) => {
            let (kind, id) = entity.split_once('/').context("--entity takes KIND/ID")?;
            (Some(kind.to_owned()), Some(id.to_owned()))
        }
        None => (args.kind.clone(), None),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.state {
        let (Some(kind), Some(id)) = (kind, entity) else {
            bail!("--state needs --entity KIND/ID")
        };
        let state = audit::state_as_of(&store, &kind, &id, args.to_seq).await?;
        writeln!(out, "{}", serde_json::to_string_pretty(&state)?)?;
        return Ok(());
    }
    let filter = Filter {
        kind,
        entity,
        since: args.since.as_deref().map(parse_time).transpose()?,
        until: args.until.as_deref().map(parse_time).transpose()?,
        from_seq: args.from_seq,
        to_seq: args.to_seq,
        limit: args.limit,
    };
    if let Format::Table = args.format {
        audit::write_table_header(&mut out)?;
    }
    let count = audit::replay(&store, &filter, |record| match args.format {
        Format::Table => audit::write_table_row(&mut out, &record),
        Format::Json => audit::write_json(&mut out, &record),
    })
    .await?;
    if let Format::Table = args.format {
        writeln!(out, "({count} messages)")?;
    }
    Ok(())
}

fn schemas(args: &SchemaArgs) -> anyhow::Result<ExitCode> {
    if args.check {
        let stale = switchyard::schema::check(&args.out)?;
        if stale.is_empty() {
            println!("{} is up to date", args.out.display());
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!(
            "{} is out of date: {}; run `switchyard schemas`",
            args.out.display(),
            stale.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    let written = switchyard::schema::write(&args.out)?;
    println!("wrote {written} files to {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use switchyard::bench::{self, Options};
    let mut options = if args.smoke {
        Options::smoke()
    } else {
        Options::full()
    };
    options.nats_url = args.nats_url;
    options.kubernetes_api = args.kubernetes_api;
    if !args.scenario.is_empty() {
        options.scenarios = args.scenario;
    }
    options.duration = args.duration.unwrap_or(options.duration);
    options.entities = args.entities.unwrap_or(options.entities);
    options.in_flight = args.in_flight.unwrap_or(options.in_flight);
    options.replay_events = args.replay_events.unwrap_or(options.replay_events);
    options.memory_entities = args.memory_entities.unwrap_or(options.memory_entities);
    let mut stdout = std::io::stdout();
    let report = Box::pin(bench::run(&options, &mut stdout)).await?;
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
