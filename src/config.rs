//! Configuration: a TOML file plus `SWITCHYARD_*` environment variables (nested keys joined by
//! `__`, e.g. `SWITCHYARD_NATS__SERVERS`), over built-in defaults. Every timing lives here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::codec::Encoding;
use crate::telemetry::LogConfig;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub store: StoreConfig,
    pub runtime: RuntimeConfig,
    pub switchboard: SwitchboardConfig,
    pub sessions: SessionsConfig,
    pub lessons: LessonsConfig,
    pub kubernetes: KubernetesConfig,
    pub cloud: CloudConfig,
    pub cluster: ClusterConfig,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
}

/// Who callers are, and what they may do.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// How authenticated NATS users map to principals and roles (mode `nats`); the first entry
    /// that matches a caller applies.
    pub principals: Vec<PrincipalRule>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No caller is authenticated: everyone is an operator, and `Switchyard-Principal` names
    /// the caller on the events. For one account on one machine (the embedded default).
    #[default]
    Open,
    /// The caller is the user NATS authenticated, from the `Nats-Request-Info` header that
    /// the server adds to requests imported with `share: true`; `principals` gives its roles.
    Nats,
}

/// One entry of the principal table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalRule {
    /// The caller's NATS account; any account if absent.
    #[serde(default)]
    pub account: Option<String>,
    /// The caller's NATS user; every user of the account if absent (and fire-and-forget
    /// commands, which carry only their account, match only such an entry).
    #[serde(default)]
    pub user: Option<String>,
    /// Recorded on the events; the user's name (or the account's) if absent. For a `pod` or a
    /// `machine`, it is also the pod or machine it may act on.
    #[serde(default)]
    pub principal: Option<String>,
    pub roles: Vec<Role>,
    /// May name the principal it acts for with `Switchyard-Principal` (a portal, a CI system);
    /// from anyone else that header is ignored.
    #[serde(default)]
    pub gateway: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Operator,
    /// Queries only (and the log itself, through its own NATS permissions).
    Auditor,
    /// Register, keep alive and remove the pod named by its principal; read the meeting
    /// points on it.
    Pod,
    /// Reserve, keep alive, clear and read the meeting point of the machine named by its
    /// principal; read pods.
    Machine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs; several for a cluster.
    pub servers: Vec<String>,
    /// The connection name the server shows in its monitoring.
    pub name: String,
    /// A `.creds` file (JWT and nkey seed), as NGS and operator-mode clusters issue.
    pub credentials_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub tls: TlsConfig,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a JetStream API call or publish acknowledgement may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Wait for the server at startup instead of failing.
    pub retry_on_initial_connect: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".to_owned()],
            name: "switchyard".to_owned(),
            credentials_file: None,
            nkey_seed_file: None,
            user: None,
            password: None,
            token: None,
            tls: TlsConfig::default(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            retry_on_initial_connect: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub required: bool,
    /// Extra root certificates (PEM) to trust.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The first subject token(s) of every subject Switchyard uses.
    pub subject_prefix: String,
    /// Stream and bucket names start with this: `<prefix>_EVENTS`, `<prefix>_COMMANDS`,
    /// `<prefix>_SNAPSHOTS`.
    pub stream_prefix: String,
    /// 1 for a single server, 3 in production.
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id`: the horizon of idempotent retries beyond
    /// the last commands each entity remembers itself.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long a retry (the same command id on the same entity) is recognised and answered
    /// with its first reply, however many commands the entity took since.
    #[serde(with = "humantime_serde")]
    pub idempotency_window: Duration,
    /// Optional size limit of the event stream. Events are never discarded silently: with a
    /// limit, a full stream refuses new commits.
    pub max_bytes: Option<i64>,
    /// How events are encoded on write; both are always readable.
    pub encoding: Encoding,
    /// Write a snapshot after this many events since the last one; 0 disables snapshots.
    pub snapshot_every: u64,
    /// How long fire-and-forget commands wait in their work queue for a control plane.
    #[serde(with = "humantime_serde")]
    pub command_retention: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            subject_prefix: "sy".to_owned(),
            stream_prefix: "SWITCHYARD".to_owned(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            idempotency_window: Duration::from_secs(24 * 3600),
            max_bytes: None,
            encoding: Encoding::Bincode,
            snapshot_every: 100,
            command_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl StoreConfig {
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_prefix)
    }

    pub fn commands_stream(&self) -> String {
        format!("{}_COMMANDS", self.stream_prefix)
    }

    pub fn snapshot_bucket(&self) -> String {
        format!("{}_SNAPSHOTS", self.stream_prefix)
    }

    pub fn command_index_bucket(&self) -> String {
        format!("{}_COMMAND_IDS", self.stream_prefix)
    }
}

/// Meeting points and switch pods.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwitchboardConfig {
    /// How often the reconciler looks for port leases without their meeting point and
    /// meeting points without their lease.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// The reconciler leaves alone anything younger than this: longer than a reservation takes.
    #[serde(with = "humantime_serde")]
    pub reconcile_grace: Duration,
    /// Pods a reservation tries, least loaded first, before it gives up.
    pub reserve_attempts: usize,
}

impl Default for SwitchboardConfig {
    fn default() -> Self {
        Self {
            reconcile_interval: Duration::from_secs(10),
            reconcile_grace: Duration::from_secs(30),
            reserve_attempts: 3,
        }
    }
}

/// Test sessions: the pools their components run on, and how they run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// What runs sessions' components: `local` (processes) or `kubernetes` (a pod each).
    pub backend: SessionBackendKind,
    /// At most this many sessions are admitted (provisioning, running or cleaning up) at once.
    pub executor_count: u32,
    /// A session not done this long after admission ends in ERROR (timeout), unless it gives
    /// its own `timeout_ms`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The variable the driver gets the workers' addresses in (`host:port`, comma-separated).
    pub workers_env: String,
    /// How often a running session's processes and readiness checks are looked at.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a readiness check (a TCP connection, or a command) may take.
    #[serde(with = "humantime_serde")]
    pub check_timeout: Duration,
    /// Between SIGTERM and SIGKILL when a session's processes are stopped.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Where the process backend keeps what it started (one directory per process: its label,
    /// pid, output and exit code). Replicas on one machine share it.
    pub process_dir: std::path::PathBuf,
    /// A component's stored output keeps its last this many bytes.
    pub max_log_bytes: u64,
    /// How often processes that no live session owns are looked for (and removed).
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Only what has not changed for this long is pruned: younger than a session takes to be
    /// recorded.
    #[serde(with = "humantime_serde")]
    pub prune_grace: Duration,
    /// The pools; every replica must have the same. Empty: sessions cannot be scheduled.
    pub pools: Vec<PoolConfig>,
}

/// One pool of machines. For the process backend every machine is this host: `capacity` (or
/// the number of `machines`) is how many components it runs at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub name: String,
    /// Machine names; `<name>-0` .. `<name>-<capacity - 1>` when empty.
    pub machines: Vec<String>,
    pub capacity: u32,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            backend: SessionBackendKind::Local,
            executor_count: 1,
            timeout: Duration::from_secs(15 * 60),
            workers_env: "QPS_WORKERS".to_owned(),
            poll_interval: Duration::from_millis(250),
            check_timeout: Duration::from_secs(5),
            stop_grace: Duration::from_secs(5),
            process_dir: std::path::PathBuf::from(".switchyard/processes"),
            max_log_bytes: 16 * 1024 * 1024,
            prune_interval: Duration::from_secs(30),
            prune_grace: Duration::from_secs(60),
            pools: Vec::new(),
        }
    }
}

/// Live lessons: the curriculum, the limits and TTLs, and the backend that runs them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LessonsConfig {
    /// What runs live lessons: `local` (processes on this machine) or `kubernetes` (a
    /// namespace per lesson, through `[kubernetes]`).
    pub backend: LessonBackendKind,
    /// The curriculum directory, loaded (and recorded as a catalog event) at start; none: the
    /// catalog is whatever was loaded last (`lesson.reload` loads a directory).
    pub curriculum: Option<std::path::PathBuf>,
    /// Where the local backend keeps its processes, each lesson's key and each endpoint's home.
    /// Replicas on one machine share it.
    pub dir: std::path::PathBuf,
    /// A live session with no lesson this long after its creation is ended.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// A live lesson not requested (or kept alive) for this long is deleted, unless its
    /// session is persistent.
    #[serde(with = "humantime_serde")]
    pub lesson_ttl: Duration,
    /// Live sessions one source may hold at once; 0: no limit.
    pub session_limit: u32,
    /// Live lessons one session may hold at once; 0: no limit.
    pub lesson_limit: u32,
    /// How often garbage collection runs.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// From BOOTING, how long every endpoint has to answer before the lesson fails.
    #[serde(with = "humantime_serde")]
    pub reachability_timeout: Duration,
    /// One reachability test (an SSH handshake or a TCP connection) gives up after this.
    #[serde(with = "humantime_serde")]
    pub check_timeout: Duration,
    /// One endpoint's stage script may run this long.
    #[serde(with = "humantime_serde")]
    pub configure_timeout: Duration,
    /// How often a lesson waiting for its endpoints is looked at again.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Between SIGTERM and SIGKILL when a lesson's processes are stopped.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// How often the backend is searched for resources of no live lesson (and they are removed).
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Only what has not changed for this long is pruned.
    #[serde(with = "humantime_serde")]
    pub prune_grace: Duration,
}

impl Default for LessonsConfig {
    fn default() -> Self {
        Self {
            backend: LessonBackendKind::Local,
            curriculum: None,
            dir: std::path::PathBuf::from(".switchyard/lessons"),
            session_ttl: Duration::from_secs(1440 * 60),
            lesson_ttl: Duration::from_secs(30 * 60),
            session_limit: 0,
            lesson_limit: 0,
            gc_interval: Duration::from_secs(60),
            reachability_timeout: Duration::from_secs(300),
            check_timeout: Duration::from_secs(2),
            configure_timeout: Duration::from_secs(600),
            poll_interval: Duration::from_millis(250),
            stop_grace: Duration::from_secs(5),
            prune_interval: Duration::from_secs(30),
            prune_grace: Duration::from_secs(60),
        }
    }
}

/// The session backends configuration can select.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionBackendKind {
    /// Local processes (the process backend).
    #[default]
    Local,
    /// A pod per component on the cluster `[kubernetes]` names; without `pools`, the pools
    /// are its nodes labelled `kubernetes.pool_label`.
    Kubernetes,
}

/// The lesson backends configuration can select.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LessonBackendKind {
    /// Local processes: an OpenSSH `sshd` per ssh presentation, on loopback ports.
    #[default]
    Local,
    /// A namespace per live lesson on the cluster `[kubernetes]` names.
    Kubernetes,
}

/// Cloud pools (arvados dispatch-cloud): each is a sessions pool whose machines are the
/// instances of an instance set, created as sessions wait and shut down when idle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// How often each instance set lists its instances, probes them and plans.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// Driver calls per second and instance set, at most; 0: no limit.
    pub max_cloud_ops_per_second: u32,
    /// A created instance that has not passed its probes this long is shut down.
    #[serde(with = "humantime_serde")]
    pub timeout_booting: Duration,
    /// A worker idle this long is shut down (unless held).
    #[serde(with = "humantime_serde")]
    pub timeout_idle: Duration,
    /// A worker whose probes have failed this long is shut down (unless held).
    #[serde(with = "humantime_serde")]
    pub timeout_probe: Duration,
    /// An instance destroyed but still listed is destroyed again after this long.
    #[serde(with = "humantime_serde")]
    pub timeout_shutdown: Duration,
    /// How long one probe or executor connection may take.
    #[serde(with = "humantime_serde")]
    pub timeout_ssh: Duration,
    /// After a quota error, creates wait this long, or until fewer instances exist.
    #[serde(with = "humantime_serde")]
    pub quota_hold: Duration,
    /// After a capacity error, creates of its type, quota group or all wait this long.
    #[serde(with = "humantime_serde")]
    pub capacity_hold: Duration,
    /// Where this Switchyard keeps its instances' SSH key and the loopback driver's instances.
    pub dir: PathBuf,
    /// The pools; every replica must have the same.
    pub pools: Vec<CloudPoolConfig>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            sync_interval: Duration::from_secs(5),
            max_cloud_ops_per_second: 0,
            timeout_booting: Duration::from_secs(600),
            timeout_idle: Duration::from_secs(60),
            timeout_probe: Duration::from_secs(600),
            timeout_shutdown: Duration::from_secs(10),
            timeout_ssh: Duration::from_secs(30),
            quota_hold: Duration::from_secs(60),
            capacity_hold: Duration::from_secs(60),
            dir: PathBuf::from(".switchyard/cloud"),
            pools: Vec::new(),
        }
    }
}

/// One cloud pool: a sessions pool of this name, backed by an instance set of this id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudPoolConfig {
    pub name: String,
    /// `loopback`, `static`, `kubernetes` or `stub`.
    pub driver: String,
    /// The driver's own settings (loopback: `boot_delay`, `verify_host_key`, `faults`;
    /// static: `hosts`; kubernetes: `namespace`, `ssh_port`, `node_selector`; stub: `ssh`,
    /// `boot_delay`, `faults`).
    pub driver_config: serde_json::Value,
    pub instance_type: String,
    pub image: String,
    /// Instances at most, booting or not.
    pub max_instances: u32,
    /// Creates in flight at most.
    pub max_concurrent_creates: u32,
    /// Run on a booting instance until it exits 0: then it is ready (arvados's
    /// `BootProbeCommand`, e.g. `systemctl is-system-running`).
    pub boot_probe_command: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Default for CloudPoolConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            driver: "loopback".to_owned(),
            driver_config: serde_json::Value::Null,
            instance_type: "default".to_owned(),
            image: String::new(),
            max_instances: 64,
            max_concurrent_creates: 1,
            boot_probe_command: "true".to_owned(),
            labels: std::collections::BTreeMap::new(),
        }
    }
}

/// The cluster the Kubernetes backends use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// The API server's URL; none: the kubeconfig (`$KUBECONFIG`, else `~/.kube/config`) or,
    /// inside a pod, its service account.
    pub api: Option<String>,
    /// The kubeconfig file; none: `$KUBECONFIG`, else `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use; none: its current one.
    pub context: Option<String>,
    /// Who configuration scripts (and people) log in as on lesson endpoints.
    pub ssh_user: String,
    /// The namespace of session components' pods.
    pub namespace: String,
    /// The port a session component listens on in its pod (`PORT`; the driver's workers are
    /// `<pod IP>:<port>`).
    pub component_port: u16,
    /// The node label whose value names a node's pool (orch's `pool`).
    pub pool_label: String,
    /// A call answered with 429 or 5xx, or not answered, is tried again this often (waiting
    /// what the server asks, or backing off) before the step fails and is retried later.
    pub retries: u32,
    /// One API call gives up after this.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            api: None,
            kubeconfig: None,
            context: None,
            ssh_user: "root".to_owned(),
            namespace: "default".to_owned(),
            component_port: 10000,
            pool_label: "pool".to_owned(),
            retries: 4,
            call_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Commands queued per entity before callers get `unavailable`.
    pub mailbox_capacity: usize,
    /// An entity actor idle this long is stopped; its next command reactivates it.
    #[serde(with = "humantime_serde")]
    pub passivate_after: Duration,
    /// How often a conflicting write is retried after reloading the entity.
    pub conflict_retries: u32,
    /// How often reapers look for due work.
    #[serde(with = "humantime_serde")]
    pub reaper_interval: Duration,
    /// Threads for NATS I/O and request handling; 0 means one per core but one, which is left
    /// to the actix arbiter that runs the entity actors.
    pub worker_threads: usize,
    /// How often reactions look for due work when nothing new arrived (timeouts, retries,
    /// shards newly owned).
    #[serde(with = "humantime_serde")]
    pub reaction_interval: Duration,
    /// How often, at most, a reaction writes its checkpoint while events arrive.
    #[serde(with = "humantime_serde")]
    pub reaction_checkpoint_every: Duration,
    /// A reaction further behind the stream than this many messages runs no job and makes
    /// `/readyz` fail until it catches up.
    pub reaction_max_lag: u64,
}

