//! `switchyard bench`: Switchyard's figures next to raw JetStream's, measured in the same run on
//! the same server, with the targets of docs/PERFORMANCE.md. Timing lives here, never in tests;
//! the test suite runs every scenario at a tiny size (`--smoke`) so this cannot rot.

mod kubernetes;
mod lessons;
mod pools;
pub mod raw;
mod sessions;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;

use crate::app::App;
use crate::codec::{self, header};
use crate::config::{Config, StoreConfig};
use crate::domain::counter::{Added, Counter, CounterEvent, CounterId, Created};
use crate::domain::{Aggregate, Principal, Timestamp};
use crate::metrics::Metrics;
use crate::nats_server::{self, NatsServer};
use crate::runtime::{EntityTable, ProjectionHandle, new_command_id, system_clock};
use crate::store::{Commit, EventStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Commands per second through the whole path, against raw async publishes.
    Throughput,
    /// Command latency at low load and at 80% of the maximum, against raw publish-and-ack.
    Latency,
    /// Projection rebuild from the stream, against a raw ordered-consumer read.
    Replay,
    /// Loading one entity of 1,000 events, with a snapshot and without.
    Activation,
    /// Heap bytes per active entity actor and per passivated entity.
    Memory,
    /// Throughput through 1 and 3 replicas over a 3-node cluster (R3), with the share of
    /// requests forwarded to their shard's owner, against raw JetStream on the same cluster.
    Replicas,
    /// Throughput and latency on a server with `sync_interval: always`.
    Durable,
    /// Sessions with a trivial driver scheduled through to DONE per second, and the time from
    /// scheduling to the first process running, against spawning the process directly.
    Sessions,
    /// The sample lesson from request to READY by step, against starting its sshd processes
    /// directly; and many lessons at once (time to READY, ports, memory, deletion).
    Lessons,
    /// The Kubernetes backends: a lesson's objects and a session's pod made, against making
    /// them with kube-rs directly (on `--kubernetes-api`, or the tests' emulator).
    Kubernetes,
    /// Cloud pools: a waiting session to its driver on a new loopback instance, against the
    /// boot delay; one sync of a stub holding many instances, against raw publishes and the
    /// driver's listing.
    Pools,
}

impl Scenario {
    pub const ALL: [Scenario; 11] = [
        Scenario::Throughput,
        Scenario::Latency,
        Scenario::Replay,
        Scenario::Activation,
        Scenario::Memory,
        Scenario::Replicas,
        Scenario::Durable,
        Scenario::Sessions,
        Scenario::Lessons,
        Scenario::Kubernetes,
        Scenario::Pools,
    ];
}

#[derive(Debug, Clone)]
pub struct Options {
    /// An existing server to use; otherwise the benchmark starts its own.
    pub nats_url: Option<String>,
    pub scenarios: Vec<Scenario>,
    /// Entities the load is spread over.
    pub entities: usize,
    /// Requests outstanding at once in throughput runs.
    pub in_flight: usize,
    /// How long each throughput run lasts.
    pub duration: Duration,
    pub latency_samples: usize,
    pub replay_events: usize,
    pub memory_entities: usize,
    /// Sessions scheduled at once in the sessions scenario.
    pub sessions: usize,
    /// Sessions scheduled one at a time to time the scheduling overhead.
    pub session_samples: usize,
    /// Lessons requested at once in the lessons scenario.
    pub lessons: usize,
    /// Lessons requested one at a time to time each step (and, on Kubernetes, lessons and
    /// sessions timed one at a time).
    pub lesson_samples: usize,
    /// The Kubernetes API for the kubernetes scenario; none: the tests' emulator.
    pub kubernetes_api: Option<String>,
    /// Sessions timed one at a time, each on a new loopback instance, in the pools scenario.
    pub pool_samples: usize,
    /// The loopback driver's boot delay in the pools scenario.
    pub pool_boot_delay: Duration,
    /// Instances the stub holds when a sync is timed.
    pub pool_instances: usize,
}

impl Options {
    pub fn full() -> Self {
        Self {
            nats_url: None,
            scenarios: Scenario::ALL.to_vec(),
            entities: 1_000,
            in_flight: 256,
            duration: Duration::from_secs(10),
            latency_samples: 5_000,
            replay_events: 1_000_000,
            memory_entities: 100_000,
            sessions: 300,
            session_samples: 30,
            lessons: 50,
            lesson_samples: 10,
            kubernetes_api: None,
            pool_samples: 5,
            pool_boot_delay: Duration::from_secs(1),
            pool_instances: 1_000,
        }
    }

    /// Every scenario at a tiny size: proves the benchmark runs, measures nothing.
    pub fn smoke() -> Self {
        Self {
            nats_url: None,
            scenarios: Scenario::ALL.to_vec(),
            entities: 20,
            in_flight: 8,
            duration: Duration::from_millis(300),
            latency_samples: 50,
            replay_events: 500,
            memory_entities: 200,
            sessions: 4,
            session_samples: 2,
            lessons: 2,
            lesson_samples: 1,
            kubernetes_api: None,
            pool_samples: 1,
            pool_boot_delay: Duration::from_millis(100),
            pool_instances: 20,
        }
    }
}

