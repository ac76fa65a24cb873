//! `switchyard machine-agent`: makes one test machine reachable. It reserves a meeting point
//! (naming its SSH key), connects to that pod's SSH server (verifying the host key against the
//! fingerprint the pod published), asks for the remote forward of its meeting point's port, and
//! relays every client that arrives there to the machine's own sshd. It keeps the meeting point
//! alive, moves to another pod when its pod stops being valid and no client is connected, starts
//! over when the connection or the meeting point is lost, and clears the meeting point on exit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use russh::client::{ChannelOpenHandle, Msg, Session};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::TcpStream;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Notify;

use super::keys;
use crate::api::routes::{CommandReply, GetReply};
use crate::client::{ApiClient, ClientError};
use crate::domain::ErrorKind;
use crate::domain::switchboard::{
    LeaseId, MachineId, MeetingPointView, PodName, PodView, Username, millis,
};
use crate::runtime::new_command_id;
use crate::switchboard::protocol::{
    ClearReply, MeetingPointRequest, PodRequest, PodValidity, ReserveMeetingPoint,
};

pub type Result<T, E = MachineAgentError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum MachineAgentError {
    #[error("loading the machine's key")]
    Key(#[from] keys::KeyError),
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("--keepalive")]
    Period(#[source] crate::domain::switchboard::KeepAliveError),
    // Why one connection to a pod ended, or never started; the agent starts over.
    #[error("the control plane refused the reservation")]
    Reserve(#[source] ClientError),
    #[error("cannot read pod {pod}")]
    Pod {
        pod: String,
        #[source]
        source: ClientError,
    },
    #[error("pod {pod} publishes no {what}; it cannot be reached safely")]
    Unpublished { pod: String, what: &'static str },
    #[error("cannot connect to pod {pod} at {address}")]
    Connect {
        pod: String,
        address: String,
        #[source]
        source: Box<russh::Error>,
    },
    #[error("pod {pod} refused the machine's key")]
    Refused { pod: String },
    #[error("pod {pod} refused to forward port {port}")]
    Forward {
        pod: String,
        port: u16,
        #[source]
        source: Box<russh::Error>,
    },
    #[error("the SSH connection to pod {pod} closed")]
    Closed { pod: String },
    #[error("the meeting point is gone (cleared, expired or replaced)")]
    MeetingPointGone,
}

#[derive(Clone, Debug)]
pub struct MachineAgentConfig {
    pub machine: MachineId,
    pub username: Username,
    /// The machine's sshd, which clients reach through the meeting point.
    pub target: String,
    /// The machine's key file (OpenSSH format), created if missing; a key for this run when
    /// `None` (the meeting point names it, so a new key per run is as good as a kept one).
    pub key: Option<PathBuf>,
    pub keepalive: Duration,
    /// The first wait after a failure; doubled up to `max_retry_delay`.
    pub retry_delay: Duration,
    pub max_retry_delay: Duration,
}

/// How one connection ended.
enum Ending {
    /// Its pod stopped being valid while no client was connected: reserve elsewhere.
    Move,
    Lost(MachineAgentError),
    /// Retrying cannot help (the control plane called the reservation invalid).
    Fatal(MachineAgentError),
    Shutdown,
}

/// The shortest wait between attempts: a zero one would spin.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(10);
/// Connecting, logging in and asking for the forward together take at most this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).map_err(MachineAgentError::Signals)?,
            terminate: signal(SignalKind::terminate()).map_err(MachineAgentError::Signals)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Runs until SIGINT or SIGTERM, then clears the meeting point.
pub async fn run(api: ApiClient, mut config: MachineAgentConfig) -> Result<()> {
    crate::domain::switchboard::keepalive(Some(millis(config.keepalive)), config.keepalive)
        .map_err(MachineAgentError::Period)?;
    config.retry_delay = config.retry_delay.max(MIN_RETRY_DELAY);
    config.max_retry_delay = config.max_retry_delay.max(config.retry_delay);
    let key = Arc::new(keys::load_or_create(config.key.as_deref())?);
    let public_key = keys::canonical(key.public_key())?;
    let mut signals = Signals::install()?;
    let agent = Agent {
        api,
        config,
        key,
        public_key,
        reservation: Mutex::new(None),
    };
    let mut delay = agent.config.retry_delay;
    loop {
        let ending = tokio::select! {
            ending = agent.once() => ending,
            () = signals.recv() => Ending::Shutdown,
        };
        match ending {
            Ending::Shutdown => {
                agent.clear_last().await;
                tracing::info!(machine = %agent.config.machine, "stopped; meeting point cleared");
                return Ok(());
            }
            Ending::Fatal(err) => {
                agent.clear_last().await;
                return Err(err);
            }
            Ending::Move => {
                delay = agent.config.retry_delay;
                continue;
            }
            Ending::Lost(lost) => {
                tracing::warn!(machine = %agent.config.machine, error = &lost as &dyn std::error::Error, retry_in = ?delay, "not reachable; starting over");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = signals.recv() => {
                agent.clear_last().await;
                return Ok(());
            }
        }
        delay = (delay * 2).min(agent.config.max_retry_delay);
    }
}

struct Agent {
    api: ApiClient,
    config: MachineAgentConfig,
    key: Arc<PrivateKey>,
    public_key: String,
    /// The command id of the latest reservation, which is also its lease id: known before
    /// the reply, so a shutdown clears it even if the reply never came.
    reservation: Mutex<Option<LeaseId>>,
}

/// The meeting point this agent holds, cleared when the connection ends.
struct Held<'a> {
    agent: &'a Agent,
    view: MeetingPointView,
}

impl Agent {
    /// One reservation and one connection, until it ends.
    async fn once(&self) -> Ending {
        let view = match self.reserve().await {
            Ok(view) => view,
            Err(err) if matches!(&err, MachineAgentError::Reserve(source) if source.code() == Some(ErrorKind::Invalid)) =>
            {
                return Ending::Fatal(err);
            }
            Err(lost) => return Ending::Lost(lost),
        };
        let held = Held { agent: self, view };
        let ending = held.connect_and_serve().await;
        if !matches!(ending, Ending::Lost(MachineAgentError::MeetingPointGone)) {
            held.clear().await;
        }
        ending
    }

    async fn reserve(&self) -> Result<MeetingPointView> {
        let body = ReserveMeetingPoint {
            machine: self.config.machine.clone(),
            username: self.config.username.clone(),
            keepalive_ms: Some(millis(self.config.keepalive)),
            public_key: Some(self.public_key.clone()),
        };
        // One command id for every retry of this reservation: a retry finishes it, never
        // takes a second port.
        let command_id = new_command_id();
        *self
            .reservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(command_id.clone());
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .api
                .call_with_id::<_, CommandReply<MeetingPointView>>(
                    "meeting_point.reserve",
                    &body,
                    Some(command_id.as_str()),
                )
                .await
            {
                Ok(reply) => return Ok(reply.result),
                Err(err) if err.is_transient() && attempt < 3 => {
                    tokio::time::sleep(self.config.retry_delay).await;
                }
                Err(err) => return Err(MachineAgentError::Reserve(err)),
            }
        }
    }

    /// On shutdown: the latest reservation's meeting point, if it is still the machine's.
    async fn clear_last(&self) {
        let lease = self
            .reservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(lease) = lease else { return };
        let body = MeetingPointRequest {
            machine: self.config.machine.clone(),
            pod: None,
            port: None,
            lease: Some(lease),
        };
        if let Err(err) = self
            .api
            .call::<_, CommandReply<ClearReply>>("meeting_point.clear", &body)
            .await
        {
            tracing::warn!(machine = %self.config.machine, error = &err as &dyn std::error::Error, "cannot clear the meeting point; it will expire");
        }
    }
}

impl Held<'_> {
    fn machine(&self) -> &MachineId {
        &self.agent.config.machine
    }

    fn lease(&self) -> LeaseId {
        self.view.lease.clone()
    }

    async fn connect_and_serve(&self) -> Ending {
        let pod = self.view.pod.clone();
        let port = self.view.port;
        let pod_view = match self
            .agent
            .api
            .call::<_, GetReply<PodView>>("pod.get", &PodRequest { pod: pod.clone() })
            .await
        {
            Ok(reply) => reply.result,
            Err(source) => {
                return Ending::Lost(MachineAgentError::Pod {
                    pod: pod.to_string(),
                    source,
                });
            }
        };
        let unpublished = |what| {
            Ending::Lost(MachineAgentError::Unpublished {
                pod: pod.to_string(),
                what,
            })
        };
        let Some(address) = pod_view.ssh_address else {
            return unpublished("SSH address");
        };
        let Some(fingerprint) = pod_view.host_key_fingerprint else {
            return unpublished("host key fingerprint");
        };

        let closed = Arc::new(Notify::new());
        let active = Arc::new(AtomicUsize::new(0));
        let handler = PodConnection {
            pod: pod.clone(),
            fingerprint,
            port,
            target: self.agent.config.target.clone(),
            active: active.clone(),
            closed: closed.clone(),
        };
        let session =
            match tokio::time::timeout(CONNECT_TIMEOUT, self.open(handler, &pod, &address, port))
                .await
            {
                Ok(Ok(session)) => session,
                Ok(Err(lost)) => return Ending::Lost(lost),
                Err(_) => {
                    return Ending::Lost(MachineAgentError::Connect {
                        pod: pod.to_string(),
                        address,
                        source: Box::new(russh::Error::ConnectionTimeout),
                    });
                }
            };
        tracing::info!(
            machine = %self.machine(),
            %pod,
            port,
            user = %self.view.username,
            "reachable: clients connect to port {port} of pod {pod}"
        );

        let ending = self.watch(&pod, &closed, &active).await;
        let _ = session
            .disconnect(
                russh::Disconnect::ByApplication,
                "machine-agent leaving",
                "",
            )
            .await;
        ending
    }

    /// Connects to the pod, logs in and asks for the forward of the meeting point's port.
    async fn open(
        &self,
        handler: PodConnection,
        pod: &PodName,
        address: &str,
        port: u16,
    ) -> Result<russh::client::Handle<PodConnection>> {
        let config = Arc::new(russh::client::Config {
            // Tunnels idle for hours; liveness comes from SSH keep-alives, not traffic.
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let connect_error = |source| MachineAgentError::Connect {
            pod: pod.to_string(),
            address: address.to_owned(),
            source: Box::new(source),
        };
        let mut session = russh::client::connect(config, address, handler)
            .await
            .map_err(connect_error)?;
        let key = PrivateKeyWithHashAlg::new(self.agent.key.clone(), None);
        let login = session
            .authenticate_publickey(self.machine().as_str(), key)
            .await
            .map_err(connect_error)?;
        if !login.success() {
            return Err(MachineAgentError::Refused {
                pod: pod.to_string(),
            });
        }
        session
            .tcpip_forward("localhost", u32::from(port))
            .await
            .map_err(|source| MachineAgentError::Forward {
                pod: pod.to_string(),
                port,
                source: Box::new(source),
            })?;
        Ok(session)
    }

    /// Keeps the meeting point alive until the connection, the meeting point or the pod's
    /// validity is lost.
    async fn watch(&self, pod: &PodName, closed: &Notify, active: &AtomicUsize) -> Ending {
        let mut ticker = tokio::time::interval(self.agent.config.keepalive);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = closed.notified() => {
                    return Ending::Lost(MachineAgentError::Closed { pod: pod.to_string() });
                }
                _ = ticker.tick() => {}
            }
            let body = MeetingPointRequest {
                machine: self.machine().clone(),
                pod: None,
                port: None,
                lease: Some(self.lease()),
            };
            match self
                .agent
                .api
                .call::<_, CommandReply<serde_json::Value>>("meeting_point.keep_alive", &body)
                .await
            {
                Ok(_) => {}
                Err(err) if err.code() == Some(ErrorKind::NotFound) => {
                    return Ending::Lost(MachineAgentError::MeetingPointGone);
                }
                Err(err) => {
                    // The meeting point lives two periods: the next tick may still save it.
                    tracing::warn!(machine = %self.machine(), error = &err as &dyn std::error::Error, "keep-alive failed");
                    continue;
                }
            }
            let valid = self
                .agent
                .api
                .call::<_, GetReply<PodValidity>>("pod.is_valid", &PodRequest { pod: pod.clone() })
                .await
                .map(|reply| reply.result.valid);
            let clients = active.load(Ordering::Relaxed);
            match valid {
                Ok(false) if clients == 0 => {
                    tracing::info!(machine = %self.machine(), %pod, "the pod is no longer valid and no client is connected: moving");
                    return Ending::Move;
                }
                Ok(false) => {
                    tracing::info!(machine = %self.machine(), %pod, clients, "the pod is no longer valid: moving once no client is connected");
                }
                Ok(true) | Err(_) => {}
            }
        }
    }

    async fn clear(&self) {
        let body = MeetingPointRequest {
            machine: self.machine().clone(),
            pod: None,
            port: None,
            lease: Some(self.lease()),
        };
        if let Err(err) = self
            .agent
            .api
            .call::<_, CommandReply<ClearReply>>("meeting_point.clear", &body)
            .await
        {
            tracing::warn!(machine = %self.machine(), error = &err as &dyn std::error::Error, "cannot clear the meeting point; it will expire");
        }
    }
}

/// The SSH client side of the connection to a pod.
struct PodConnection {
    pod: PodName,
    fingerprint: String,
    port: u16,
    target: String,
    /// Client connections relayed right now.
    active: Arc<AtomicUsize>,
    closed: Arc<Notify>,
}

impl russh::client::Handler for PodConnection {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_key else {
            tracing::warn!(pod = %self.pod, "the pod offered a certificate, not its published host key");
            return Ok(false);
        };
        let offered = keys::fingerprint(key);
        if offered == self.fingerprint {
            Ok(true)
        } else {
            tracing::error!(pod = %self.pod, published = %self.fingerprint, %offered, "the pod's host key does not match its published fingerprint: not connecting");
            Ok(false)
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> std::result::Result<(), Self::Error> {
        if connected_port != u32::from(self.port) {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        // Connecting to the sshd happens off the session's loop, so a slow sshd holds up
        // only this client, not the keep-alives and the other channels.
        let target = self.target.clone();
        let client = format!("{originator_address}:{originator_port}");
        let active = self.active.clone();
        tokio::spawn(async move {
            let mut target = match TcpStream::connect(&target).await {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::warn!(%target, error = &err as &dyn std::error::Error, "cannot reach the machine's sshd");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    return;
                }
            };
            let _ = target.set_nodelay(true);
            reply.accept().await;
            active.fetch_add(1, Ordering::Relaxed);
            let mut stream = channel.into_stream();
            match tokio::io::copy_bidirectional(&mut stream, &mut target).await {
                Ok((down, up)) => tracing::debug!(%client, up, down, "client connection ended"),
                Err(err) => {
                    tracing::debug!(%client, error = &err as &dyn std::error::Error, "client connection failed")
                }
            }
            active.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: russh::client::DisconnectReason<Self::Error>,
    ) -> std::result::Result<(), Self::Error> {
        tracing::debug!(pod = %self.pod, ?reason, "disconnected");
        self.closed.notify_one();
        Ok(())
    }
}
