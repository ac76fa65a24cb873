//! The pod's SSH server for machines. A machine logs in as its machine id, by public key, and
//! only with the key its meeting point names; it may forward exactly one port, its meeting
//! point's on this pod. Each client on that port becomes a `forwarded-tcpip` channel to the
//! machine. Every decision reads the meeting point as it is now, and an open forward re-reads
//! it every keep-alive period and ends when it is gone, whatever removed it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::keys;
use crate::api::routes::GetReply;
use crate::client::{ApiClient, ClientError};
use crate::domain::ErrorKind;
use crate::domain::switchboard::{LeaseId, MachineId, MeetingPointView, PodName};
use crate::runtime::error_chain;
use crate::switchboard::protocol::MachineRequest;

pub fn config(host_key: PrivateKey) -> Arc<russh::server::Config> {
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

/// How long a connection may take to log in; then it is closed, so idle strangers cannot hold
/// the pod's sockets.
pub const LOGIN_GRACE: Duration = Duration::from_secs(30);

/// Lookups of meeting points for logins, per second and in a burst: from one peer address, and
/// from all of them together. Strangers offering key after key, or connection after
/// connection, cost the control plane no more than this; one peer cannot use up the others'
/// share.
const LOGIN_LOOKUPS_PER_PEER: Bucket = Bucket {
    per_second: 2.0,
    burst: 10.0,
};
const LOGIN_LOOKUPS: Bucket = Bucket {
    per_second: 20.0,
    burst: 50.0,
};
/// Machine ids one connection may try to log in as.
const USERS_PER_CONNECTION: usize = 2;
/// Peers whose budget is remembered at once; beyond it the oldest are forgotten (each starts
/// again with a full burst, which the shared budget still bounds).
const PEERS_KEPT: usize = 4096;

#[derive(Clone, Copy)]
struct Bucket {
    per_second: f64,
    burst: f64,
}

/// A token bucket's level and when it was last filled.
#[derive(Clone, Copy)]
struct Tokens {
    left: f64,
    at: std::time::Instant,
}

impl Tokens {
    fn full(bucket: Bucket, now: std::time::Instant) -> Self {
        Self {
            left: bucket.burst,
            at: now,
        }
    }

    fn refill(&mut self, bucket: Bucket, now: std::time::Instant) {
        let earned = now.duration_since(self.at).as_secs_f64() * bucket.per_second;
        self.left = (self.left + earned).min(bucket.burst);
        self.at = now;
    }
}

/// How many login lookups the pod may still make, per peer and in all.
struct LoginBudget {
    state: Mutex<(Tokens, HashMap<IpAddr, Tokens>)>,
}

impl LoginBudget {
    fn new() -> Self {
        let now = std::time::Instant::now();
        Self {
            state: Mutex::new((Tokens::full(LOGIN_LOOKUPS, now), HashMap::new())),
        }
    }

    /// Takes one lookup from `peer`'s budget and the shared one, if both have it.
    fn take(&self, peer: IpAddr) -> bool {
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (all, peers) = &mut *state;
        if !peers.contains_key(&peer) && peers.len() >= PEERS_KEPT {
            peers.retain(|_, tokens| tokens.left < LOGIN_LOOKUPS_PER_PEER.burst);
            if peers.len() >= PEERS_KEPT {
                peers.clear();
            }
        }
        let mine = peers
            .entry(peer)
            .or_insert_with(|| Tokens::full(LOGIN_LOOKUPS_PER_PEER, now));
        mine.refill(LOGIN_LOOKUPS_PER_PEER, now);
        all.refill(LOGIN_LOOKUPS, now);
        if mine.left < 1.0 || all.left < 1.0 {
            return false;
        }
        mine.left -= 1.0;
        all.left -= 1.0;
        true
    }
}

/// What every machine connection shares.
pub struct Shared {
    api: ApiClient,
    pod: PodName,
    forward_bind: IpAddr,
    /// How often an open forward checks that its meeting point is still this one.
    recheck: Duration,
    login_grace: Duration,
    /// Connections at once; beyond it the pod stops accepting until one ends.
    connections: Arc<Semaphore>,
    next_connection: AtomicU64,
    /// The forward holding each port. A port has one meeting point, so a newly authorized
    /// forward takes the port from whatever stale session still holds it.
    forwards: Mutex<HashMap<u16, Held>>,
    logins: LoginBudget,
}

struct Held {
    connection: u64,
    lease: LeaseId,
    task: JoinHandle<()>,
    session: russh::server::Handle,
}

impl Shared {
    pub fn new(
        api: ApiClient,
        pod: PodName,
        forward_bind: IpAddr,
        recheck: Duration,
        max_connections: usize,
    ) -> Self {
        Self {
            api,
            pod,
            forward_bind,
            recheck,
            login_grace: LOGIN_GRACE,
            connections: Arc::new(Semaphore::new(max_connections.max(1))),
            next_connection: AtomicU64::new(1),
            forwards: Mutex::new(HashMap::new()),
            logins: LoginBudget::new(),
        }
    }

    fn forwards(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Held>> {
        // The map stays consistent across a panic elsewhere: every change is one call.
        self.forwards.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Accepts machine connections until the task is aborted.
pub async fn serve(listener: TcpListener, config: Arc<russh::server::Config>, shared: Arc<Shared>) {
    loop {
        let Ok(permit) = shared.connections.clone().acquire_owned().await else {
            return;
        };
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
        let authenticated = Arc::new(AtomicBool::new(false));
        let handler = MachineConnection {
            shared: shared.clone(),
            id: shared.next_connection.fetch_add(1, Ordering::Relaxed),
            peer,
            machine: None,
            login: None,
            users_tried: 0,
            authenticated: authenticated.clone(),
        };
        let config = config.clone();
        let grace = shared.login_grace;
        tokio::spawn(async move {
            let _permit = permit;
            let session = match tokio::time::timeout(
                grace,
                russh::server::run_stream(config, socket, handler),
            )
            .await
            {
                Ok(Ok(session)) => session,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = &err as &dyn std::error::Error, "SSH handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no SSH handshake within the login grace");
                    return;
                }
            };
            let handle = session.handle();
            tokio::pin!(session);
            let ended = tokio::select! {
                ended = &mut session => Some(ended),
                () = tokio::time::sleep(grace) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    if !authenticated.load(Ordering::Relaxed) {
                        tracing::info!(%peer, "no login within the login grace: closing");
                        close(&handle, "no login within the login grace").await;
                    }
                    session.await
                }
            };
            if let Err(err) = ended {
                tracing::debug!(%peer, error = &err as &dyn std::error::Error, "machine connection ended");
            }
        });
    }
}

/// One machine's SSH connection.
struct MachineConnection {
    shared: Arc<Shared>,
    id: u64,
    peer: SocketAddr,
    /// Set once the machine has authenticated.
    machine: Option<(MachineId, PublicKey)>,
    /// The meeting point this connection's login was checked against: every key it offers,
    /// and its signature, are checked against this one answer.
    login: Option<(MachineId, Option<MeetingPointView>)>,
    /// Machine ids it has tried to log in as.
    users_tried: usize,
    authenticated: Arc<AtomicBool>,
}

impl Drop for MachineConnection {
    /// The connection's forwards end with it.
    fn drop(&mut self) {
        self.shared.forwards().retain(|_, held| {
            let mine = held.connection == self.id;
            if mine {
                held.task.abort();
            }
            !mine
        });
    }
}

/// Why a machine may not log in or forward a port.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
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
    #[error("too many logins are being checked; machine {machine} is refused for now")]
    Throttled { machine: String },
    #[error("this connection already tried {USERS_PER_CONNECTION} machine ids")]
    TooManyUsers,
    #[error("cannot read the meeting point of machine {machine}")]
    Lookup {
        machine: String,
        #[source]
        source: ClientError,
    },
}