/// What a figure must reach, as a ratio to its baseline or an absolute bound.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// switchyard / raw >= this.
    RatioAtLeast(f64),
    /// switchyard / raw <= this.
    RatioAtMost(f64),
    /// switchyard <= this, in the row's unit.
    AtMost(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: &'static str,
    pub switchyard: f64,
    pub raw: Option<f64>,
    pub ratio: Option<f64>,
    pub target: Option<Target>,
    pub met: Option<bool>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub server: String,
    pub release_build: bool,
    pub rows: Vec<Row>,
}

impl Row {
    /// A figure; `raw` is its baseline from the same run, `target` what it must reach.
    pub fn new(
        scenario: &str,
        metric: &str,
        unit: &'static str,
        switchyard: f64,
        raw: Option<f64>,
        target: Option<Target>,
    ) -> Self {
        let ratio = raw.filter(|r| *r > 0.0).map(|r| switchyard / r);
        let met = target.map(|t| match t {
            Target::RatioAtLeast(min) => ratio.is_some_and(|r| r >= min),
            Target::RatioAtMost(max) => ratio.is_some_and(|r| r <= max),
            Target::AtMost(max) => switchyard <= max,
        });
        Row {
            scenario: scenario.to_owned(),
            metric: metric.to_owned(),
            unit,
            switchyard,
            raw,
            ratio,
            target,
            met,
        }
    }
}

impl Report {
    fn add(&mut self, out: &mut dyn Write, row: Row) -> anyhow::Result<()> {
        writeln!(out, "{}", format_row(&row))?;
        out.flush()?;
        self.rows.push(row);
        Ok(())
    }
}

fn number(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

fn format_row(row: &Row) -> String {
    let raw = row.raw.map_or("-".to_owned(), number);
    let ratio = row.ratio.map_or("-".to_owned(), |r| format!("{r:.2}x"));
    let target = match row.target {
        Some(Target::RatioAtLeast(min)) => format!(">= {min}x"),
        Some(Target::RatioAtMost(max)) => format!("<= {max}x"),
        Some(Target::AtMost(max)) => format!("<= {}", number(max)),
        None => String::new(),
    };
    let verdict = match row.met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "",
    };
    format!(
        "{:<11} {:<34} {:>12} {:>12} {:<9} {:>8}  {:<9} {verdict}",
        row.scenario,
        row.metric,
        number(row.switchyard),
        raw,
        row.unit,
        ratio,
        target
    )
}

/// Latencies of one run, in arrival order.
#[derive(Debug, Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    pub fn push(&mut self, latency: Duration) {
        self.0.push(latency);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// All of them together.
    pub fn total(&self) -> Duration {
        self.0.iter().sum()
    }

    /// The `q` quantile (0..=1) in milliseconds; nearest rank.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1].as_secs_f64() * 1000.0
    }
}

