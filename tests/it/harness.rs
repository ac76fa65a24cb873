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

#[allow(dead_code)]
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
