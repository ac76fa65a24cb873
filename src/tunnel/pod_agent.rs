//! `switchyard pod-agent`: a switch pod. It registers itself (with its SSH host key's
//! fingerprint), keeps itself alive, and runs the SSH server machines connect out to. A machine
//! logs in as its machine id with the key its meeting point names, and may ask for exactly one
//! remote forward: the port of its own meeting point on this pod. Clients connecting to that port
//! are relayed to the machine through its SSH connection.
//!
//! SIGTERM drains: the pod is removed (no new meeting points) and the agent exits once its
//! meeting points reach zero. SIGINT removes the pod and exits at once. Three keep-alives failed
//! in a row remove the pod and end the agent with an error.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use super::keys;
use crate::api::routes::{CommandReply, GetReply};
use crate::client::{ApiClient, ClientError};
use crate::domain::ErrorKind;
use crate::domain::switchboard::{
    MachineId, MeetingPointView, PodName, PodView, PortRange, millis,
};
use crate::runtime::error_chain;
use crate::switchboard::routes::{
    AddPod, KeepAlivePod, MachineRequest, PodMeetingPoints, PodRequest, RemovePod,
};

pub type Result<T, E = PodAgentError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum PodAgentError {
    #[error("loading the host key")]
    HostKey(#[from] keys::KeyError),
    #[error("cannot listen for machines on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("registering pod {pod}")]
    Register {
        pod: String,
        #[source]
        source: ClientError,
    },
    #[error("{failures} keep-alives of pod {pod} failed in a row; the pod was removed")]
    KeepAlive {
        pod: String,
        failures: u32,
        #[source]
        source: ClientError,
    },
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
}

#[derive(Clone, Debug)]
pub struct PodAgentConfig {
    pub name: PodName,
    /// Where the SSH server for machines listens.
    pub listen: SocketAddr,
    /// The `host:port` machines dial, published in the registration; the bound address when
    /// `None`.
    pub advertise: Option<String>,
    /// The address meeting-point ports listen on for clients.
    pub forward_bind: IpAddr,
    /// The host key file (OpenSSH format), created if missing; a key for this run when `None`.
    pub host_key: Option<PathBuf>,
    pub keepalive: Duration,
    pub ports: Option<PortRange>,
    /// Consecutive failed keep-alives before the agent gives up.
    pub max_keepalive_failures: u32,
    /// How often a draining pod counts its meeting points.
    pub drain_poll: Duration,
}

/// Runs the pod until a signal (or lost keep-alives) ends it.
pub async fn run(api: ApiClient, config: PodAgentConfig) -> Result<()> {
    let host_key = keys::load_or_create(config.host_key.as_deref())?;
    let fingerprint = keys::fingerprint(host_key.public_key());
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| PodAgentError::Listen {
                address: config.listen,
                source,
            })?;
    let bound = listener
        .local_addr()
        .map_err(|source| PodAgentError::Listen {
            address: config.listen,
            source,
        })?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());
    let pod = config.name.clone();
    let mut sigterm = signal(SignalKind::terminate()).map_err(PodAgentError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(PodAgentError::Signals)?;

    register(&api, &config, &advertise, &fingerprint).await?;
    tracing::info!(%pod, ssh = %bound, %advertise, %fingerprint, "pod registered; machines may connect");

    let shared = Arc::new(Shared {
        api: api.clone(),
        pod: pod.clone(),
        forward_bind: config.forward_bind,
        recheck: config.keepalive,
    });
    let server = tokio::spawn(serve(listener, server_config(host_key), shared));
    let _server = AbortOnDrop(server);

    let mut ticker = tokio::time::interval(config.keepalive);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is now: registering was the first keep-alive
    let mut failures = 0;
    let mut draining = false;
    let mut drain_poll = tokio::time::interval(config.drain_poll);
    loop {
        tokio::select! {
            _ = ticker.tick() => match keep_alive(&api, &config, &advertise, &fingerprint).await {
                Ok(()) => failures = 0,
                Err(source) => {
                    failures += 1;
                    tracing::warn!(%pod, failures, error = &source as &dyn std::error::Error, "keep-alive failed");
                    if failures >= config.max_keepalive_failures {
                        remove(&api, &pod).await;
                        return Err(PodAgentError::KeepAlive { pod: pod.to_string(), failures, source });
                    }
                }
            },
            _ = sigint.recv() => {
                tracing::info!(%pod, "interrupted: removing the pod and exiting now");
                remove(&api, &pod).await;
                return Ok(());
            }
            _ = sigterm.recv() => {
                if draining {
                    tracing::info!(%pod, "terminated again while draining: exiting now");
                    return Ok(());
                }
                tracing::info!(%pod, "terminated: draining; exiting once no meeting point is left");
                remove(&api, &pod).await;
                draining = true;
                drain_poll.reset_immediately();
            }
            _ = drain_poll.tick(), if draining => {
                match api.call::<_, GetReply<PodMeetingPoints>>("pod.count_meeting_points", &PodRequest { pod: pod.clone() }).await {
                    Ok(reply) if reply.result.meeting_points == 0 => {
                        tracing::info!(%pod, "drained: no meeting point left");
                        return Ok(());
                    }
                    Ok(reply) => tracing::info!(%pod, meeting_points = reply.result.meeting_points, "draining"),
                    Err(err) => tracing::warn!(%pod, error = &err as &dyn std::error::Error, "cannot count meeting points"),
                }
            }
        }
    }
}