/// Runs `call(0..n)`, `in_flight` at a time; the first error is the result.
async fn each<F, Fut>(n: usize, in_flight: usize, call: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    futures::stream::iter(0..n)
        .map(call)
        .buffer_unordered(in_flight.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Stops every active actor of a kind and waits until they are gone.
async fn passivate_all<A: crate::domain::Aggregate>(entities: &crate::runtime::Entities<A>) {
    entities.passivate_idle(Duration::ZERO).await;
    while entities.active().await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A control plane for one scenario, with its own subject and stream prefixes.
struct Bench {
    app: App,
    client: async_nats::Client,
    config: Config,
}

impl Bench {
    async fn start(url: &str, name: &str, tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let mut config = Config::default();
        config.nats.servers = vec![url.to_owned()];
        config.nats.request_timeout = Duration::from_secs(30);
        config.http.listen = "127.0.0.1:0".parse()?;
        config.store.subject_prefix = format!("bench{name}");
        config.store.stream_prefix = format!("BENCH{}", name.to_uppercase());
        config.runtime.mailbox_capacity = 100_000;
        config.runtime.passivate_after = Duration::from_secs(3600);
        config.api.max_in_flight = 100_000;
        config.api.queue_group = format!("bench{name}");
        tweak(&mut config);
        let app = App::start(&config, system_clock())
            .await
            .context("starting the control plane")?;
        let client = async_nats::ConnectOptions::new()
            .request_timeout(Some(Duration::from_secs(30)))
            .connect(url)
            .await?;
        let started = Instant::now();
        while !app.is_ready() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "control plane not ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self {
            app,
            client,
            config,
        })
    }

    fn subject(&self, verb: &str) -> String {
        format!("{}.api.counter.{verb}", self.config.store.subject_prefix)
    }

    fn body(id: usize, verb: &str) -> Bytes {
        match verb {
            "create" => Bytes::from(json!({"id": format!("c{id}")}).to_string()),
            _ => Bytes::from(json!({"id": format!("c{id}"), "amount": 1}).to_string()),
        }
    }

    /// Sends `body` to `<prefix>.api.<route>`; an error reply is an error.
    async fn call(&self, route: &str, body: Bytes) -> anyhow::Result<()> {
        let subject = format!("{}.api.{route}", self.config.store.subject_prefix);
        let reply = self.client.request(subject, body).await?;
        if let Some(code) = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR))
        {
            anyhow::bail!(
                "{route}: {} {}",
                code.as_str(),
                String::from_utf8_lossy(&reply.payload)
            );
        }
        Ok(())
    }

    /// Creates counters `0..n`, `in_flight` at a time.
    async fn create(&self, n: usize, in_flight: usize) -> anyhow::Result<()> {
        each(n, in_flight, |i| {
            self.call("counter.create", Self::body(i, "create"))
        })
        .await
    }

    /// Closed loop: `in_flight` callers send adds back to back for `duration`; commands/s.
    async fn throughput(
        &self,
        entities: usize,
        in_flight: usize,
        duration: Duration,
    ) -> anyhow::Result<f64> {
        self.throughput_with(entities, in_flight, duration, false)
            .await
    }

    /// As [`Bench::throughput`]; with `command_ids`, every add carries a command id of its own,
    /// as a caller that retries would send: each is checked against the entity's commands of
    /// the idempotency window (past its last 64, the command index) and indexed.
    async fn throughput_with(
        &self,
        entities: usize,
        in_flight: usize,
        duration: Duration,
        command_ids: bool,
    ) -> anyhow::Result<f64> {
        let subject = self.subject("add");
        let bodies: Arc<Vec<Bytes>> =
            Arc::new((0..entities).map(|i| Self::body(i, "add")).collect());
        let started = Instant::now();
        let callers: Vec<_> = (0..in_flight)
            .map(|w| {
                let client = self.client.clone();
                let subject = subject.clone();
                let bodies = bodies.clone();
                tokio::spawn(async move {
                    let mut done = 0u64;
                    let mut k = 0;
                    while started.elapsed() < duration {
                        let entity = (w + k * in_flight) % bodies.len();
                        let body = if command_ids {
                            Bytes::from(
                                json!({"id": format!("c{entity}"), "amount": 1, "command_id": format!("b{w}-{k}")})
                                    .to_string(),
                            )
                        } else {
                            bodies[entity].clone()
                        };
                        k += 1;
                        let reply = client.request(subject.clone(), body).await?;
                        anyhow::ensure!(
                            reply.headers.as_ref().is_none_or(|h| h
                                .get(async_nats::service::NATS_SERVICE_ERROR)
                                .is_none()),
                            "a command failed: {}",
                            String::from_utf8_lossy(&reply.payload)
                        );
                        done += 1;
                    }
                    anyhow::Ok(done)
                })
            })
            .collect();
        let mut done = 0;
        for caller in callers {
            done += caller.await??;
        }
        Ok(done as f64 / started.elapsed().as_secs_f64())
    }

    /// One command at a time.
    async fn sequential_latency(
        &self,
        entities: usize,
        samples: usize,
    ) -> anyhow::Result<Latencies> {
        let mut latencies = Latencies::with_capacity(samples);
        for i in 0..samples {
            let started = Instant::now();
            self.call("counter.add", Self::body(i % entities, "add"))
                .await?;
            latencies.push(started.elapsed());
        }
        Ok(latencies)
    }

    /// Open loop at `rate` commands/s, each latency measured from when it was due.
    async fn open_loop_latency(
        &self,
        entities: usize,
        rate: f64,
        samples: usize,
    ) -> anyhow::Result<Latencies> {
        let subject = self.subject("add");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let started = tokio::time::Instant::now();
        for i in 0..samples {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due).await;
            let client = self.client.clone();
            let subject = subject.clone();
            let tx = tx.clone();
            let body = Self::body(i % entities, "add");
            tokio::spawn(async move {
                let ok = client.request(subject, body).await.is_ok_and(|r| {
                    r.headers
                        .as_ref()
                        .is_none_or(|h| h.get(async_nats::service::NATS_SERVICE_ERROR).is_none())
                });
                let _ = tx.send((due.elapsed(), ok));
            });
        }
        drop(tx);
        let mut latencies = Latencies::with_capacity(samples);
        let mut failed = 0;
        while let Some((latency, ok)) = rx.recv().await {
            if ok {
                latencies.push(latency)
            } else {
                failed += 1
            }
        }
        anyhow::ensure!(failed == 0, "{failed} commands failed under open-loop load");
        Ok(latencies)
    }

    async fn stop(self) {
        self.app.shutdown().await;
    }
}

/// CPU time used by this process and by the server over a window, per operation.
struct CpuWindow {
    server_pid: Option<u32>,
    ours: Option<Duration>,
    server: Option<Duration>,
}

impl CpuWindow {
    fn start(server_pid: Option<u32>) -> Self {
        Self {
            server_pid,
            ours: cpu_time(None),
            server: server_pid.and_then(|p| cpu_time(Some(p))),
        }
    }

    /// Microseconds of CPU per operation: `(this process, the server)`; NaN where unknown.
    fn per_op(&self, ops: f64) -> (f64, f64) {
        let per = |before: Option<Duration>, pid: Option<u32>| match (before, cpu_time(pid)) {
            (Some(before), Some(after)) if ops > 0.0 => {
                after.saturating_sub(before).as_secs_f64() * 1e6 / ops
            }
            _ => f64::NAN,
        };
        let server = if self.server_pid.is_some() {
            per(self.server, self.server_pid)
        } else {
            f64::NAN
        };
        (per(self.ours, None), server)
    }
}

