//! `switchyard pod-agent`: a switch pod's life. It registers the pod (with its SSH host key's
//! fingerprint), keeps it alive, and runs the SSH server machines connect out to
//! ([`pod_server`](super::pod_server)).
//!
//! SIGTERM drains: the pod is removed (no new meeting points) and the agent exits once its
//! meeting points reach zero. SIGINT removes the pod and exits at once. Three keep-alives failed
//! in a row remove the pod and end the agent with an error.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use super::{keys, pod_server};
use crate::api::routes::{CommandReply, GetReply};
use crate::client::{ApiClient, ClientError};
use crate::domain::ErrorKind;
use crate::domain::switchboard::{PodName, PodView, PortRange, millis};
use crate::switchboard::protocol::{AddPod, KeepAlivePod, PodMeetingPoints, PodRequest, RemovePod};

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
    #[error("--keepalive")]
    Period(#[source] crate::domain::switchboard::KeepAliveError),
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
    /// How often an open forward checks that its meeting point still stands.
    pub recheck: Duration,
    /// Machine connections at once.
    pub max_connections: usize,
}

/// The shortest poll or recheck period: a zero one would spin.
const MIN_PERIOD: Duration = Duration::from_millis(10);

/// What one keep-alive found.
enum Alive {
    Yes,
    /// The pod is gone: while draining, that is the end.
    Gone,
}

/// Runs the pod until a signal (or lost keep-alives) ends it.
pub async fn run(api: ApiClient, config: PodAgentConfig) -> Result<()> {
    crate::domain::switchboard::keepalive(Some(millis(config.keepalive)), config.keepalive)
        .map_err(PodAgentError::Period)?;
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
        .unwrap_or_else(|| default_advertise(bound));
    let pod = config.name.clone();
    let mut sigterm = signal(SignalKind::terminate()).map_err(PodAgentError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(PodAgentError::Signals)?;

    register(&api, &config, &advertise, &fingerprint).await?;
    tracing::info!(%pod, ssh = %bound, %advertise, %fingerprint, "pod registered; machines may connect");

    let shared = Arc::new(pod_server::Shared::new(
        api.clone(),
        pod.clone(),
        config.forward_bind,
        config.recheck.max(MIN_PERIOD),
        config.max_connections,
    ));
    let server = tokio::spawn(pod_server::serve(
        listener,
        pod_server::config(host_key),
        shared,
    ));
    let _server = pod_server::AbortOnDrop(server);

    let mut ticker = tokio::time::interval(config.keepalive);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is now: registering was the first keep-alive
    let mut failures = 0;
    let mut draining = false;
    let mut drain_poll = tokio::time::interval(config.drain_poll.max(MIN_PERIOD));
    loop {
        tokio::select! {
            _ = ticker.tick() => match keep_alive(&api, &config, &advertise, &fingerprint, draining).await {
                Ok(Alive::Yes) => failures = 0,
                Ok(Alive::Gone) => {
                    tracing::info!(%pod, "drained: the pod is gone");
                    return Ok(());
                }
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

/// The bound address, or this host's name with the bound port when listening on all
/// interfaces (where `0.0.0.0` would mean nothing to a machine).
fn default_advertise(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    match nix::unistd::gethostname() {
        Ok(name) if !name.is_empty() => format!("{}:{}", name.to_string_lossy(), bound.port()),
        _ => bound.to_string(),
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
/// registers again rather than counting failures forever, unless it is draining: then gone is
/// what it was waiting for.
async fn keep_alive(
    api: &ApiClient,
    config: &PodAgentConfig,
    advertise: &str,
    fingerprint: &str,
    draining: bool,
) -> std::result::Result<Alive, ClientError> {
    let body = KeepAlivePod {
        pod: config.name.clone(),
    };
    match api
        .call::<_, CommandReply<serde_json::Value>>("pod.keep_alive", &body)
        .await
    {
        Err(err) if err.code() == Some(ErrorKind::NotFound) && draining => Ok(Alive::Gone),
        Err(err) if err.code() == Some(ErrorKind::NotFound) => {
            tracing::warn!(pod = %config.name, "the pod expired: registering again");
            api.call::<_, CommandReply<serde_json::Value>>(
                "pod.add",
                &add_pod(config, advertise, fingerprint),
            )
            .await
            .map(|_| Alive::Yes)
        }
        other => other.map(|_| Alive::Yes),
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