fn add_pod(config: &PodAgentConfig, advertise: &str, fingerprint: &str) -> AddPod {
    AddPod {
        pod: config.name.clone(),
        keepalive_ms: Some(millis(config.keepalive)),
        ports: config.ports,
        ssh_address: Some(advertise.to_owned()),
        host_key_fingerprint: Some(fingerprint.to_owned()),
    }
}

/// Registers the pod. A pod still registered from an earlier run of this agent (a crash, a
/// restart) is taken over: the same registration is kept, another host key or address replaces
/// the old one (remove, then add: a draining pod may be added again).
async fn register(
    api: &ApiClient,
    config: &PodAgentConfig,
    advertise: &str,
    fingerprint: &str,
) -> Result<()> {
    let pod = &config.name;
    let failed = |source| PodAgentError::Register {
        pod: pod.to_string(),
        source,
    };
    let body = add_pod(config, advertise, fingerprint);
    match api
        .call::<_, CommandReply<serde_json::Value>>("pod.add", &body)
        .await
    {
        Ok(_) => return Ok(()),
        Err(err) if err.code() == Some(ErrorKind::AlreadyExists) => {}
        Err(err) => return Err(failed(err)),
    }
    let current: GetReply<PodView> = api
        .call("pod.get", &PodRequest { pod: pod.clone() })
        .await
        .map_err(failed)?;
    let same = current.result.ssh_address.as_deref() == Some(advertise)
        && current.result.host_key_fingerprint.as_deref() == Some(fingerprint);
    if same {
        tracing::info!(%pod, "the pod is still registered from an earlier run: keeping it");
        return Ok(());
    }
    tracing::warn!(
        %pod,
        old_address = ?current.result.ssh_address,
        old_fingerprint = ?current.result.host_key_fingerprint,
        "the pod is registered with another address or host key (an earlier run?): taking it over"
    );
    api.call::<_, CommandReply<serde_json::Value>>("pod.remove", &RemovePod { pod: pod.clone() })
        .await
        .map_err(failed)?;
    api.call::<_, CommandReply<serde_json::Value>>("pod.add", &body)
        .await
        .map_err(failed)?;
    Ok(())
}

/// One keep-alive. A pod that expired meanwhile (the agent was stopped, the network was down)
/// registers again rather than counting failures forever.
async fn keep_alive(
    api: &ApiClient,
    config: &PodAgentConfig,
    advertise: &str,
    fingerprint: &str,
) -> std::result::Result<(), ClientError> {
    let body = KeepAlivePod {
        pod: config.name.clone(),
    };
    match api
        .call::<_, CommandReply<serde_json::Value>>("pod.keep_alive", &body)
        .await
    {
        Err(err) if err.code() == Some(ErrorKind::NotFound) => {
            tracing::warn!(pod = %config.name, "the pod expired: registering again");
            api.call::<_, CommandReply<serde_json::Value>>(
                "pod.add",
                &add_pod(config, advertise, fingerprint),
            )
            .await
            .map(drop)
        }
        other => other.map(drop),
    }
}