/// CPU time of this process's threads whose name starts with `prefix`, from `/proc`.
fn thread_cpu(prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|task| {
            let text = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks: u64 =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some(Duration::from_millis(ticks * 10))
        })
        .sum()
}

/// User plus system CPU time of a process (this one if `None`), from `/proc`.
fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports these in USER_HZ, 100 per second.
    Some(Duration::from_millis(ticks * 10))
}

/// Headers and payload shaped like one `counter.add` commit, for the raw baselines.
fn commit_like() -> anyhow::Result<(Bytes, async_nats::HeaderMap)> {
    let events = [CounterEvent::Added(Added {
        amount: 1,
        at: Timestamp::from_unix_nanos(1_700_000_000_000_000_000),
    })];
    let payload = codec::encode_events(&events, codec::Encoding::Bincode)?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(header::EVENT_TYPE, "counter.added");
    headers.insert(header::SCHEMA_VERSION, "1");
    headers.insert(header::ENTITY_VERSION, "1234");
    headers.insert(header::COMMAND_ID, new_command_id().as_str());
    headers.insert(header::PRINCIPAL, "anonymous");
    headers.insert(header::RECORDED_AT, "2026-11-22T03:22:15.502207079Z");
    headers.insert(header::CONTENT_TYPE, codec::BINCODE_CONTENT_TYPE);
    Ok((payload, headers))
}

/// The raw baseline's stream and subjects, one per entity like the event stream.
async fn raw_target(
    client: &async_nats::Client,
    name: &str,
    entities: usize,
) -> anyhow::Result<(async_nats::jetstream::Context, Vec<String>)> {
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        .build(client.clone());
    raw::stream(
        &js,
        &format!("RAW{}", name.to_uppercase()),
        &format!("raw{name}.>"),
    )
    .await?;
    Ok((
        js,
        (0..entities)
            .map(|i| format!("raw{name}.evt.c{i}"))
            .collect(),
    ))
}

/// Runs the chosen scenarios, printing each figure as it is measured.
pub async fn run(options: &Options, out: &mut dyn Write) -> anyhow::Result<Report> {
    let mut servers = Vec::new();
    let binary =
        || nats_server::locate_or_install(&nats_server::tools_dir()).context("finding nats-server");
    let url = match &options.nats_url {
        Some(url) => url.clone(),
        None => {
            let server = NatsServer::start(nats_server::Options::new(binary()?))?;
            let url = server.url();
            servers.push(server);
            url
        }
    };
    let mut report = Report {
        server: url.clone(),
        release_build: !cfg!(debug_assertions),
        rows: Vec::new(),
    };
    if cfg!(debug_assertions) {
        writeln!(
            out,
            "note: a debug build; run `cargo run --release -- bench` for representative figures"
        )?;
    }
    writeln!(
        out,
        "{:<11} {:<34} {:>12} {:>12} {:<9} {:>8}  {:<9} verdict",
        "scenario", "metric", "switchyard", "raw", "unit", "ratio", "target"
    )?;
    let wants = |s: Scenario| options.scenarios.contains(&s);
    let server_pid = servers.first().and_then(NatsServer::pid);
    if wants(Scenario::Throughput) || wants(Scenario::Latency) {
        let latency = wants(Scenario::Latency);
        Box::pin(throughput_and_latency(
            &url,
            server_pid,
            "tp",
            "throughput",
            options,
            latency,
            &mut report,
            out,
        ))
        .await?;
    }
    if wants(Scenario::Replay) {
        replay(&url, options, &mut report, out).await?;
    }
    if wants(Scenario::Activation) {
        activation(&url, &mut report, out).await?;
    }
    if wants(Scenario::Memory) {
        Box::pin(memory(&url, options, &mut report, out)).await?;
    }
    if wants(Scenario::Replicas) {
        if options.nats_url.is_some() {
            writeln!(out, "replicas: skipped; it starts its own 3-node cluster")?;
        } else {
            let cluster = nats_server::NatsCluster::start(&binary()?, 3, None)?;
            Box::pin(replicas(&cluster, options, &mut report, out)).await?;
        }
    }
    if wants(Scenario::Sessions) {
        Box::pin(sessions::sessions(&url, options, &mut report, out)).await?;
    }
    if wants(Scenario::Lessons) {
        Box::pin(lessons::lessons(&url, options, &mut report, out)).await?;
    }
    if wants(Scenario::Kubernetes) {
        Box::pin(kubernetes::kubernetes(&url, options, &mut report, out)).await?;
    }
    if wants(Scenario::Pools) {
        Box::pin(pools::pools(&url, options, &mut report, out)).await?;
    }
    if wants(Scenario::Durable) {
        if options.nats_url.is_some() {
            writeln!(
                out,
                "durable: skipped; it starts its own server with sync_interval: always"
            )?;
        } else {
            let mut durable = nats_server::Options::new(binary()?);
            durable.sync_always = true;
            let server = NatsServer::start(durable)?;
            let durable_options = Options {
                duration: options.duration / 2,
                latency_samples: options.latency_samples / 5,
                ..options.clone()
            };
            Box::pin(throughput_and_latency(
                &server.url(),
                server.pid(),
                "dur",
                "durable",
                &durable_options,
                true,
                &mut report,
                out,
            ))
            .await?;
            servers.push(server);
        }
    }
    Ok(report)
}

