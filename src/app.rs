//! Wiring: connects to NATS, opens the event store, starts the actors, the API, the work queue
//! and the HTTP probes; and stops them in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::Client;

use crate::api::auth::{Auth, AuthError};
use crate::api::micro::Micro;
use crate::api::server::{ApiContext, ApiServer};
use crate::api::work_queue::{WorkQueue, WorkQueueError};
use crate::api::{Router, Services, routes};
use crate::config::{AuthMode, Config, NatsConfig};
use crate::http::{self, Probes};
use crate::metrics::Metrics;
use crate::runtime::{Clock, Readiness};
use crate::store::{EventStore, StoreError};

/// How long in-flight work may take to finish on shutdown.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot connect to NATS at {servers}")]
    Connect {
        servers: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot read the NATS credentials in {path}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the event store")]
    Store(#[from] StoreError),
    #[error("invalid principal table")]
    Auth(#[from] AuthError),
    #[error("cannot subscribe to the API subjects")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("cannot start the fire-and-forget command queue")]
    WorkQueue(#[from] WorkQueueError),
    #[error(transparent)]
    Routes(#[from] crate::api::routes::UnboundRoutes),
    #[error(transparent)]
    Config(#[from] crate::api::catalog::InvalidConfig),
    #[error("cannot take part in shard ownership")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("cannot serve HTTP on {addr}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running control plane.
pub struct App {
    client: Client,
    store: EventStore,
    services: Services,
    probes: Probes,
    api: ApiServer,
    forwarded: crate::cluster::forward::Forwarded,
    ownership: crate::cluster::Ownership,
    work_queue: WorkQueue,
    http: actix_web::dev::ServerHandle,
    http_addr: SocketAddr,
}

impl App {
    /// Starts everything on the current actix system; returns once the API is served (every
    /// read model has caught up).
    pub async fn start(config: &Config, clock: Clock) -> Result<Self, AppError> {
        // Boxed: the start-up future is large, and every caller would carry it.
        Box::pin(Self::start_inner(config, clock)).await
    }

    async fn start_inner(config: &Config, clock: Clock) -> Result<Self, AppError> {
        let client = connect(&config.nats).await?;
        let store = open_store(&client, config).await?;
        let metrics = Metrics::new();
        let ownership = open_ownership(&store, config, &metrics).await?;
        let services = Services::start(&store, config, clock.clone(), &metrics, &ownership)?;
        let specs = routes();
        let started = (clock)().to_offset_date_time();
        let micro = Arc::new(Micro::new(
            &specs,
            store.subjects(),
            &config.api.queue_group,
            started,
            ownership.clone(),
        ));
        let auth = Auth::new(&config.auth)?;
        match auth.mode() {
            AuthMode::Open => tracing::warn!(
                "authentication is off (auth.mode = \"open\"): every caller is an operator and names itself with Switchyard-Principal; fine for one account on one machine, see deploy/ for the secure layout"
            ),
            AuthMode::Nats => tracing::info!(
                principals = config.auth.principals.len(),
                "callers are the users NATS authenticated (auth.mode = \"nats\")"
            ),
        }
        let context = Arc::new(ApiContext {
            client: client.clone(),
            auth,
            subjects: store.subjects().clone(),
            router: Router::new(&specs, &services, &metrics)?,
            micro: micro.clone(),
            metrics: metrics.clone(),
            config: config.api.clone(),
            ownership: ownership.clone(),
        });
        // Probes first, so `/readyz` says what the read models are doing while they rebuild.
        let probes = Probes {
            metrics,
            client: client.clone(),
            read_models: services.readiness(),
            informational: services.informational(),
            api_serving: Arc::new(AtomicBool::new(false)),
        };
        let (http, http_addr) =
            http::start(config.http.listen, probes.clone()).map_err(|source| AppError::Http {
                addr: config.http.listen,
                source,
            })?;
        // No request before every read model has caught up: a list would be a partial page
        // and a reservation would place from half a pod table. Until then the queue group
        // sends requests to replicas that are ready (or callers get "no responders").
        wait_caught_up(&services).await;
        // Then take a share of the shards: other replicas send this one their requests from
        // now on, so its own subjects are served first.
        let forwarded =
            crate::cluster::forward::Forwarded::start(context.clone(), services.endpoints())
                .await?;
        ownership.announce().await?;
        let api = ApiServer::start(context.clone()).await?;
        micro.serve(client.clone()).await?;
        let work_queue = WorkQueue::start(context, store.jetstream(), &config.store).await?;
        probes.api_serving.store(true, Ordering::Release);
        tracing::info!(http = %http_addr, stream = store.stream_name(), replica = ownership.replica(), shards = ?ownership.owned(), "control plane started");
        Ok(Self {
            client,
            store,
            services,
            probes,
            api,
            forwarded,
            ownership,
            work_queue,
            http,
            http_addr,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    pub fn ownership(&self) -> &crate::cluster::Ownership {
        &self.ownership
    }

    pub fn metrics(&self) -> &Metrics {
        &self.probes.metrics
    }

    /// Whether `/readyz` would answer 200.
    pub fn is_ready(&self) -> bool {
        self.probes.readiness().0
    }

    /// Stops taking requests, finishes those in flight, and closes the connection.
    pub async fn shutdown(self) {
        self.probes.api_serving.store(false, Ordering::Release);
        self.api.stop(GRACE).await;
        self.work_queue.stop(GRACE).await;
        // Hand the shards over at once (each after its appends in flight), then stop taking
        // forwarded requests: a request already forwarded here finds the shard moved and looks
        // again.
        self.ownership.stop().await;
        self.forwarded.stop().await;
        self.http.stop(true).await;
        self.services.shutdown(GRACE).await;
        // Drain: unsubscribe everything, flush, close; no reconnect noise after this.
        let _ = self.client.drain().await;
        tracing::info!("control plane stopped");
    }
}

/// Opens (creating or updating) the streams and buckets. Replicas starting together on a new
/// cluster race to create them, and a cluster electing leaders times requests out: such
/// failures are retried for a while, each logged.
async fn open_store(client: &Client, config: &Config) -> Result<EventStore, AppError> {
    let mut attempt = 1;
    loop {
        match EventStore::open(client.clone(), &config.store, config.nats.request_timeout).await {
            Ok(store) => return Ok(store),
            Err(err @ StoreError::Setup { .. }) if attempt < ATTEMPTS => {
                tracing::warn!(attempt, error = %crate::error_chain::error_chain(&err), "cannot set up the event store yet; retrying");
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Set-up attempts before giving up: about a minute in all.
const ATTEMPTS: u32 = 12;

async fn open_ownership(
    store: &EventStore,
    config: &Config,
    metrics: &Metrics,
) -> Result<crate::cluster::Ownership, AppError> {
    let mut attempt = 1;
    loop {
        let opened = crate::cluster::Ownership::open(
            store.jetstream(),
            &config.store,
            &config.cluster,
            metrics.clone(),
        )
        .await;
        match opened {
            Ok(ownership) => return Ok(ownership),
            Err(err @ crate::cluster::ClusterError::Bucket { .. }) if attempt < ATTEMPTS => {
                tracing::warn!(attempt, error = %crate::error_chain::error_chain(&err), "cannot open the shard bucket yet; retrying");
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// Waits until every read model has caught up with the log. One that stops instead (it met an
/// event this build cannot read) keeps the API closed; `/readyz` says why.
async fn wait_caught_up(services: &Services) {
    for (name, mut readiness) in services.readiness() {
        let mut reported = false;
        loop {
            let now = readiness.borrow_and_update().clone();
            match now {
                Readiness::CaughtUp => break,
                Readiness::Stopped(why) if !reported => {
                    tracing::error!(read_model = %name, reason = %why, "a read model stopped before it caught up; not serving the API");
                    reported = true;
                }
                _ => {}
            }
            if readiness.changed().await.is_err() {
                break;
            }
        }
    }
}

/// Connects with every option of `config`; retries for ever once connected.
pub async fn connect(config: &NatsConfig) -> Result<Client, AppError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(&config.name)
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("disconnected from NATS; reconnecting")
                }
                async_nats::Event::Draining | async_nats::Event::Closed => {
                    tracing::debug!(event = %event, "NATS connection closing")
                }
                other => tracing::info!(event = %other, "NATS connection event"),
            }
        });
    if config.retry_on_initial_connect {
        options = options.retry_on_initial_connect();
    }
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| AppError::Credentials {
                path: path.display().to_string(),
                source,
            })?;
    }
    if let Some(path) = &config.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|source| AppError::Credentials {
            path: path.display().to_string(),
            source,
        })?;
        options = options.nkey(seed.trim().to_owned());
    }
    // A user and password in the server URL (`nats://user:secret@host`) count as configured;
    // async-nats itself ignores them.
    let from_url = config
        .servers
        .first()
        .and_then(|url| url.parse::<async_nats::ServerAddr>().ok())
        .and_then(|addr| Some((addr.username()?.to_owned(), addr.password()?.to_owned())));
    let user = config
        .user
        .clone()
        .zip(config.password.clone())
        .or(from_url);
    if let Some((user, password)) = user {
        options = options.user_and_password(user, password);
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if config.tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let servers = config.servers.join(",");
    options
        .connect(config.servers.clone())
        .await
        .map_err(|source| AppError::Connect { servers, source })
}