impl RuntimeConfig {
    /// The worker threads to start: `worker_threads`, or one per core but one (at least one).
    pub fn worker_threads(&self) -> usize {
        match self.worker_threads {
            0 => {
                std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
            }
            n => n,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            mailbox_capacity: 64,
            passivate_after: Duration::from_secs(120),
            conflict_retries: 5,
            reaper_interval: Duration::from_secs(1),
            worker_threads: 0,
            reaction_interval: Duration::from_secs(1),
            reaction_checkpoint_every: Duration::from_secs(1),
            reaction_max_lag: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Requests larger than this are refused with `invalid`.
    pub max_payload: usize,
    /// Requests handled at once; beyond it callers get `unavailable`.
    pub max_in_flight: usize,
    /// How long a fire-and-forget command may be processed before it is redelivered.
    #[serde(with = "humantime_serde")]
    pub command_ack_wait: Duration,
    /// Delay before a fire-and-forget command that met `unavailable` is retried.
    #[serde(with = "humantime_serde")]
    pub command_retry_delay: Duration,
    /// The NATS queue group shared by all control plane instances.
    pub queue_group: String,
    /// One instance at a time pulls fire-and-forget commands (so one entity's are applied in
    /// order); when it stops pulling, another takes over after this long.
    #[serde(with = "humantime_serde")]
    pub command_failover: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_payload: 64 * 1024,
            max_in_flight: 10_000,
            command_ack_wait: Duration::from_secs(30),
            command_retry_delay: Duration::from_secs(1),
            queue_group: "switchyard".to_owned(),
            command_failover: Duration::from_secs(15),
        }
    }
}