/// Best effort: the pod expires anyway if this fails.
async fn remove(api: &ApiClient, pod: &PodName) {
    let body = RemovePod { pod: pod.clone() };
    if let Err(err) = api
        .call::<_, CommandReply<serde_json::Value>>("pod.remove", &body)
        .await
    {
        tracing::warn!(%pod, error = &err as &dyn std::error::Error, "cannot remove the pod; it will expire");
    }
}

fn server_config(host_key: PrivateKey) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        // Tunnels idle for hours; liveness comes from SSH keep-alives, not traffic.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    })
}

/// What every machine connection shares.
struct Shared {
    api: ApiClient,
    pod: PodName,
    forward_bind: IpAddr,
    /// How often an open forward checks that its meeting point is still this one.
    recheck: Duration,
}

async fn serve(listener: TcpListener, config: Arc<russh::server::Config>, shared: Arc<Shared>) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(
                    error = &err as &dyn std::error::Error,
                    "accepting a machine connection failed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let handler = MachineConnection {
            shared: shared.clone(),
            peer,
            machine: None,
            forwards: HashMap::new(),
        };
        let config = config.clone();
        tokio::spawn(async move {
            match russh::server::run_stream(config, socket, handler).await {
                Ok(session) => {
                    if let Err(err) = session.await {
                        tracing::debug!(%peer, error = &err as &dyn std::error::Error, "machine connection ended");
                    }
                }
                Err(err) => {
                    tracing::debug!(%peer, error = &err as &dyn std::error::Error, "SSH handshake failed");
                }
            }
        });
    }
}

/// One machine's SSH connection.
struct MachineConnection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// Set once the machine has authenticated.
    machine: Option<(MachineId, PublicKey)>,
    /// The listener of each forwarded port; aborted when the connection ends.
    forwards: HashMap<u32, AbortOnDrop>,
}

/// Why a machine may not log in or forward a port.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{user:?} is not a machine id")]
    BadUser { user: String },
    #[error("machine {machine} has no meeting point")]
    NoMeetingPoint { machine: String },
    #[error("the meeting point of machine {machine} is on pod {pod}")]
    OtherPod { machine: String, pod: String },
    #[error("the meeting point of machine {machine} names another key (or none)")]
    OtherKey { machine: String },
    #[error("the meeting point of machine {machine} is port {port}, not {asked}")]
    OtherPort {
        machine: String,
        port: u16,
        asked: u32,
    },
    #[error("cannot read the meeting point of machine {machine}")]
    Lookup {
        machine: String,
        #[source]
        source: ClientError,
    },
}

/// The machine's meeting point, if it stands on this pod and names `key`.
async fn authorize(
    shared: &Shared,
    machine: &MachineId,
    key: &PublicKey,
) -> Result<MeetingPointView, Refusal> {
    let body = MachineRequest {
        machine: machine.clone(),
    };
    let view = match shared
        .api
        .call::<_, GetReply<MeetingPointView>>("meeting_point.get", &body)
        .await
    {
        Ok(reply) => reply.result,
        Err(err) if err.code() == Some(ErrorKind::NotFound) => {
            return Err(Refusal::NoMeetingPoint {
                machine: machine.to_string(),
            });
        }
        Err(source) => {
            return Err(Refusal::Lookup {
                machine: machine.to_string(),
                source,
            });
        }
    };
    if view.pod != shared.pod {
        return Err(Refusal::OtherPod {
            machine: machine.to_string(),
            pod: view.pod.to_string(),
        });
    }
    let recorded = view
        .public_key
        .as_ref()
        .and_then(|recorded| keys::parse_public(recorded.as_str()).ok());
    if !recorded.is_some_and(|recorded| keys::same_key(&recorded, key)) {
        return Err(Refusal::OtherKey {
            machine: machine.to_string(),
        });
    }
    Ok(view)
}

impl MachineConnection {
    async fn check_login(&self, user: &str, key: &PublicKey) -> Result<MachineId, Refusal> {
        let machine = MachineId::new(user).map_err(|_| Refusal::BadUser {
            user: user.to_owned(),
        })?;
        authorize(&self.shared, &machine, key).await?;
        Ok(machine)
    }

    fn refuse(&self, what: &str, refusal: &Refusal) {
        tracing::info!(pod = %self.shared.pod, peer = %self.peer, error = refusal as &dyn std::error::Error, "refused {what}");
    }
}

