//! Real components for tests: a `nats-server` per test (free port, temporary store, killed on
//! drop), and a bounded wait for asynchronous effects instead of sleeps.

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use switchyard::config::StoreConfig;
use switchyard::nats_server::{self, NatsServer, Options};
use switchyard::store::EventStore;

/// The `nats-server` binary, located or installed once per test process.
pub fn nats_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools");
            nats_server::locate_or_install(&tools).expect("a nats-server binary")
        })
        .clone()
}

pub fn start_nats() -> NatsServer {
    NatsServer::start(Options::new(nats_binary())).expect("nats-server starts")
}

pub async fn connect(server: &NatsServer) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(server.url())
        .await
        .expect("connects to nats-server")
}

/// A server plus an event store on it with default settings.
pub struct StoreFixture {
    #[allow(dead_code)] // held so the server lives as long as the fixture
    pub server: NatsServer,
    pub client: async_nats::Client,
    pub store: EventStore,
}

pub async fn store_with(config: StoreConfig) -> StoreFixture {
    let server = start_nats();
    let client = connect(&server).await;
    let store = EventStore::open(client.clone(), &config, Duration::from_secs(5))
        .await
        .expect("event store opens");
    StoreFixture {
        server,
        client,
        store,
    }
}

pub async fn store() -> StoreFixture {
    store_with(StoreConfig::default()).await
}

/// Polls `condition` until it returns `Some`, for at most `limit`; panics with `what` otherwise.
/// Level-triggered: it checks the state, it does not wait for a particular event.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A control plane running in this test's actix system, on its own nats-server.
pub struct TestApp {
    pub server: NatsServer,
    pub app: switchyard::app::App,
    pub client: async_nats::Client,
    pub config: switchyard::config::Config,
    /// Kills what the test's backends started when the test ends, passed or failed.
    pub cleanup: ProcessGuard,
}

/// Kills, on drop, every process whose working directory is under one of its directories
/// (the process backend starts each process in its own), and the groups they lead: a test's
/// sessions and lessons never outlive it, even when it fails half-way.
pub struct ProcessGuard(pub Vec<PathBuf>);