/// The machine's meeting point as the control plane has it now (`None`: it has none).
async fn lookup(api: &ApiClient, machine: &MachineId) -> Result<Option<MeetingPointView>, Refusal> {
    let body = MachineRequest {
        machine: machine.clone(),
    };
    match api
        .call::<_, GetReply<MeetingPointView>>("meeting_point.get", &body)
        .await
    {
        Ok(reply) => Ok(Some(reply.result)),
        Err(err) if err.code() == Some(ErrorKind::NotFound) => Ok(None),
        Err(source) => Err(Refusal::Lookup {
            machine: machine.to_string(),
            source,
        }),
    }
}

/// The machine's meeting point now, if it stands on this pod and names `key`.
async fn authorize(
    shared: &Shared,
    machine: &MachineId,
    key: &PublicKey,
) -> Result<MeetingPointView, Refusal> {
    let view = lookup(&shared.api, machine).await?;
    check(shared, machine, view, key)
}

/// `view` (the machine's meeting point, if any), if it stands on this pod and names `key`.
fn check(
    shared: &Shared,
    machine: &MachineId,
    view: Option<MeetingPointView>,
    key: &PublicKey,
) -> Result<MeetingPointView, Refusal> {
    let Some(view) = view else {
        return Err(Refusal::NoMeetingPoint {
            machine: machine.to_string(),
        });
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
    /// Whether `user` may log in with `key`. A connection costs the control plane at most one
    /// lookup per machine id it tries (and it may try only a few), each taken from its peer's
    /// budget and the pod's: a stranger offering key after key, or connection after
    /// connection, gets no more than that.
    async fn check_login(&mut self, user: &str, key: &PublicKey) -> Result<MachineId, Refusal> {
        let machine = MachineId::new(user).map_err(|_| Refusal::BadUser {
            user: user.to_owned(),
        })?;
        let view = match &self.login {
            Some((checked, view)) if checked == &machine => view.clone(),
            _ => {
                if self.users_tried >= USERS_PER_CONNECTION {
                    return Err(Refusal::TooManyUsers);
                }
                self.users_tried += 1;
                if !self.shared.logins.take(self.peer.ip()) {
                    return Err(Refusal::Throttled {
                        machine: machine.to_string(),
                    });
                }
                let view = lookup(&self.shared.api, &machine).await?;
                self.login = Some((machine.clone(), view.clone()));
                view
            }
        };
        check(&self.shared, &machine, view, key)?;
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
                self.authenticated.store(true, Ordering::Relaxed);
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
        // The port is this machine's now; a session that still forwards it is stale (an
        // earlier connection of the machine, or of the machine that held the port before).
        let stale = self.shared.forwards().remove(&view.port);
        if let Some(stale) = stale {
            stale.task.abort();
            let _ = stale.task.await;
            if stale.connection != self.id {
                tracing::info!(pod = %self.shared.pod, %machine, port = view.port, "closing a stale session that held the port");
                close(
                    &stale.session,
                    "another session holds this meeting point now",
                )
                .await;
            }
        }
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
            connection: self.id,
            machine,
            key,
            lease: view.lease.clone(),
            address: address.to_owned(),
            port: view.port,
            session: session.handle(),
        };
        let held = Held {
            connection: self.id,
            lease: view.lease,
            task: tokio::spawn(forward.run(listener)),
            session: session.handle(),
        };
        self.shared.forwards().insert(held_port(*port), held);
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let mut forwards = self.shared.forwards();
        let port = held_port(port);
        match forwards.get(&port) {
            Some(held) if held.connection == self.id => {
                held.task.abort();
                forwards.remove(&port);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// One forwarded port: accepts clients and relays each through a `forwarded-tcpip` channel,
/// while checking that the meeting point is still this one.
struct Forward {
    shared: Arc<Shared>,
    connection: u64,
    machine: MachineId,
    key: PublicKey,
    /// The reservation this forward serves; a new one means a new forward.
    lease: LeaseId,
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
                    Err(err) => {
                        tracing::warn!(error = &err as &dyn std::error::Error, "accepting a client failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = recheck.tick() => {
                    // Level-triggered: whatever happened (cleared, expired, moved, replaced by
                    // a new reservation), a forward whose meeting point is gone ends.
                    match authorize(&self.shared, &self.machine, &self.key).await {
                        Ok(view) if view.port == self.port && view.lease == self.lease => {}
                        Err(Refusal::Lookup { .. }) => {}
                        Ok(_) | Err(_) => {
                            self.forget();
                            tracing::info!(pod = %self.shared.pod, machine = %self.machine, port = self.port, "the meeting point is gone: closing the machine's connection");
                            close(&self.session, "the meeting point is gone").await;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Leaves the map, unless a newer forward already holds the port.
    fn forget(&self) {
        let mut forwards = self.shared.forwards();
        if forwards
            .get(&self.port)
            .is_some_and(|held| held.connection == self.connection && held.lease == self.lease)
        {
            forwards.remove(&self.port);
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
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Closes a machine's connection, telling it why; a connection already gone is fine.
async fn close(session: &russh::server::Handle, why: &str) {
    let _ = session
        .disconnect(
            russh::Disconnect::ByApplication,
            why.to_owned(),
            String::new(),
        )
        .await;
}

/// Ports in forward requests are u32; only those that were authorized (so fit u16) are held.
fn held_port(port: u32) -> u16 {
    u16::try_from(port).unwrap_or(0)
}