/// Throughput through one replica, then three, over a 3-node cluster with R3 streams; the
/// share of requests forwarded to their shard's owner; raw R3 publishes on the same cluster.
async fn replicas(
    cluster: &nats_server::NatsCluster,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let urls = cluster.urls();
    let probe = async_nats::connect(urls.clone()).await?;
    anyhow::ensure!(
        nats_server::wait_for_jetstream(&probe, Duration::from_secs(30)).await,
        "the cluster elected no JetStream leader"
    );
    let on_cluster = |replica: &str| {
        let urls = urls.clone();
        let replica = replica.to_owned();
        move |config: &mut Config| {
            config.nats.servers = urls;
            config.store.replicas = 3;
            config.cluster.replica = replica;
        }
    };
    let duration = options.duration / 2;
    // One replica: it owns every shard, nothing is forwarded.
    let one = Bench::start(&urls[0], "rep", on_cluster("rep-0")).await?;
    one.create(options.entities, options.in_flight).await?;
    one.throughput(options.entities, options.in_flight, duration / 5)
        .await?;
    let one_rate = one
        .throughput(options.entities, options.in_flight, duration)
        .await?;
    // Three: the queue group spreads requests, two in three reach a replica that does not own
    // their entity and are forwarded.
    let mut others = Vec::new();
    for name in ["rep-1", "rep-2"] {
        let app = App::start(
            &{
                let mut config = one.config.clone();
                on_cluster(name)(&mut config);
                config
            },
            system_clock(),
        )
        .await
        .context("starting another replica")?;
        others.push(app);
    }
    let started = Instant::now();
    while !(one.app.ownership().owned().len() < one.app.ownership().shards() as usize
        && others.iter().all(|a| !a.ownership().owned().is_empty()))
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the replicas did not share the shards"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    one.throughput(options.entities, options.in_flight, duration / 5)
        .await?;
    let forwarded_before = forwarded(&one.app) + others.iter().map(forwarded).sum::<f64>();
    let three_rate = one
        .throughput(options.entities, options.in_flight, duration)
        .await?;
    let forwarded_after = forwarded(&one.app) + others.iter().map(forwarded).sum::<f64>();
    let share = (forwarded_after - forwarded_before) / (three_rate * duration.as_secs_f64());
    for app in others {
        app.shutdown().await;
    }
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(30))
        .build(one.client.clone());
    raw::stream_with_replicas(&js, "RAWREP", "rawrep.>", 3).await?;
    let subjects: Vec<String> = (0..options.entities)
        .map(|i| format!("rawrep.evt.c{i}"))
        .collect();
    let (payload, headers) = commit_like()?;
    let raw_rate = raw::async_publish_rate(
        &js,
        &subjects,
        &payload,
        &headers,
        options.in_flight,
        duration,
    )
    .await?;
    let in_flight = options.in_flight;
    report.add(
        out,
        Row::new(
            "replicas",
            &format!("commands/s, 1 replica, R3 ({in_flight} in flight)"),
            "per s",
            one_rate,
            Some(raw_rate),
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            "replicas",
            &format!("commands/s, 3 replicas, R3 ({in_flight} in flight)"),
            "per s",
            three_rate,
            Some(raw_rate),
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            "replicas",
            "requests forwarded to their owner, 3 replicas",
            "share",
            share,
            None,
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            "replicas",
            "3 replicas against 1 (the cost of the extra hop)",
            "ratio",
            three_rate / one_rate,
            None,
            None,
        ),
    )?;
    one.app.shutdown().await;
    Ok(())
}