impl russh::server::Handler for MachineConnection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Spares the machine a signature for a key that would be refused anyway.
        Ok(match self.check_login(user, offer.public_key).await {
            Ok(_) => Auth::Accept,
            Err(_) => Auth::reject(),
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.check_login(user, key.public_key).await {
            Ok(machine) => {
                tracing::info!(pod = %self.shared.pod, peer = %self.peer, %machine, "machine logged in");
                self.machine = Some((machine, key.public_key.clone()));
                Ok(Auth::Accept)
            }
            Err(refusal) => {
                self.refuse("a login", &refusal);
                Ok(Auth::reject())
            }
        }
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some((machine, key)) = self.machine.clone() else {
            return Ok(false);
        };
        // The meeting point now, not as it was at login: it may have moved since.
        let view = match authorize(&self.shared, &machine, &key).await {
            Ok(view) if u32::from(view.port) == *port => view,
            Ok(view) => {
                self.refuse(
                    "a port forward",
                    &Refusal::OtherPort {
                        machine: machine.to_string(),
                        port: view.port,
                        asked: *port,
                    },
                );
                return Ok(false);
            }
            Err(refusal) => {
                self.refuse("a port forward", &refusal);
                return Ok(false);
            }
        };
        let bind = SocketAddr::new(self.shared.forward_bind, view.port);
        let listener = match TcpListener::bind(bind).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(pod = %self.shared.pod, %machine, %bind, error = &err as &dyn std::error::Error, "cannot listen on the meeting point's port");
                return Ok(false);
            }
        };
        tracing::info!(pod = %self.shared.pod, %machine, %bind, "forwarding the meeting point's port to the machine");
        let forward = Forward {
            shared: self.shared.clone(),
            machine,
            key,
            address: address.to_owned(),
            port: view.port,
            session: session.handle(),
        };
        self.forwards
            .insert(*port, AbortOnDrop(tokio::spawn(forward.run(listener))));
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.forwards.remove(&port).is_some())
    }
}

/// One forwarded port: accepts clients and relays each through a `forwarded-tcpip` channel,
/// while checking that the meeting point is still this one.
struct Forward {
    shared: Arc<Shared>,
    machine: MachineId,
    key: PublicKey,
    address: String,
    port: u16,
    session: russh::server::Handle,
}

impl Forward {
    async fn run(self, listener: TcpListener) {
        let mut recheck = tokio::time::interval(self.shared.recheck);
        recheck.tick().await;
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => self.relay(socket, peer),
                    Err(err) => tracing::warn!(error = &err as &dyn std::error::Error, "accepting a client failed"),
                },
                _ = recheck.tick() => {
                    // Level-triggered: whatever happened (cleared, expired, moved, replaced by
                    // a new reservation), a forward whose meeting point is gone ends.
                    match authorize(&self.shared, &self.machine, &self.key).await {
                        Ok(view) if view.port == self.port => {}
                        Err(Refusal::Lookup { .. }) => {}
                        Ok(_) | Err(_) => {
                            tracing::info!(pod = %self.shared.pod, machine = %self.machine, port = self.port, "the meeting point is gone: closing the machine's connection");
                            let _ = self
                                .session
                                .disconnect(
                                    russh::Disconnect::ByApplication,
                                    "the meeting point is gone".to_owned(),
                                    String::new(),
                                )
                                .await;
                            return;
                        }
                    }
                }
            }
        }
    }

    fn relay(&self, mut socket: TcpStream, peer: SocketAddr) {
        let session = self.session.clone();
        let address = self.address.clone();
        let port = self.port;
        let machine = self.machine.clone();
        tokio::spawn(async move {
            let _ = socket.set_nodelay(true);
            let channel: Channel<Msg> = match session
                .channel_open_forwarded_tcpip(
                    address,
                    u32::from(port),
                    peer.ip().to_string(),
                    u32::from(peer.port()),
                )
                .await
            {
                Ok(channel) => channel,
                Err(err) => {
                    tracing::info!(%machine, %peer, error = %error_chain(&err), "the machine refused a client");
                    return;
                }
            };
            let mut stream = channel.into_stream();
            match tokio::io::copy_bidirectional(&mut socket, &mut stream).await {
                Ok((up, down)) => {
                    tracing::debug!(%machine, %peer, up, down, "client connection ended")
                }
                Err(err) => {
                    tracing::debug!(%machine, %peer, error = &err as &dyn std::error::Error, "client connection failed")
                }
            }
        });
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