impl ProcessGuard {
    pub fn of(config: &switchyard::config::Config) -> Self {
        Self(vec![
            config.sessions.process_dir.clone(),
            config.lessons.dir.clone(),
            config.cloud.dir.clone(),
        ])
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else {
                continue;
            };
            if self.0.iter().any(|dir| cwd.starts_with(dir)) {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A test configuration: free HTTP port, fast timers, the server's URL.
pub fn test_config(server: &NatsServer) -> switchyard::config::Config {
    let mut config = switchyard::config::Config::default();
    config.nats.servers = vec![server.url()];
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config.runtime.reaper_interval = Duration::from_millis(50);
    // A killed control plane's shards are taken over within this long.
    config.cluster.lease_ttl = Duration::from_secs(2);
    // Its own place for session processes (empty unless a test runs sessions).
    config.sessions.process_dir =
        std::env::temp_dir().join(format!("switchyard-test-{}", uuid::Uuid::new_v4().simple()));
    config.sessions.poll_interval = Duration::from_millis(50);
    // Its own place for lesson processes, keys and homes.
    config.lessons.dir = std::env::temp_dir().join(format!(
        "switchyard-lessons-{}",
        uuid::Uuid::new_v4().simple()
    ));
    // Its own place for cloud instances (loopback) and their key.
    config.cloud.dir = std::env::temp_dir().join(format!(
        "switchyard-cloud-{}",
        uuid::Uuid::new_v4().simple()
    ));
    config.runtime.reaction_interval = Duration::from_millis(200);
    config
}

pub async fn start_app(tweak: impl FnOnce(&mut switchyard::config::Config)) -> TestApp {
    start_app_with_clock(tweak, switchyard::runtime::system_clock()).await
}

pub async fn start_app_with_clock(
    tweak: impl FnOnce(&mut switchyard::config::Config),
    clock: switchyard::runtime::Clock,
) -> TestApp {
    let server = start_nats();
    let mut config = test_config(&server);
    tweak(&mut config);
    let app = switchyard::app::App::start(&config, clock)
        .await
        .expect("control plane starts");
    let client = connect(&server).await;
    let test = TestApp {
        server,
        app,
        client,
        cleanup: ProcessGuard::of(&config),
        config,
    };
    wait_for(
        "the control plane to be ready",
        Duration::from_secs(10),
        || async { test.app.is_ready().then_some(()) },
    )
    .await;
    test
}

impl TestApp {
    /// Shuts the control plane down and starts a new one on the same server and configuration,
    /// as a restart of the process would (everything is rebuilt from the log).
    pub async fn restart(self) -> TestApp {
        let TestApp {
            server,
            app,
            client,
            config,
            cleanup,
        } = self;
        app.shutdown().await;
        let app = switchyard::app::App::start(&config, switchyard::runtime::system_clock())
            .await
            .expect("control plane restarts");
        TestApp {
            server,
            app,
            client,
            config,
            cleanup,
        }
    }
}

/// A reply, split into its outcome.
#[derive(Debug)]
pub enum Reply {
    Ok(serde_json::Value),
    Err {
        code: String,
        message: String,
        status: String,
        /// `error.reason`, which must agree with `Switchyard-Error-Reason`.
        reason: Option<String>,
    },
}

impl Reply {
    #[track_caller]
    pub fn ok(self) -> serde_json::Value {
        match self {
            Reply::Ok(value) => value,
            Reply::Err { code, message, .. } => panic!("expected success, got {code}: {message}"),
        }
    }

    /// `code` or `code/reason`.
    #[track_caller]
    pub fn code_and_reason(self) -> String {
        match self {
            Reply::Ok(value) => panic!("expected an error, got {value}"),
            Reply::Err {
                code, reason: None, ..
            } => code,
            Reply::Err {
                code,
                reason: Some(reason),
                ..
            } => format!("{code}/{reason}"),
        }
    }

    /// The error's message.
    #[track_caller]
    pub fn message(&self) -> String {
        match self {
            Reply::Ok(value) => panic!("expected an error, got {value}"),
            Reply::Err { message, .. } => message.clone(),
        }
    }

    #[track_caller]
    pub fn code(self) -> String {
        match self {
            Reply::Ok(value) => panic!("expected an error, got {value}"),
            Reply::Err { code, .. } => code,
        }
    }
}

/// Sends a request to `sy.api.<route>` and decodes the reply.
pub async fn request(
    client: &async_nats::Client,
    route: &str,
    body: impl Into<bytes::Bytes>,
    headers: Option<async_nats::HeaderMap>,
) -> Reply {
    let subject = format!("sy.api.{route}");
    let message = match headers {
        Some(headers) => {
            client
                .request_with_headers(subject, headers, body.into())
                .await
        }
        None => client.request(subject, body.into()).await,
    }
    .expect("a reply");
    let value: serde_json::Value = serde_json::from_slice(&message.payload).expect("a JSON reply");
    Reply::from_message(&message, value)
}

impl Reply {
    pub fn from_message(message: &async_nats::Message, value: serde_json::Value) -> Reply {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        match header("Nats-Service-Error-Code") {
            Some(status) => {
                let code = value["error"]["code"]
                    .as_str()
                    .expect("an error code")
                    .to_owned();
                assert_eq!(
                    Some(&code),
                    header("Switchyard-Error").as_ref(),
                    "body and header agree on the code"
                );
                let message = value["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let reason = value["error"]["reason"].as_str().map(str::to_owned);
                assert_eq!(
                    reason,
                    header("Switchyard-Error-Reason"),
                    "body and header agree on the reason"
                );
                Reply::Err {
                    code,
                    message,
                    status,
                    reason,
                }
            }
            None => Reply::Ok(value),
        }
    }
}

pub async fn call(test: &TestApp, route: &str, body: serde_json::Value) -> Reply {
    request(&test.client, route, body.to_string(), None).await
}

/// A plain HTTP/1.0 GET: `(status, body)`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("HTTP connects");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Waits until the replicas have balanced the shards: each owned by the replica that prefers
/// it (rendezvous hashing over their names), so no hand-over is still to come.
pub async fn wait_balanced(apps: &[&switchyard::app::App]) {
    wait_for(
        "the replicas to balance the shards",
        Duration::from_secs(20),
        || async {
            let names: Vec<&str> = apps.iter().map(|a| a.ownership().replica()).collect();
            let shards = apps[0].ownership().shards();
            (0..shards)
                .all(|shard| {
                    let owners: Vec<&str> = apps
                        .iter()
                        .filter(|a| a.ownership().owns(shard))
                        .map(|a| a.ownership().replica())
                        .collect();
                    owners
                        == [
                            switchyard::cluster::plan::preferred(shard, names.iter().copied())
                                .unwrap(),
                        ]
                })
                .then_some(())
        },
    )
    .await;
}