/// How replicas share the entities: shards, each owned by one replica at a time through a
/// lease in the `<prefix>_SHARDS` bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How many shards the entities are hashed into. Every replica must agree: the first one
    /// records it in the bucket and a replica configured otherwise refuses to start. More
    /// shards than replicas spread the load evenly; changing it needs every replica stopped.
    pub shards: u32,
    /// How long a shard's lease lives without renewal: a killed replica's shards are taken
    /// over within about this long. Its owner renews it every eighth of it and stops
    /// serving the shard once three quarters have passed since its last successful renewal.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// This replica's name in leases, forwarding subjects and `/metrics`; a subject token.
    /// Empty: the host name and a random suffix, new at every start.
    pub replica: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            shards: 32,
            lease_ttl: Duration::from_secs(6),
            replica: String::new(),
        }
    }
}

impl StoreConfig {
    pub fn shard_bucket(&self) -> String {
        format!("{}_SHARDS", self.stream_prefix)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    MissingFile { path: PathBuf },
    #[error("invalid configuration")]
    Invalid(#[source] Box<figment::Error>),
}

impl Config {
    /// Defaults, then the TOML file (if given), then `SWITCHYARD_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile {
                    path: path.to_owned(),
                });
            }
            figment = figment.merge(Toml::file(path));
        }
        // Variables for the tools rather than the control plane are not configuration.
        let env = Env::prefixed("SWITCHYARD_").ignore(&[
            "config",
            "tools_dir",
            "nats_server",
            "failpoints",
        ]);
        figment = figment.merge(env.split("__"));
        figment
            .extract()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return its large error
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::default();
        assert_eq!(config.store.events_stream(), "SWITCHYARD_EVENTS");
        assert_eq!(config.store.duplicate_window, Duration::from_secs(120));
        assert_eq!(config.runtime.passivate_after, Duration::from_secs(120));
    }

    #[test]
    fn files_and_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "sy.toml",
                "[store]\nreplicas = 3\nduplicate_window = \"5m\"\n[runtime]\npassivate_after = \"30s\"\n",
            )?;
            jail.set_env(
                "SWITCHYARD_NATS__SERVERS",
                "[\"nats://a:4222\",\"nats://b:4222\"]",
            );
            jail.set_env("SWITCHYARD_STORE__REPLICAS", "5");
            jail.set_env("SWITCHYARD_TOOLS_DIR", "/somewhere");
            jail.set_env("SWITCHYARD_CONFIG", "sy.toml");
            let config = Config::load(Some(Path::new("sy.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.store.replicas, 5);
            assert_eq!(config.store.duplicate_window, Duration::from_secs(300));
            assert_eq!(config.runtime.passivate_after, Duration::from_secs(30));
            assert_eq!(config.nats.servers.len(), 2);
            Ok(())
        });
    }

    #[test]
    fn the_readme_lists_every_key_with_its_default() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        // The block of the Configuration section (other sections show snippets).
        let block = readme
            .split("## Configuration")
            .nth(1)
            .unwrap()
            .split("```toml\n")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap();
        let documented: Config = Figment::from(Toml::string(block)).extract().unwrap();
        let as_toml = |c: &Config| serde_json::to_value(c).unwrap();
        assert_eq!(as_toml(&documented), as_toml(&Config::default()));
    }

    #[test]
    fn the_shipped_production_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/switchyard.toml");
        let config = Config::load(Some(&path)).unwrap();
        assert_eq!(config.store.replicas, 3);
        assert_eq!(config.nats.servers.len(), 3);
    }

    /// The ConfigMap of `deploy/kubernetes/switchyard.yaml` is a configuration that loads and
    /// selects the Kubernetes backend.
    #[test]
    fn the_shipped_kubernetes_config_loads_and_selects_the_kubernetes_backend() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/switchyard.yaml");
        let manifest = std::fs::read_to_string(path).unwrap();
        let (_, rest) = manifest.split_once("switchyard.toml: |\n").unwrap();
        let toml: String = rest
            .lines()
            .take_while(|l| !l.starts_with("---"))
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(&toml))
            .extract()
            .unwrap();
        assert_eq!(config.lessons.backend, LessonBackendKind::Kubernetes);
        assert_eq!(config.sessions.backend, SessionBackendKind::Kubernetes);
        assert_eq!(config.kubernetes.api, None);
    }

    #[test]
    fn unknown_keys_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("sy.toml", "[store]\nreplica = 3\n")?;
            assert!(Config::load(Some(Path::new("sy.toml"))).is_err());
            Ok(())
        });
    }
}