/// Requests this replica sent on to another (API and entity forwards).
fn forwarded(app: &App) -> f64 {
    app.metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with("switchyard_forwarded_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[allow(clippy::too_many_arguments)] // one call per server; a struct would only rename them
async fn throughput_and_latency(
    url: &str,
    server_pid: Option<u32>,
    name: &str,
    scenario: &str,
    options: &Options,
    latency: bool,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let bench = Bench::start(url, name, |_| {}).await?;
    bench.create(options.entities, options.in_flight).await?;
    // Warm up: every entity actor active, connections and allocations settled.
    bench
        .throughput(options.entities, options.in_flight, options.duration / 5)
        .await?;
    let cpu = CpuWindow::start(server_pid);
    let rate = bench
        .throughput(options.entities, options.in_flight, options.duration)
        .await?;
    let (ours, server) = cpu.per_op(rate * options.duration.as_secs_f64());
    let (js, subjects) = raw_target(&bench.client, name, options.entities).await?;
    let (payload, headers) = commit_like()?;
    let cpu = CpuWindow::start(server_pid);
    let raw_rate = raw::async_publish_rate(
        &js,
        &subjects,
        &payload,
        &headers,
        options.in_flight,
        options.duration,
    )
    .await?;
    let (raw_ours, raw_server) = cpu.per_op(raw_rate * options.duration.as_secs_f64());
    // The same load with a command id of the caller's on every command: what recognising a
    // retry for the whole idempotency window costs (every entity has long passed its last 64
    // commands, so each command is looked up in the command index, and then indexed).
    let cpu = CpuWindow::start(server_pid);
    let id_rate = bench
        .throughput_with(options.entities, options.in_flight, options.duration, true)
        .await?;
    let (id_ours, id_server) = cpu.per_op(id_rate * options.duration.as_secs_f64());
    let label = if scenario == "durable" {
        "durable"
    } else {
        "throughput"
    };
    report.add(
        out,
        Row::new(
            label,
            &format!("commands/s ({} in flight)", options.in_flight),
            "per s",
            rate,
            Some(raw_rate),
            (scenario != "durable").then_some(Target::RatioAtLeast(0.5)),
        ),
    )?;
    let label_cpu = if scenario == "durable" {
        "durable"
    } else {
        "throughput"
    };
    report.add(
        out,
        Row::new(
            label_cpu,
            "CPU per command: this process",
            "us",
            ours,
            Some(raw_ours),
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            label_cpu,
            "CPU per command: nats-server",
            "us",
            server,
            Some(raw_server),
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            label_cpu,
            "commands/s, each with a caller's command id (24 h retry check)",
            "per s",
            id_rate,
            Some(raw_rate),
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            label_cpu,
            "CPU per command with command ids: this process",
            "us",
            id_ours,
            Some(raw_ours),
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            label_cpu,
            "CPU per command with command ids: nats-server",
            "us",
            id_server,
            Some(raw_server),
            None,
        ),
    )?;
    if latency {
        let low = bench
            .sequential_latency(options.entities, options.latency_samples)
            .await?;
        let raw_low = raw::sync_publish_latency(
            &js,
            &subjects,
            &payload,
            &headers,
            options.latency_samples,
            1 << 40,
        )
        .await?;
        let label = if scenario == "durable" {
            "durable"
        } else {
            "latency"
        };
        for (q, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
            let target = (q == 0.99 && scenario != "durable").then_some(Target::RatioAtMost(3.0));
            report.add(
                out,
                Row::new(
                    label,
                    &format!("low load {name}"),
                    "ms",
                    low.quantile_ms(q),
                    Some(raw_low.quantile_ms(q)),
                    target,
                ),
            )?;
        }
        let load = 0.8 * rate;
        let samples =
            ((load * options.duration.as_secs_f64() / 2.0) as usize).max(options.latency_samples);
        let busy = bench
            .open_loop_latency(options.entities, load, samples)
            .await?;
        let raw_busy = raw::open_loop_publish_latency(
            &js,
            &subjects,
            &payload,
            &headers,
            load,
            samples,
            1 << 41,
        )
        .await?;
        for (q, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
            report.add(
                out,
                Row::new(
                    label,
                    &format!("at 80% ({load:.0}/s) {name}"),
                    "ms",
                    busy.quantile_ms(q),
                    Some(raw_busy.quantile_ms(q)),
                    None,
                ),
            )?;
        }
    }
    bench.stop().await;
    Ok(())
}

/// Appends `events` commits of one event each, spread over `entities` counters, through the
/// event store (OCC per entity, entities in parallel). Returns the commits per second.
async fn seed(store: &EventStore, entities: usize, events: usize) -> anyhow::Result<f64> {
    let per_entity = events.div_ceil(entities);
    let started = Instant::now();
    futures::stream::iter(0..entities)
        .map(|e| async move {
            let id = CounterId::new(format!("c{e}"))?;
            let mut last = 0;
            for version in 1..=per_entity as u64 {
                let event = if version == 1 {
                    CounterEvent::Created(Created {
                        limit: None,
                        idle_ttl_ms: None,
                        at: Timestamp::EPOCH,
                    })
                } else {
                    CounterEvent::Added(Added {
                        amount: 1,
                        at: Timestamp::EPOCH,
                    })
                };
                let command_id = new_command_id();
                last = store
                    .append(Commit {
                        fence: None,
                        kind: Counter::KIND,
                        entity: id.as_str(),
                        expected: last,
                        entity_version: version,
                        command_id: &command_id,
                        principal: &Principal::system(),
                        digest: None,
                        generated_id: false,
                        recorded_at: Timestamp::EPOCH,
                        events: &[event],
                    })
                    .await?
                    .seq;
            }
            anyhow::Ok(())
        })
        .buffer_unordered(512)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<()>>()?;
    Ok((per_entity * entities) as f64 / started.elapsed().as_secs_f64())
}

async fn open_store(url: &str, name: &str) -> anyhow::Result<EventStore> {
    let client = async_nats::connect(url).await?;
    let config = StoreConfig {
        subject_prefix: format!("bench{name}"),
        stream_prefix: format!("BENCH{}", name.to_uppercase()),
        ..StoreConfig::default()
    };
    Ok(EventStore::open(client, &config, Duration::from_secs(30)).await?)
}

async fn replay(
    url: &str,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let store = open_store(url, "rp").await?;
    let entities = options.entities.min(options.replay_events).max(1);
    let seeding = seed(&store, entities, options.replay_events).await?;
    let total = store.last_sequence().await?;
    report.add(
        out,
        Row::new(
            "replay",
            "seeding: store appends (OCC) /s",
            "per s",
            seeding,
            None,
            None,
        ),
    )?;

    // The raw read and the rebuild alternate, twice each, and each side keeps its best run: the
    // server's block cache warms and cools between reads, so whichever ran first would pay for
    // it, and a single order would bias the ratio.
    let all_events = store.subjects().all_events();
    let raw_read =
        || raw::ordered_read_rate(store.jetstream(), store.stream_name(), &all_events, total);
    let raw_first = raw_read().await?;
    let first = rebuild(&store, total, entities).await?;
    let raw_second = raw_read().await?;
    let second = rebuild(&store, total, entities).await?;
    let raw_rate = raw_first.max(raw_second);
    let best = if first.rate >= second.rate {
        first
    } else {
        second
    };
    let (rate, arbiter_busy, workers_busy) = (best.rate, best.arbiter_busy, best.workers_busy);
    // The layer under the projection: the store's reader, messages not decoded.
    let started = Instant::now();
    let (mut messages, pending) = store
        .follow(
            &store.subjects().all_events(),
            crate::store::Start::Sequence(1),
        )
        .await?;
    for _ in 0..pending {
        messages
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the stream ended early"))??;
    }
    let follow_rate = pending as f64 / started.elapsed().as_secs_f64();
    drop(messages);
    for (metric, value, raw) in [
        ("rebuild: first run", first.rate, raw_first),
        ("rebuild: second run", second.rate, raw_second),
    ] {
        report.add(
            out,
            Row::new("replay", metric, "events/s", value, Some(raw), None),
        )?;
    }
    report.add(
        out,
        Row::new(
            "replay",
            &format!("projection rebuild, {total} events"),
            "events/s",
            rate,
            Some(raw_rate),
            Some(Target::RatioAtLeast(0.8)),
        ),
    )?;
    report.add(
        out,
        Row::new(
            "replay",
            "rebuild: projection thread busy",
            "%",
            arbiter_busy * 100.0,
            None,
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            "replay",
            "rebuild: reader threads busy",
            "%",
            workers_busy * 100.0,
            None,
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            "replay",
            "store reader, not decoded",
            "events/s",
            follow_rate,
            Some(raw_rate),
            None,
        ),
    )?;
    Ok(())
}

/// One rebuild of the counter table from the whole stream.
#[derive(Clone, Copy)]
struct Rebuild {
    rate: f64,
    arbiter_busy: f64,
    workers_busy: f64,
}

async fn rebuild(store: &EventStore, total: u64, entities: usize) -> anyhow::Result<Rebuild> {
    let started = Instant::now();
    let (arbiters, workers) = (thread_cpu("actix-rt|system"), thread_cpu("tokio-worker"));
    let table = ProjectionHandle::start(
        EntityTable::<Counter>::default(),
        store.clone(),
        Metrics::new(),
    );
    let mut ready = table.readiness();
    while !ready.borrow_and_update().is_ready() {
        ready.changed().await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rebuild = Rebuild {
        rate: total as f64 / elapsed,
        arbiter_busy: (thread_cpu("actix-rt|system") - arbiters).as_secs_f64() / elapsed,
        workers_busy: (thread_cpu("tokio-worker") - workers).as_secs_f64() / elapsed,
    };
    let rows = table.ask(|t, _| t.len()).await?;
    anyhow::ensure!(
        rows == entities,
        "the rebuilt table has {rows} rows, expected {entities}"
    );
    table.stop();
    Ok(rebuild)
}

async fn activation(url: &str, report: &mut Report, out: &mut dyn Write) -> anyhow::Result<()> {
    let store = open_store(url, "act").await?;
    seed(&store, 1, 900).await?;
    let id = CounterId::new("c0")?;
    let mut entity = store.load::<Counter>(&id).await?;
    store.save_snapshot(&mut entity).await;
    // 100 more after the snapshot: 1,000 events in all.
    let mut last = entity.last_seq;
    for version in 901..=1000u64 {
        let command_id = new_command_id();
        last = store
            .append(Commit {
                fence: None,
                kind: Counter::KIND,
                entity: id.as_str(),
                expected: last,
                entity_version: version,
                command_id: &command_id,
                principal: &Principal::system(),
                digest: None,
                generated_id: false,
                recorded_at: Timestamp::EPOCH,
                events: &[CounterEvent::Added(Added {
                    amount: 1,
                    at: Timestamp::EPOCH,
                })],
            })
            .await?
            .seq;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut with_snapshot = Vec::new();
    let mut full = Vec::new();
    let mut raw_read = Vec::new();
    let subject = store.subjects().event(Counter::KIND, id.as_str());
    for _ in 0..21 {
        let started = Instant::now();
        let loaded = store.load::<Counter>(&id).await?;
        with_snapshot.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(loaded.version == 1000, "loaded version {}", loaded.version);
        let started = Instant::now();
        let replayed = store.load_as_of::<Counter>(&id, u64::MAX).await?;
        full.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            replayed.state == loaded.state,
            "snapshot plus tail differs from the full replay"
        );
        let started = Instant::now();
        let messages = store.read_subject(&subject, 1, None).await?;
        raw_read.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(messages.len() == 1000);
    }
    report.add(
        out,
        Row::new(
            "activation",
            "1,000 events: snapshot + 100 tail",
            "ms",
            median(with_snapshot),
            Some(median(full.clone())),
            None,
        ),
    )?;
    report.add(
        out,
        Row::new(
            "activation",
            "1,000 events: full replay",
            "ms",
            median(full),
            Some(median(raw_read)),
            None,
        ),
    )?;
    Ok(())
}

async fn memory(
    url: &str,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use crate::alloc::{counted_bytes, start_counting, stop_counting};
    // Live heap bytes, counted by the allocator while this scenario runs; a short settle lets
    // in-flight replies and stopped actors be dropped before each reading.
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    let bench = Bench::start(url, "mem", |_| {}).await?;
    let n = options.memory_entities;
    settle().await;
    start_counting();
    bench.create(n, options.in_flight).await?;
    let table = bench
        .app
        .services()
        .table::<crate::domain::counter::Counter>()
        .context("the counter read model")?;
    let started = Instant::now();
    while table.ask(|t, _| t.len()).await? < n {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the table did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counters = bench
        .app
        .services()
        .entities::<crate::domain::counter::Counter>()
        .context("the counter registry")?;
    let active_count = counters.active().await;
    settle().await;
    let active = counted_bytes();
    passivate_all(&counters).await;
    settle().await;
    let passive = counted_bytes();
    stop_counting();
    let per_active = (active - passive).max(0) as f64 / active_count.max(1) as f64;
    let per_passive = passive.max(0) as f64 / n as f64;
    report.add(
        out,
        Row::new(
            "memory",
            &format!("per active entity actor ({active_count})"),
            "bytes",
            per_active,
            None,
            Some(Target::AtMost(4096.0)),
        ),
    )?;
    report.add(
        out,
        Row::new(
            "memory",
            &format!("per passivated entity ({n})"),
            "bytes",
            per_passive,
            None,
            Some(Target::AtMost(1024.0)),
        ),
    )?;
    bench.stop().await;
    Box::pin(switchboard_memory(url, options, report, out)).await?;
    report.add(
        out,
        Row::new(
            "memory",
            "resident set after the run",
            "MiB",
            crate::alloc::resident_bytes() as f64 / (1 << 20) as f64,
            None,
            None,
        ),
    )?;
    Ok(())
}

/// The switchboard at scale: `memory_entities` meeting points over a hundredth as many pods
/// (100,000 over 1,000 in a full run), each reserved through the whole path. Heap bytes per
/// active actor of each kind, and per passivated entity (its read-model row).
async fn switchboard_memory(
    url: &str,
    options: &Options,
    report: &mut Report,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use crate::alloc::{counted_bytes, start_counting, stop_counting};
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    let bench = Bench::start(url, "board", |_| {}).await?;
    let meeting_points = options.memory_entities;
    let pods = (meeting_points / 100).max(1);
    let keepalive_ms = 86_400_000; // nothing expires during the scenario
    settle().await;
    start_counting();
    each(pods, options.in_flight, |i| {
        let body = json!({"pod": format!("pod-{i}"), "keepalive_ms": keepalive_ms});
        bench.call("pod.add", Bytes::from(body.to_string()))
    })
    .await?;
    let started = Instant::now();
    each(meeting_points, options.in_flight, |i| {
        let body = json!({"machine": format!("machine-{i}.example.com"),
                          "username": "chrome-bot", "keepalive_ms": keepalive_ms});
        bench.call("meeting_point.reserve", Bytes::from(body.to_string()))
    })
    .await?;
    let reserve_rate = meeting_points as f64 / started.elapsed().as_secs_f64();
    let board = bench
        .app
        .services()
        .get::<crate::switchboard::Switchboard>()
        .context("the switchboard")?;
    let started = Instant::now();
    while board.meeting_point_table.ask(|t, _| t.len()).await? < meeting_points
        || board.pod_table.ask(|t, _| t.len()).await? < pods
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the switchboard tables did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (active_pods, active_points) = (
        board.pods.active().await,
        board.meeting_points.active().await,
    );
    settle().await;
    let all_active = counted_bytes();
    passivate_all(&board.meeting_points).await;
    settle().await;
    let pods_active = counted_bytes();
    passivate_all(&board.pods).await;
    settle().await;
    let passive = counted_bytes();
    stop_counting();
    let per = |bytes: isize, n: usize| bytes.max(0) as f64 / n.max(1) as f64;
    let rows = [
        (
            format!("reservations through the whole path ({meeting_points})"),
            "reservations/s",
            reserve_rate,
            None,
        ),
        (
            format!("per active meeting point actor ({active_points})"),
            "bytes",
            per(all_active - pods_active, active_points),
            Some(Target::AtMost(4096.0)),
        ),
        (
            format!(
                "per active pod actor, {} leases each ({active_pods})",
                meeting_points / pods
            ),
            "bytes",
            per(pods_active - passive, active_pods),
            None,
        ),
        (
            format!(
                "per passivated pod or meeting point ({})",
                pods + meeting_points
            ),
            "bytes",
            per(passive, pods + meeting_points),
            Some(Target::AtMost(1024.0)),
        ),
    ];
    for (metric, unit, value, target) in rows {
        report.add(out, Row::new("memory", &metric, unit, value, None, target))?;
    }
    bench.stop().await;
    Ok(())
}
